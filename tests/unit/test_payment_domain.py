"""The payment service's pure rules: provider fees, charge checks, refund arithmetic."""

from __future__ import annotations

from decimal import Decimal

import pytest

from payment_svc.domain import (
    PROVIDERS,
    ChargeRefused,
    InvalidRefundAmount,
    PaymentStatus,
    ProviderUnavailable,
    RefundRefused,
    payable_provider,
    plan_refund,
)


@pytest.mark.parametrize(
    ("provider", "amount", "fee", "net"),
    [
        ("stripe", "100.00", "3.20", "96.80"),
        ("stripe", "1459.97", "42.64", "1417.33"),
        ("paypal", "100.00", "3.40", "96.60"),
        ("paypal", "1299.99", "44.20", "1255.79"),
        ("square", "100.00", "2.70", "97.30"),
        ("square", "699.99", "18.30", "681.69"),
        ("crypto", "100.00", "1.50", "98.50"),
        ("stripe", "0.01", "0.30", "-0.29"),
    ],
)
def test_fee_is_percent_plus_fixed_rounded_to_cents(
    provider: str, amount: str, fee: str, net: str
) -> None:
    fees = PROVIDERS[provider].fees(Decimal(amount))

    assert (fees.processing, fees.net) == (Decimal(fee), Decimal(net))
    assert str(fees.processing) == fee  # two places, as the JSON will show them


@pytest.mark.parametrize(
    ("provider", "amount", "fee"),
    [
        ("stripe", "25.00", "1.03"),  # 0.725 + 0.30 = 1.025
        ("paypal", "12.50", "0.43"),  # 0.425
        ("square", "2.50", "0.17"),  # 0.065 + 0.10 = 0.165
        ("crypto", "3.00", "0.05"),  # 0.045
    ],
)
def test_fee_exactly_half_a_cent_rounds_up_not_to_even(
    provider: str, amount: str, fee: str
) -> None:
    assert PROVIDERS[provider].fees(Decimal(amount)).processing == Decimal(fee)


def test_provider_table_matches_the_published_terms() -> None:
    terms = {
        name: (str(p.fee_percent), str(p.fee_fixed), p.status) for name, p in PROVIDERS.items()
    }

    assert terms == {
        "stripe": ("2.9", "0.30", "active"),
        "paypal": ("3.4", "0.00", "active"),
        "square": ("2.6", "0.10", "active"),
        "crypto": ("1.5", "0.00", "maintenance"),
    }


def test_payable_provider_accepts_a_positive_amount_in_cents() -> None:
    assert payable_provider("stripe", Decimal("10.50"), "EUR").name == "stripe"


@pytest.mark.parametrize(
    ("provider", "amount", "currency", "reason"),
    [
        ("bitpay", "10.00", "USD", "unknown provider 'bitpay'"),
        ("stripe", "0", "USD", "amount must be positive"),
        ("stripe", "-5.00", "USD", "amount must be positive"),
        ("stripe", "10.005", "USD", "whole cents"),
        ("stripe", "NaN", "USD", "amount must be positive"),
        ("stripe", "1000000000.00", "USD", "at most 999999999.99"),
        ("stripe", "10.00", "usd", "3-letter"),
        ("stripe", "10.00", "DOLLARS", "3-letter"),
    ],
)
def test_payable_provider_refuses_what_cannot_be_charged(
    provider: str, amount: str, currency: str, reason: str
) -> None:
    with pytest.raises(ChargeRefused, match=reason) as refused:
        payable_provider(provider, Decimal(amount), currency)
    assert not isinstance(refused.value, ProviderUnavailable)


def test_provider_in_maintenance_is_unavailable_with_the_reason_the_saga_sees() -> None:
    with pytest.raises(ProviderUnavailable, match=r"^provider crypto is in maintenance$"):
        payable_provider("crypto", Decimal("10.00"), "USD")


def refund_of(
    requested: str | None, *, charged: str = "100.00", refunded: str = "0.00", status: str
) -> tuple[Decimal, Decimal, PaymentStatus]:
    plan = plan_refund(
        charged=Decimal(charged),
        refunded=Decimal(refunded),
        status=PaymentStatus(status),
        requested=None if requested is None else Decimal(requested),
    )
    return plan.amount, plan.refunded_total, plan.status


def test_refund_without_amount_refunds_everything_left() -> None:
    assert refund_of(None, status="completed") == (
        Decimal("100.00"),
        Decimal("100.00"),
        PaymentStatus.REFUNDED,
    )
    assert refund_of(None, refunded="30.00", status="partially_refunded") == (
        Decimal("70.00"),
        Decimal("100.00"),
        PaymentStatus.REFUNDED,
    )


def test_partial_refund_leaves_the_payment_partially_refunded() -> None:
    assert refund_of("30.00", status="completed") == (
        Decimal("30.00"),
        Decimal("30.00"),
        PaymentStatus.PARTIALLY_REFUNDED,
    )


def test_refunds_adding_up_to_the_charge_make_it_refunded() -> None:
    assert refund_of("70.00", refunded="30.00", status="partially_refunded")[2] == "refunded"


def test_refund_cannot_exceed_what_is_left() -> None:
    with pytest.raises(RefundRefused, match=r"refund of 70.01 exceeds the 70.00 still refundable"):
        refund_of("70.01", refunded="30.00", status="partially_refunded")


@pytest.mark.parametrize(
    ("status", "reason"),
    [
        ("failed", "a failed payment cannot be refunded"),
        ("refunded", "already fully refunded"),
        ("processing", "a processing payment cannot be refunded"),
    ],
)
def test_only_completed_or_partially_refunded_payments_are_refundable(
    status: str, reason: str
) -> None:
    with pytest.raises(RefundRefused, match=reason) as refused:
        refund_of("1.00", status=status)
    assert not isinstance(refused.value, InvalidRefundAmount)


@pytest.mark.parametrize("requested", ["0", "-1.00", "0.001"])
def test_refund_amount_must_be_positive_cents(requested: str) -> None:
    with pytest.raises(InvalidRefundAmount):
        refund_of(requested, status="completed")
