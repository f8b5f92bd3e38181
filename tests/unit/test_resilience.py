"""Circuit breaker and retry behaviour, driven by a fake clock rather than real sleeps."""

from __future__ import annotations

import asyncio
import itertools
import socket
from collections.abc import Callable

import pytest
import sqlalchemy.exc
from prometheus_client import REGISTRY

from bus.resilience import (
    BreakerState,
    CircuitBreaker,
    CircuitOpenError,
    finish_or_cancel,
    out_of_reach,
    refused_as_data,
    retry_call,
    retrying,
)

_names = itertools.count()


class FakeClock:
    """A monotonic clock that only moves when a test says so."""

    def __init__(self) -> None:
        self.now = 1000.0

    def __call__(self) -> float:
        return self.now


class Boom(Exception):
    pass


class NotFound(Exception):
    pass


def unique(prefix: str) -> str:
    # Metrics live in the process-wide registry, so each breaker needs its own label.
    return f"{prefix}-{next(_names)}"


def make_breaker(
    clock: FakeClock,
    *,
    failure_threshold: int = 3,
    call_timeout: float | None = 5.0,
    is_failure: Callable[[BaseException], bool] = lambda exc: isinstance(exc, Exception),
) -> CircuitBreaker:
    return CircuitBreaker(
        unique("test"),
        failure_threshold=failure_threshold,
        reset_timeout=10.0,
        call_timeout=call_timeout,
        is_failure=is_failure,
        clock=clock,
    )


async def ok() -> str:
    return "ok"


async def fail() -> str:
    raise Boom("upstream down")


async def trip(breaker: CircuitBreaker) -> None:
    for _ in range(breaker.failure_threshold):
        with pytest.raises(Boom):
            await breaker.call(fail)


async def test_breaker_opens_after_threshold_consecutive_failures() -> None:
    breaker = make_breaker(FakeClock())
    for _ in range(2):
        with pytest.raises(Boom):
            await breaker.call(fail)
    assert breaker.state is BreakerState.CLOSED
    with pytest.raises(Boom):
        await breaker.call(fail)
    assert breaker.state is BreakerState.OPEN


async def test_success_resets_consecutive_failure_count() -> None:
    breaker = make_breaker(FakeClock())
    for _ in range(2):
        with pytest.raises(Boom):
            await breaker.call(fail)
    assert await breaker.call(ok) == "ok"
    for _ in range(2):
        with pytest.raises(Boom):
            await breaker.call(fail)
    assert breaker.state is BreakerState.CLOSED


async def test_open_breaker_refuses_without_calling() -> None:
    clock = FakeClock()
    breaker = make_breaker(clock)
    await trip(breaker)
    clock.now += 4.0
    calls = 0

    async def counted() -> None:
        nonlocal calls
        calls += 1

    with pytest.raises(CircuitOpenError) as refused:
        await breaker.call(counted)
    assert calls == 0
    assert refused.value.retry_after == pytest.approx(6.0)
    assert breaker.name in str(refused.value)


async def test_breaker_half_opens_after_reset_timeout_and_closes_on_success() -> None:
    clock = FakeClock()
    breaker = make_breaker(clock)
    await trip(breaker)
    clock.now += 10.0
    assert breaker.state is BreakerState.HALF_OPEN
    assert await breaker.call(ok) == "ok"
    assert breaker.state is BreakerState.CLOSED
    # The failure count was reset, so it takes a full threshold to open again.
    for _ in range(2):
        with pytest.raises(Boom):
            await breaker.call(fail)
    assert breaker.state is BreakerState.CLOSED


async def test_failed_trial_reopens_breaker() -> None:
    clock = FakeClock()
    breaker = make_breaker(clock)
    await trip(breaker)
    clock.now += 10.0
    with pytest.raises(Boom):
        await breaker.call(fail)
    assert breaker.state is BreakerState.OPEN
    with pytest.raises(CircuitOpenError) as refused:
        await breaker.call(ok)
    assert refused.value.retry_after == pytest.approx(10.0)


