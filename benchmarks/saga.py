"""Orders per second through the whole saga: four service processes on RabbitMQ and
PostgreSQL, everything sharing this machine.

    RABBITMQ_URL=amqp://guest:guest@127.0.0.1:5672/ \
    DATABASE_URL=postgresql+asyncpg://postgres@127.0.0.1:5432/test \
    python -m benchmarks.saga [--seconds 20] [--concurrency 32] [--rate R] [--full-speed-only]

Full speed: ``--concurrency`` customers each place an order as soon as their last one was
accepted (or, when the order service is at its ceiling of orders in flight, as soon as its
Retry-After says); confirmed orders per second over the run. Fixed rate: orders placed on a
schedule (half the full-speed rate unless ``--rate``); order-to-confirmed latency, from
the POST to the ``order.confirmed`` event on the broker, p50 and p99.
At full speed it also reads each process's CPU time from ``/proc``: the CPU milliseconds
one order costs each service, PostgreSQL, RabbitMQ and the load generator.
Writes benchmarks/results/saga.json (with ``--full-speed-only`` it only prints).
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import os
import statistics
import tempfile
import time
import uuid
from pathlib import Path
from typing import Any

import aio_pika
import aiohttp

from benchmarks import record, stamp
from bus.service import run as run_loop
from microshop.local import LocalSystem

RESULTS = Path(__file__).parent / "results" / "saga.json"
PRODUCT = "bench-widget"
DEMO_PASSWORD = "demo-password-1"


class Watcher:
    """Notes when each order's ``order.confirmed`` (or ``order.cancelled``) is published."""

    def __init__(self) -> None:
        self.confirmed: dict[str, float] = {}
        self.cancelled: dict[str, float] = {}

    async def start(self, url: str, exchange: str) -> aio_pika.abc.AbstractConnection:
        connection = await aio_pika.connect(url)
        channel = await connection.channel()
        await channel.set_qos(prefetch_count=500)
        queue = await channel.declare_queue(exclusive=True)
        for key in ("order.confirmed", "order.cancelled"):
            await queue.bind(exchange, routing_key=key)
        await queue.consume(self._on_message, no_ack=True)
        return connection

    async def _on_message(self, message: aio_pika.abc.AbstractIncomingMessage) -> None:
        event = json.loads(message.body)
        seen = self.confirmed if event["type"] == "order.confirmed" else self.cancelled
        seen.setdefault(event["data"]["order_id"], time.perf_counter())


class CpuMeter:
    """CPU time of each part of the system, from ``/proc`` (Linux; elsewhere it reads 0).

    Parts: each service process, PostgreSQL (every ``postgres`` process), RabbitMQ (the
    Erlang VM) and this load generator. ``take()`` between two points of a run says how
    many CPU milliseconds each spent, which divided by the orders confirmed meanwhile is
    the cost of one order, part by part.
    """

    def __init__(self, services: dict[str, int]) -> None:
        self.services = services
        self.tick = os.sysconf("SC_CLK_TCK") if hasattr(os, "sysconf") else 100

    def _cpu(self, pid: int | str) -> int:
        try:
            fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
        except OSError:
            return 0
        return int(fields[11]) + int(fields[12])  # utime + stime, in ticks

    def _by_name(self, names: tuple[str, ...]) -> int:
        total = 0
        for entry in Path("/proc").iterdir() if Path("/proc").exists() else ():
            if entry.name.isdigit():
                with contextlib.suppress(OSError):
                    if (entry / "comm").read_text().strip() in names:
                        total += self._cpu(entry.name)
        return total

    def take(self) -> dict[str, int]:
        """Ticks used so far by each part, and by the whole machine (``busy``)."""
        parts = {name: self._cpu(pid) for name, pid in self.services.items()}
        parts["postgres"] = self._by_name(("postgres",))
        parts["rabbitmq"] = self._by_name(("beam.smp",))
        parts["load generator"] = self._cpu(os.getpid())
        with contextlib.suppress(OSError):
            cpu = Path("/proc/stat").read_text().split("\n", 1)[0].split()[1:]
            parts["busy"] = sum(map(int, cpu)) - int(cpu[3]) - int(cpu[4])  # all but idle
        return parts

    def per_order(
        self, before: dict[str, int], after: dict[str, int], orders: int
    ) -> dict[str, float]:
        """CPU ms per order of each part between two readings."""
        ms = 1000 / self.tick / max(orders, 1)
        costs = {part: round((after[part] - before.get(part, 0)) * ms, 2) for part in after}
        costs["all parts"] = round(sum(v for k, v in costs.items() if k != "busy"), 2)
        return costs


