"""Circuit breaker and retry helpers for calls to other services.

A breaker stops us hammering an upstream that is already failing; retries smooth over
blips. Put retries *outside* the breaker (``retry_call(breaker.call, fn)``) so that a
refused call fails fast instead of being retried.
"""

from __future__ import annotations

import asyncio
import contextlib
import enum
import socket
import time
from collections.abc import Awaitable, Callable, Collection
from typing import Any, ParamSpec, TypeVar

import sqlalchemy.exc
import structlog
import tenacity
from prometheus_client import Counter, Gauge

P = ParamSpec("P")
T = TypeVar("T")

log = structlog.get_logger(__name__)

BREAKER_STATE = Gauge(
    "microshop_circuit_breaker_state",
    "Circuit breaker state: 0 closed, 1 half-open, 2 open.",
    ["breaker"],
)
BREAKER_TRANSITIONS = Counter(
    "microshop_circuit_breaker_transitions_total",
    "Circuit breaker state transitions, by target state.",
    ["breaker", "to_state"],
)


async def finish_or_cancel(tasks: Collection[asyncio.Task[Any]], grace: float) -> None:
    """Give ``tasks`` up to ``grace`` seconds to finish, then cancel the rest and wait for
    them to end (what they raise is theirs: it is not raised here)."""
    if not tasks:
        return
    _, late = await asyncio.wait(set(tasks), timeout=grace)
    for task in late:
        task.cancel()
    await asyncio.gather(*late, return_exceptions=True)


# SQLSTATEs of a database going away or not there yet: a connection exception (08), an
# administrator's or crash's shutdown, a server still starting (57P01-57P03), no
# connection left to give (53300)
_SERVER_UNAVAILABLE = ("08", "57P01", "57P02", "57P03", "53300")


def out_of_reach(error: BaseException) -> bool:
    """Whether ``error`` says something the work needs could not be reached (a refused,
    dropped or timed-out connection, a name not resolved, a database restarting, a pool
    with no connection to give): an outage, which says nothing about the message being
    handled, and passes."""
    if isinstance(error, ConnectionError | TimeoutError | socket.gaierror):
        return True  # sqlalchemy's pool TimeoutError too
    if not isinstance(error, sqlalchemy.exc.DBAPIError):
        return isinstance(error, sqlalchemy.exc.TimeoutError)
    code = str(getattr(error.orig, "sqlstate", ""))
    return error.connection_invalidated or code.startswith(_SERVER_UNAVAILABLE)


def refused_as_data(error: BaseException) -> bool:
    """Whether the database refused a value for what it is (SQLSTATE class 22: text with
    a NUL character, a number out of range): what carried it fails so every time."""
    if not isinstance(error, sqlalchemy.exc.DBAPIError):
        return False
    return str(getattr(error.orig, "sqlstate", "")).startswith("22")


class CircuitOpenError(Exception):
    """A call was refused without being attempted because the breaker is open."""

    def __init__(self, breaker: str, retry_after: float) -> None:
        super().__init__(f"circuit breaker {breaker!r} is open; retry in {retry_after:.2f}s")
        self.breaker = breaker
        self.retry_after = retry_after


class BreakerState(enum.StrEnum):
    """Where a breaker is in its closed -> open -> half-open cycle."""

    CLOSED = "closed"
    OPEN = "open"
    HALF_OPEN = "half_open"


_GAUGE_VALUE = {BreakerState.CLOSED: 0, BreakerState.HALF_OPEN: 1, BreakerState.OPEN: 2}


def _every_exception(exc: BaseException) -> bool:
    return isinstance(exc, Exception)