async def test_half_open_admits_only_one_trial_at_a_time() -> None:
    clock = FakeClock()
    breaker = make_breaker(clock)
    await trip(breaker)
    clock.now += 10.0
    release = asyncio.Event()

    async def held() -> str:
        await release.wait()
        return "trial"

    trial = asyncio.create_task(breaker.call(held))
    await asyncio.sleep(0)
    with pytest.raises(CircuitOpenError):
        await breaker.call(ok)
    release.set()
    assert await trial == "trial"
    assert breaker.state is BreakerState.CLOSED
    assert await breaker.call(ok) == "ok"


async def test_slow_call_times_out_and_counts_as_failure() -> None:
    breaker = make_breaker(FakeClock(), failure_threshold=1, call_timeout=0.01)

    async def slow() -> None:
        await asyncio.sleep(1)

    with pytest.raises(TimeoutError):
        await breaker.call(slow)
    assert breaker.state is BreakerState.OPEN


async def test_non_failure_exceptions_do_not_open_breaker() -> None:
    breaker = make_breaker(
        FakeClock(), failure_threshold=1, is_failure=lambda exc: not isinstance(exc, NotFound)
    )

    async def missing() -> None:
        raise NotFound("no such order")

    for _ in range(3):
        with pytest.raises(NotFound):
            await breaker.call(missing)
    assert breaker.state is BreakerState.CLOSED


async def test_cancellation_is_not_counted() -> None:
    breaker = make_breaker(FakeClock(), failure_threshold=1)
    task = asyncio.create_task(breaker.call(asyncio.sleep, 1))
    await asyncio.sleep(0)
    task.cancel()
    with pytest.raises(asyncio.CancelledError):
        await task
    assert breaker.state is BreakerState.CLOSED


async def test_cancelled_trial_frees_the_half_open_slot() -> None:
    clock = FakeClock()
    breaker = make_breaker(clock)
    await trip(breaker)
    clock.now += 10.0
    task = asyncio.create_task(breaker.call(asyncio.sleep, 1))
    await asyncio.sleep(0)
    task.cancel()
    with pytest.raises(asyncio.CancelledError):
        await task
    assert breaker.state is BreakerState.HALF_OPEN
    assert await breaker.call(ok) == "ok"
    assert breaker.state is BreakerState.CLOSED


async def test_passive_outcomes_drive_the_breaker() -> None:
    clock = FakeClock()
    breaker = make_breaker(clock, failure_threshold=2)
    breaker.record_failure()
    breaker.record_failure()
    assert breaker.state is BreakerState.OPEN
    clock.now += 10.0
    breaker.record_success()
    assert breaker.state is BreakerState.CLOSED


async def test_state_metric_follows_transitions() -> None:
    clock = FakeClock()
    breaker = make_breaker(clock)

    def gauge() -> float | None:
        return REGISTRY.get_sample_value(
            "microshop_circuit_breaker_state", {"breaker": breaker.name}
        )

    def transitions(to_state: str) -> float | None:
        return REGISTRY.get_sample_value(
            "microshop_circuit_breaker_transitions_total",
            {"breaker": breaker.name, "to_state": to_state},
        )

    assert gauge() == 0
    await trip(breaker)
    assert gauge() == 2
    clock.now += 10.0
    assert breaker.state is BreakerState.HALF_OPEN
    assert gauge() == 1
    await breaker.call(ok)
    assert gauge() == 0
    assert transitions("open") == 1
    assert transitions("half_open") == 1
    assert transitions("closed") == 1


async def test_retry_call_retries_then_succeeds() -> None:
    attempts = 0

    async def flaky(value: str) -> str:
        nonlocal attempts
        attempts += 1
        if attempts < 3:
            raise Boom("blip")
        return value

    assert await retry_call(flaky, "done", attempts=3, initial=0.001, maximum=0.002) == "done"
    assert attempts == 3


async def test_retry_call_gives_up_and_reraises() -> None:
    attempts = 0

    async def broken() -> None:
        nonlocal attempts
        attempts += 1
        raise Boom(f"attempt {attempts}")

    with pytest.raises(Boom, match="attempt 2"):
        await retry_call(broken, attempts=2, initial=0.001, maximum=0.002)
    assert attempts == 2