class Busy(Exception):
    """The order service turned the order away for now (503 with Retry-After)."""

    def __init__(self, retry_after: float) -> None:
        super().__init__(f"busy; retry after {retry_after} s")
        self.retry_after = retry_after


async def place(http: aiohttp.ClientSession, url: str, auth: dict[str, str]) -> tuple[str, float]:
    started = time.perf_counter()
    body = {
        "items": [{"product_id": PRODUCT, "quantity": 1}],
        "payment": {"provider": "stripe", "method": "tok_visa"},
    }
    async with http.post(f"{url}/orders", json=body, headers=auth) as response:
        if response.status == 503 and "Retry-After" in response.headers:
            raise Busy(float(response.headers["Retry-After"]))
        if response.status != 202:
            raise RuntimeError(f"order refused: {response.status} {await response.text()}")
        return (await response.json())["id"], started


async def full_speed(
    http: aiohttp.ClientSession,
    url: str,
    auth: dict[str, str],
    watcher: Watcher,
    seconds: float,
    concurrency: int,
    meter: CpuMeter,
) -> dict[str, Any]:
    placed: dict[str, float] = {}
    turned_away = 0
    stop_at = time.perf_counter() + seconds

    async def customer() -> None:
        nonlocal turned_away
        while time.perf_counter() < stop_at:
            try:
                order_id, started = await place(http, url, auth)
            except Busy as busy:  # a polite customer comes back when asked to
                turned_away += 1
                await asyncio.sleep(busy.retry_after)
                continue
            placed[order_id] = started

    began = time.perf_counter()
    before = meter.take()
    await asyncio.gather(*(customer() for _ in range(concurrency)))
    await settle(watcher, placed)
    after = meter.take()
    done = [watcher.confirmed[o] for o in placed if o in watcher.confirmed]
    elapsed = max(done) - began
    costs = meter.per_order(before, after, len(done))
    return {
        "orders": len(placed),
        "confirmed": len(done),
        "seconds": round(elapsed, 2),
        "confirmed_per_second": round(len(done) / elapsed, 1),
        "placed_per_second": round(len(placed) / seconds, 1),
        "turned_away": turned_away,
        "cpu_ms_per_order": costs,
    }


async def fixed_rate(
    http: aiohttp.ClientSession,
    url: str,
    auth: dict[str, str],
    watcher: Watcher,
    seconds: float,
    rate: float,
) -> dict[str, Any]:
    placed: dict[str, float] = {}
    tasks = []
    began = time.perf_counter()

    turned_away = 0

    async def one() -> None:
        nonlocal turned_away
        try:
            order_id, started = await place(http, url, auth)
        except Busy:  # counted, not retried: the schedule goes on
            turned_away += 1
            return
        placed[order_id] = started

    for n in range(int(seconds * rate)):
        # open loop: the schedule does not wait for slow answers
        await asyncio.sleep(max(0.0, began + n / rate - time.perf_counter()))
        tasks.append(asyncio.create_task(one()))
    await asyncio.gather(*tasks)
    await settle(watcher, placed)
    latencies = sorted(
        (watcher.confirmed[o] - started) * 1000
        for o, started in placed.items()
        if o in watcher.confirmed
    )
    return {
        "rate": rate,
        "orders": len(placed),
        "confirmed": len(latencies),
        "latency_ms_p50": round(statistics.median(latencies), 1),
        "latency_ms_p99": round(latencies[int(len(latencies) * 0.99) - 1], 1),
        "latency_ms_max": round(latencies[-1], 1),
        "turned_away": turned_away,
    }


