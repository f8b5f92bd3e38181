"""CPU a statement costs through SQLAlchemy Core, as a bus.prepared statement, and through
asyncpg alone, on PostgreSQL.

The saga's steps are a few small statements each, and at full speed what an order costs
is mostly what its round trips cost. This runs one of them (the order service's "end the
step" UPDATE, prebuilt, in one open transaction) ``--statements`` times each way, and
reads the process's CPU time (user and kernel), so waiting on PostgreSQL is left out.

    DATABASE_URL=postgresql+asyncpg://postgres@127.0.0.1:5432/test \\
    python -m benchmarks.statements [--statements 3000] [--rounds 5]

Writes benchmarks/results/statements.json: microseconds of CPU a statement, medians.
"""

from __future__ import annotations

import argparse
import functools
import json
import os
import statistics
import time
import uuid
from collections.abc import Awaitable, Callable
from decimal import Decimal
from pathlib import Path
from typing import Any

from benchmarks import record, stamp
from bus.db import Database
from bus.service import run as run_loop
from order_svc import store
from order_svc.domain import SagaStep

RESULTS = Path(__file__).parent / "results" / "statements.json"
ORDER = "bench-order"


async def cpu_per_call(calls: int, call: Callable[[], Awaitable[Any]]) -> float:
    """Microseconds of this process's CPU per ``call()``."""
    started = time.process_time()
    for _ in range(calls):
        await call()
    return (time.process_time() - started) / calls * 1e6


async def run(args: argparse.Namespace) -> dict[str, Any]:
    url = os.environ.get("DATABASE_URL", "postgresql+asyncpg://postgres@127.0.0.1:5432/test")
    schema = f"bench{uuid.uuid4().hex[:6]}"
    db = Database(url, schema=schema, metadata=[store.metadata])
    await db.create_all()
    at = store.now()
    order = {
        "id": ORDER,
        "user_id": "bench",
        "status": "pending",
        "currency": "USD",
        "total_cents": 999,
        "provider": "stripe",
        "method": "tok_visa",
        "correlation_id": "bench",
        "created_at": at,
        "updated_at": at,
        "refund_requested": False,
        "saga_step": SagaStep.COMMIT,
        "step_attempts": 1,
    }
    ways: dict[str, list[float]] = {"sqlalchemy core": [], "prepared": [], "asyncpg": []}
    try:
        async with db.session() as session, session.begin():
            await store.insert_order(session, order, [("widget", 1, Decimal("9.99"))])
        ended = {"saga_step": None, "step_deadline": None, "step_attempts": 0, "updated_at": at}
        params = {"order_key": ORDER, "step": SagaStep.COMMIT, **ended}
        for _ in range(args.rounds):
            async with db.session() as session, session.begin():
                await store.end_step(session, ORDER, SagaStep.COMMIT)  # SQLAlchemy sends BEGIN
                # the SQL and arguments Prepared hands asyncpg: the gap to "prepared" is its own
                fast = store._END_STEP._fast(session, params.keys())
                assert fast is not None
                asyncpg, compiled = fast
                calls: dict[str, Callable[[], Awaitable[Any]]] = {
                    # the same statement through SQLAlchemy's execute
                    "sqlalchemy core": functools.partial(
                        session.execute, store._END_STEP.statement, params
                    ),
                    # as the services send it (bus.prepared)
                    "prepared": functools.partial(store.end_step, session, ORDER, SagaStep.COMMIT),
                    "asyncpg": functools.partial(
                        asyncpg.execute, compiled.sql, *compiled.args(params)
                    ),
                }
                for way, call in calls.items():
                    ways[way].append(await cpu_per_call(args.statements, call))
    finally:
        await db.drop_schema()
        await db.close()
    return {
        **stamp(),
        "statements_per_round": args.statements,
        "rounds": args.rounds,
        "median_cpu_us_per_statement": {
            way: round(statistics.median(values), 1) for way, values in ways.items()
        },
        "all_cpu_us_per_statement": {
            way: [round(v, 1) for v in values] for way, values in ways.items()
        },
    }


def main() -> None:
    parser = argparse.ArgumentParser(description="CPU a statement costs, three ways")
    parser.add_argument("--statements", type=int, default=3000)
    parser.add_argument("--rounds", type=int, default=5)
    result = run_loop(run(parser.parse_args()))
    record(RESULTS, result)
    print(json.dumps(result["median_cpu_us_per_statement"], indent=2))


if __name__ == "__main__":
    main()
