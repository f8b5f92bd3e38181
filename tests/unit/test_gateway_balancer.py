"""The registry of instances and the balancer's choices: rotation, ejection, expiry."""

from __future__ import annotations

from bus.messages import ServiceStopped
from bus.resilience import BreakerState
from gateway.balancer import Balancer
from gateway.registry import Instance, Registry
from tests.support import heartbeat


class Clock:
    def __init__(self) -> None:
        self.now = 100.0

    def __call__(self) -> float:
        return self.now


def registry_of(*urls: str, clock: Clock | None = None) -> Registry:
    registry = Registry(breaker_failures=2, breaker_reset_seconds=30, clock=clock or Clock())
    for n, url in enumerate(urls):
        registry.heard(heartbeat(url, f"i-{n}"))
    return registry


def test_round_robin_takes_turns() -> None:
    balancer = Balancer(registry_of("http://a", "http://b"), "round_robin")
    assert [balancer.pick("inventory").url for _ in range(4)] == [  # type: ignore[union-attr]
        "http://a",
        "http://b",
        "http://a",
        "http://b",
    ]


def test_least_in_flight_prefers_the_idle_instance() -> None:
    balancer = Balancer(registry_of("http://a", "http://b"))
    busy = balancer.pick("inventory")
    assert busy is not None
    balancer.started(busy)
    for _ in range(3):
        idle = balancer.pick("inventory")
        assert idle is not None
        assert idle is not busy
    balancer.finished(busy, ok=True)
    assert {balancer.pick("inventory") for _ in range(4)} == set(
        balancer.registry.rotation("inventory")
    )


def test_no_instance_of_a_service_is_none() -> None:
    assert Balancer(registry_of("http://a")).pick("payment") is None


def test_an_instance_tried_already_is_not_picked_again() -> None:
    balancer = Balancer(registry_of("http://a", "http://b"))
    first = balancer.pick("inventory")
    assert first is not None
    second = balancer.pick("inventory", [first])
    assert second is not None
    assert second is not first
    assert balancer.pick("inventory", [first, second]) is None


def test_failures_open_the_breaker_and_eject_the_instance() -> None:
    balancer = Balancer(registry_of("http://a", "http://b"))
    (a, b) = balancer.registry.rotation("inventory")
    for _ in range(2):
        balancer.started(a)
        balancer.finished(a, ok=False)
    assert a.breaker.state is BreakerState.OPEN
    assert a.state == "ejected"
    assert {balancer.pick("inventory") for _ in range(4)} == {b}
    assert a.describe()["ejected"] is True


def test_a_half_open_instance_takes_one_trial_at_a_time() -> None:
    clock = Clock()
    registry = Registry(breaker_failures=1, breaker_reset_seconds=0, clock=clock)
    registry.heard(heartbeat("http://a"))
    balancer = Balancer(registry)
    (a,) = registry.rotation("inventory")
    balancer.started(a)
    balancer.finished(a, ok=False)
    assert a.breaker.state is BreakerState.HALF_OPEN  # reset_timeout 0: at once
    assert balancer.pick("inventory") is a
    balancer.started(a)
    assert balancer.pick("inventory") is None  # the trial is under way
    balancer.finished(a, ok=True)
    assert a.state == "healthy"  # the trial succeeded: the breaker closed


def test_a_refused_connection_takes_the_instance_out_until_a_check_passes() -> None:
    balancer = Balancer(registry_of("http://a"))
    (a,) = balancer.registry.rotation("inventory")
    balancer.refused(a)
    assert a.state == "unhealthy"
    assert balancer.pick("inventory") is None
    a.healthy = True  # what the next passing health check does
    assert balancer.pick("inventory") is a


def test_only_ready_instances_are_in_rotation() -> None:
    registry = registry_of("http://a")
    registry.heard(heartbeat("http://a", "i-0", status="draining"))
    assert Balancer(registry).pick("inventory") is None
    assert registry.rotation("inventory")[0].state == "draining"


def test_instances_expire_when_heartbeats_stop_and_renew_when_they_come() -> None:
    clock = Clock()
    registry = registry_of("http://a", "http://b", clock=clock)
    clock.now += 14  # three missed 5 s heartbeats is 15 s
    registry.heard(heartbeat("http://b", "i-1"))
    clock.now += 2
    gone = registry.expire()
    assert [i.url for i in gone] == ["http://a"]
    assert [i.url for i in registry.rotation("inventory")] == ["http://b"]


def test_a_restart_at_the_same_address_replaces_the_old_entry() -> None:
    registry = registry_of("http://a")
    (old,) = registry.rotation("inventory")
    old.healthy = False  # the old process died
    registry.heard(heartbeat("http://a/", "i-new"))
    (new,) = registry.rotation("inventory")
    assert new.instance_id == "i-new"
    assert new.healthy


def test_goodbye_removes_a_heard_instance_but_not_a_newer_one_at_its_address() -> None:
    registry = registry_of("http://a")
    registry.heard(heartbeat("http://a", "i-new"))
    registry.goodbye(ServiceStopped(instance_id="i-0", service="inventory", url="http://a"))
    assert len(registry.rotation("inventory")) == 1
    registry.goodbye(ServiceStopped(instance_id="i-new", service="inventory", url="http://a"))
    assert registry.rotation("inventory") == ()


def test_static_instances_never_expire_and_a_goodbye_leaves_them_to_their_checks() -> None:
    clock = Clock()
    registry = Registry(clock=clock)
    static = registry.add_static("order", "http://order:3012/")
    assert static.url == "http://order:3012"
    clock.now += 10_000
    assert registry.expire() == []
    # one of the pods behind the address stops; the others still answer there
    registry.goodbye(ServiceStopped(instance_id="x", service="order", url="http://order:3012"))
    assert registry.rotation("order") == (static,)
    assert static.available


def test_heartbeats_at_a_shared_static_address_leave_its_health_to_the_checks() -> None:
    registry = Registry()
    shared = registry.add_static("inventory", "http://inventory:3013")
    shared.healthy = False  # its readiness check failed: the database is down
    for pod in ("i-a", "i-b", "i-a"):  # the pods behind the one address take turns
        registry.heard(heartbeat("http://inventory:3013", pod))
    assert not shared.healthy


def test_new_instances_are_announced_once() -> None:
    seen: list[Instance] = []
    registry = Registry(on_new=seen.append)
    registry.heard(heartbeat("http://a"))
    registry.heard(heartbeat("http://a"))
    assert [i.url for i in seen] == ["http://a"]