async def test_retry_only_retries_listed_exceptions() -> None:
    attempts = 0

    async def missing() -> None:
        nonlocal attempts
        attempts += 1
        raise NotFound("no such order")

    with pytest.raises(NotFound):
        await retry_call(missing, attempts=3, initial=0.001, maximum=0.002, retry_on=(Boom,))
    assert attempts == 1


async def test_retry_never_retries_circuit_open() -> None:
    clock = FakeClock()
    breaker = make_breaker(clock)
    await trip(breaker)
    calls = 0

    async def counted() -> None:
        nonlocal calls
        calls += 1

    with pytest.raises(CircuitOpenError):
        await retry_call(breaker.call, counted, attempts=5, initial=0.001, maximum=0.002)
    assert calls == 0


async def test_retrying_excludes_circuit_open_even_when_asked_to_retry_it() -> None:
    breaker = make_breaker(FakeClock())
    await trip(breaker)
    refusals = 0

    async def refused() -> None:
        nonlocal refusals
        async for attempt in retrying(
            attempts=5, initial=0.001, maximum=0.002, retry_on=(CircuitOpenError,)
        ):
            with attempt:
                refusals += 1
                await breaker.call(ok)

    with pytest.raises(CircuitOpenError):
        await refused()
    assert refusals == 1


class ServerSaid(Exception):
    """What a driver raises for an error the server sent: its SQLSTATE."""

    def __init__(self, sqlstate: str) -> None:
        super().__init__(f"SQLSTATE {sqlstate}")
        self.sqlstate = sqlstate


def statement_failed(cause: Exception, *, invalidated: bool = False) -> sqlalchemy.exc.DBAPIError:
    return sqlalchemy.exc.DBAPIError("SELECT 1", {}, cause, connection_invalidated=invalidated)


@pytest.mark.parametrize(
    ("error", "outage"),
    [
        (ConnectionRefusedError("refused"), True),
        (TimeoutError("connect timed out"), True),
        (socket.gaierror("postgres: name not known"), True),
        (sqlalchemy.exc.TimeoutError("QueuePool limit reached"), True),
        (statement_failed(OSError("gone"), invalidated=True), True),
        (statement_failed(ServerSaid("57P03")), True),  # the database system is starting up
        (statement_failed(ServerSaid("57P01")), True),  # terminated by the administrator
        (statement_failed(ServerSaid("53300")), True),  # too many connections
        (statement_failed(ServerSaid("08006")), True),  # connection failure
        (statement_failed(ServerSaid("23505")), False),  # a unique key: the message's own
        (statement_failed(ValueError("bad")), False),
        (FileNotFoundError("no such file"), False),
        (ValueError("a bug"), False),
    ],
)
def test_only_what_could_not_be_reached_is_an_outage(error: BaseException, outage: bool) -> None:
    assert out_of_reach(error) is outage


@pytest.mark.parametrize(
    ("sqlstate", "refused"),
    [("22021", True), ("22003", True), ("23505", False), ("40P01", False)],
)
def test_only_a_data_exception_is_a_value_refused(sqlstate: str, refused: bool) -> None:
    assert refused_as_data(statement_failed(ServerSaid(sqlstate))) is refused
    assert not refused_as_data(ServerSaid("22021"))  # only what the database said counts


async def test_a_breaker_forgotten_leaves_no_series_behind() -> None:
    breaker = CircuitBreaker("gateway order http://10.0.0.7:3012", failure_threshold=1)

    async def failing() -> None:
        raise ConnectionRefusedError

    with pytest.raises(ConnectionRefusedError):
        await breaker.call(failing)  # opened: a transition counted
    breaker.forget_metrics()

    names = {
        sample.labels.get("breaker")
        for metric in REGISTRY.collect()
        if metric.name.startswith("microshop_circuit_breaker")
        for sample in metric.samples
    }
    assert breaker.name not in names


async def test_tasks_get_their_grace_and_the_late_ones_are_cancelled() -> None:
    quick = asyncio.create_task(asyncio.sleep(0.01, result="done"))
    late = asyncio.create_task(asyncio.sleep(60))

    await finish_or_cancel({quick, late}, grace=0.2)

    assert quick.result() == "done"
    assert late.cancelled()