class CircuitBreaker:
    """Fail fast against an upstream after ``failure_threshold`` consecutive failures.

    Once open, calls are refused for ``reset_timeout`` seconds; then up to
    ``half_open_max_calls`` trial calls decide whether to close again or re-open.
    Not thread-safe: it is meant to be shared by tasks on one event loop.
    """

    def __init__(
        self,
        name: str,
        *,
        failure_threshold: int = 5,
        reset_timeout: float = 30.0,
        call_timeout: float | None = 5.0,
        half_open_max_calls: int = 1,
        is_failure: Callable[[BaseException], bool] = _every_exception,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        if failure_threshold < 1 or half_open_max_calls < 1 or reset_timeout < 0:
            raise ValueError(
                "need failure_threshold >= 1, half_open_max_calls >= 1, reset_timeout >= 0"
            )
        self.name = name
        self.failure_threshold = failure_threshold
        self.reset_timeout = reset_timeout
        self.call_timeout = call_timeout
        self.half_open_max_calls = half_open_max_calls
        self._is_failure = is_failure
        self._clock = clock
        self._state = BreakerState.CLOSED
        self._failures = 0
        self._opened_at = 0.0
        self._trials = 0
        # Bumped on every transition so a trial admitted in an earlier half-open
        # window cannot free a slot that belongs to the current one.
        self._epoch = 0
        BREAKER_STATE.labels(name).set(_GAUGE_VALUE[BreakerState.CLOSED])

    @property
    def state(self) -> BreakerState:
        """The current state; OPEN becomes HALF_OPEN here once reset_timeout has passed."""
        # Lazy, so no timer task is needed; the gauge lags until someone looks.
        if self._state is BreakerState.OPEN and self._retry_after() <= 0:
            self._transition(BreakerState.HALF_OPEN)
        return self._state

    async def call(self, fn: Callable[P, Awaitable[T]], *args: P.args, **kwargs: P.kwargs) -> T:
        """Await ``fn(*args, **kwargs)`` through the breaker, or raise CircuitOpenError."""
        trial_epoch = self._admit()
        deadline = asyncio.timeout(self.call_timeout)
        try:
            async with deadline:
                result = await fn(*args, **kwargs)
        except Exception as exc:
            # Our own deadline always counts, whatever is_failure thinks of TimeoutError.
            if deadline.expired() or self._is_failure(exc):
                self.record_failure()
            else:
                self.record_success()
            raise
        finally:
            # Only Exceptions are recorded: BaseExceptions, notably CancelledError, say
            # nothing about the upstream's health, but they must still free a trial slot.
            if trial_epoch == self._epoch:
                self._trials -= 1
        self.record_success()
        return result

    def record_success(self) -> None:
        """Feed in a success observed outside ``call`` (e.g. by a gateway)."""
        state = self.state
        if state is BreakerState.HALF_OPEN:
            self._transition(BreakerState.CLOSED)
        elif state is BreakerState.CLOSED:
            self._failures = 0
        # A late success while OPEN is ignored: the reset window decides when to probe.

    def record_failure(self) -> None:
        """Feed in a failure observed outside ``call`` (e.g. by a gateway)."""
        state = self.state
        if state is BreakerState.HALF_OPEN:
            self._transition(BreakerState.OPEN)
        elif state is BreakerState.CLOSED:
            self._failures += 1
            if self._failures >= self.failure_threshold:
                self._transition(BreakerState.OPEN)
        # Late failures while OPEN must not keep pushing the reset window out.

    def _admit(self) -> int | None:
        """Refuse the call, or let it through; returns the epoch if it is a trial."""
        state = self.state
        if state is BreakerState.OPEN:
            raise CircuitOpenError(self.name, self._retry_after())
        if state is BreakerState.HALF_OPEN:
            if self._trials >= self.half_open_max_calls:
                raise CircuitOpenError(self.name, 0.0)
            self._trials += 1
            return self._epoch
        return None

    def _retry_after(self) -> float:
        return max(0.0, self._opened_at + self.reset_timeout - self._clock())

    def forget_metrics(self) -> None:
        """Drop this breaker's series (state and transitions): a breaker named after an
        instance that is gone would otherwise be exported for as long as the process runs."""
        with contextlib.suppress(KeyError):
            BREAKER_STATE.remove(self.name)
        for state in BreakerState:
            with contextlib.suppress(KeyError):
                BREAKER_TRANSITIONS.remove(self.name, state.value)

    def _transition(self, to: BreakerState) -> None:
        self._state = to
        self._epoch += 1
        self._trials = 0
        BREAKER_STATE.labels(self.name).set(_GAUGE_VALUE[to])
        BREAKER_TRANSITIONS.labels(self.name, to.value).inc()
        if to is BreakerState.OPEN:
            self._opened_at = self._clock()
            log.warning("circuit breaker opened", breaker=self.name, failures=self._failures)
        elif to is BreakerState.HALF_OPEN:
            log.info("circuit breaker half-open", breaker=self.name)
        else:
            self._failures = 0
            log.info("circuit breaker closed", breaker=self.name)


def retrying(
    *,
    attempts: int = 3,
    initial: float = 0.1,
    maximum: float = 2.0,
    retry_on: tuple[type[BaseException], ...] = (Exception,),
) -> tenacity.AsyncRetrying:
    """An AsyncRetrying with capped, jittered exponential backoff that reraises at the end."""
    return tenacity.AsyncRetrying(
        stop=tenacity.stop_after_attempt(attempts),
        # Jitter scaled to the first delay: tenacity's default of up to 1s would swamp a
        # 0.1s backoff. (tenacity >= 9.2 spells the first delay `multiplier`.)
        wait=tenacity.wait_exponential_jitter(multiplier=initial, max=maximum, jitter=initial),
        # An open breaker should fail fast, and cancellation must never be swallowed.
        retry=tenacity.retry_if_exception_type(retry_on)
        & tenacity.retry_if_not_exception_type((CircuitOpenError, asyncio.CancelledError)),
        reraise=True,
    )


# Plain Callable[..., ...] because PEP 612 forbids keyword-only parameters between
# *args: P.args and **kwargs: P.kwargs.
async def retry_call(
    fn: Callable[..., Awaitable[T]],
    *args: Any,
    attempts: int = 3,
    initial: float = 0.1,
    maximum: float = 2.0,
    retry_on: tuple[type[BaseException], ...] = (Exception,),
    **kwargs: Any,
) -> T:
    """Await ``fn(*args, **kwargs)``, retrying per ``retrying(...)``; the last error is raised."""
    policy = retrying(attempts=attempts, initial=initial, maximum=maximum, retry_on=retry_on)
    async for attempt in policy:
        with attempt:
            return await fn(*args, **kwargs)
    raise AssertionError("unreachable: tenacity reraises when it stops")