async def settle(watcher: Watcher, placed: dict[str, float], within: float = 60) -> None:
    deadline = time.perf_counter() + within
    while time.perf_counter() < deadline:
        if all(o in watcher.confirmed or o in watcher.cancelled for o in placed):
            return
        await asyncio.sleep(0.1)


async def login(http: aiohttp.ClientSession, url: str, email: str) -> dict[str, str]:
    async with http.post(
        f"{url}/auth/login", json={"email": email, "password": DEMO_PASSWORD}
    ) as response:
        return {"Authorization": f"Bearer {(await response.json())['access_token']}"}


async def run(args: argparse.Namespace) -> dict[str, Any]:
    rabbit = os.environ.get("RABBITMQ_URL", "amqp://guest:guest@127.0.0.1:5672/")
    database = os.environ.get("DATABASE_URL", "postgresql+asyncpg://postgres@127.0.0.1:5432/test")
    name = f"bench{uuid.uuid4().hex[:6]}"
    logs = Path(tempfile.mkdtemp(prefix="microshop-bench-"))
    system = LocalSystem(rabbit, database, name, logs, extra_env={"MICROSHOP_LOG_LEVEL": "WARNING"})
    watcher = Watcher()
    await system.start()
    connection = await watcher.start(rabbit, f"{name}.events")
    try:
        connector = aiohttp.TCPConnector(limit=0)
        async with aiohttp.ClientSession(connector=connector) as http:
            admin = await login(http, system.url("user"), "alice@example.com")
            customer = await login(http, system.url("user"), "bob@example.com")
            async with http.post(
                f"{system.url('inventory')}/products",
                headers=admin,
                json={
                    "id": PRODUCT,
                    "name": "Widget",
                    "price": "9.99",
                    "stock": 10_000_000,
                },
            ) as response:
                assert response.status == 201, await response.text()
            order_url = system.url("order")
            meter = CpuMeter({name: p.pid for name, p in system.processes.items()})
            print("warming up", flush=True)
            await full_speed(http, order_url, customer, watcher, 3, 8, meter)
            print(f"full speed for {args.seconds} s, {args.concurrency} in flight", flush=True)
            fast = await full_speed(
                http, order_url, customer, watcher, args.seconds, args.concurrency, meter
            )
            print(f"  {fast}", flush=True)
            steady: dict[str, Any] = {}
            if not args.full_speed_only:
                rate = args.rate or max(1.0, round(fast["confirmed_per_second"] / 2))
                print(f"fixed rate {rate}/s for {args.seconds} s", flush=True)
                steady = await fixed_rate(http, order_url, customer, watcher, args.seconds, rate)
                print(f"  {steady}", flush=True)
    finally:
        await connection.close()
        await system.stop()
    return {
        **stamp(),
        "setup": "4 service processes + RabbitMQ + PostgreSQL + this load generator, one machine",
        "full_speed": fast,
        "fixed_rate": steady,
        "targets": {"confirmed_per_second": 100, "p99_ms_at_half_rate": 250},
    }


def main() -> None:
    parser = argparse.ArgumentParser(description="orders per second through the saga")
    parser.add_argument("--seconds", type=float, default=20)
    parser.add_argument("--concurrency", type=int, default=32)
    parser.add_argument("--rate", type=float, default=0, help="fixed rate (default: half)")
    parser.add_argument(
        "--full-speed-only",
        action="store_true",
        help="skip the fixed rate; print the result without recording it (for comparing)",
    )
    args = parser.parse_args()
    result = run_loop(run(args))  # on the services' loop (uvloop)
    if not args.full_speed_only:
        record(RESULTS, result)
    print(json.dumps(result, indent=2))


if __name__ == "__main__":
    main()
