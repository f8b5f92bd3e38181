"""The payment service: providers and their fees, payments, refunds and transactions.

It charges and refunds over HTTP and on the ``payment.charge`` / ``payment.refund``
commands of the order saga, at most once per order, and announces every outcome.
"""
