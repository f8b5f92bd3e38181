"""The gateway against a direct call and against nginx as the same reverse proxy, in one run.

Everything listens on 127.0.0.1. One upstream process (a kit app, as services are built,
serving a small JSON GET and the JWKS) stands behind each proxy; ``wrk`` asks for
``/orders/ping`` with a bearer token:

- ``direct``: straight at the upstream;
- ``nginx``: Debian's nginx, one worker, keep-alive to the upstream;
- ``gateway``: ``microshop run gateway`` as shipped (JWT check, rate limiting, metrics,
  security headers, trace context made and propagated; uvloop), with no OTLP exporter
  configured, so no span is recorded;
- ``gateway+spans``: the same with ``OTEL_EXPORTER_OTLP_ENDPOINT`` set, so every request's
  span is recorded and exported over OTLP/HTTP to a sink in this benchmark's own process
  group (it reads and drops them; it says on exit how many export requests it took);
- ``gateway+spans/10``: the same, sampling one trace in ten
  (``OTEL_TRACES_SAMPLER=parentbased_traceidratio``, as busy sites run it).

Each round measures every target in turn: throughput with many connections, then latency
with one. The figures are medians over the rounds.

    python -m benchmarks.gateway [--rounds 3] [--seconds 8] [--connections 32]

Needs ``wrk`` and ``nginx`` (``apt-get install wrk nginx``). Writes
benchmarks/results/gateway.json and prints a table.
"""

from __future__ import annotations

import argparse
import os
import re
import shutil
import signal
import statistics
import subprocess
import sys
import tempfile
import time
import urllib.request
from pathlib import Path
from typing import Any

from benchmarks import record, stamp
from microshop.local import free_port

RESULTS = Path(__file__).parent / "results" / "gateway.json"
PATH = "/orders/ping"
ISSUER, AUDIENCE = "microshop-user", "microshop"
NGINX_CONF = """
worker_processes 1;
daemon off;
pid {tmp}/nginx.pid;
error_log {tmp}/nginx-error.log warn;
events {{ worker_connections 1024; }}
http {{
  access_log off;
  client_body_temp_path {tmp}/body;
  proxy_temp_path {tmp}/proxy;
  fastcgi_temp_path {tmp}/fastcgi;
  uwsgi_temp_path {tmp}/uwsgi;
  scgi_temp_path {tmp}/scgi;
  upstream service {{ server 127.0.0.1:{upstream}; keepalive 64; }}
  server {{
    listen 127.0.0.1:{port};
    location / {{
      proxy_pass http://service;
      proxy_http_version 1.1;
      proxy_set_header Connection "";
      proxy_set_header X-Forwarded-For $proxy_add_x_forwarded_for;
    }}
  }}
}}
"""


# --- the processes under test (run as `python -m benchmarks.gateway --serve ...`) ---------


def serve_upstream() -> None:
    """A kit app like any service's: the small JSON GET, and the JWKS to check tokens with."""
    from aiohttp import web

    from bus.auth import SigningKey
    from bus.health import Health
    from bus.settings import Settings
    from bus.web import Api, create_app, json_response

    key = SigningKey.from_pem(os.environ["BENCH_KEY"].encode())
    api = Api()

    @api.get(PATH)
    async def ping(_: web.Request) -> web.Response:
        return json_response({"id": "ping", "status": "confirmed", "total": "1299.99"})

    @api.get("/.well-known/jwks.json")
    async def jwks(_: web.Request) -> web.Response:
        return json_response(key.jwks())

    health = Health()
    health.mark_ready()
    app = create_app(Settings(service="order"), api=api, health=health)
    web.run_app(app, host="127.0.0.1", port=int(os.environ["BENCH_PORT"]), access_log=None)


def serve_otlp_sink() -> None:
    """Takes OTLP/HTTP trace exports and drops them, as a collector would take them."""
    from aiohttp import web

    exports = {"requests": 0, "bytes": 0}

    async def traces(request: web.Request) -> web.Response:
        exports["requests"] += 1
        exports["bytes"] += len(await request.read())
        return web.Response(body=b"", content_type="application/x-protobuf")

    async def report(_: web.Application) -> None:
        print(f"otlp sink: {exports['requests']} exports, {exports['bytes']} bytes", flush=True)

    async def live(_: web.Request) -> web.Response:
        return web.Response(text="ok")

    app = web.Application(client_max_size=64 << 20)
    app.router.add_post("/v1/traces", traces)
    app.router.add_get("/health/live", live)
    app.on_shutdown.append(report)
    web.run_app(app, host="127.0.0.1", port=int(os.environ["BENCH_PORT"]), access_log=None)


# --- the run -------------------------------------------------------------------------------


def wait_until_up(url: str, within: float = 30) -> None:
    deadline = time.monotonic() + within
    while True:
        try:
            with urllib.request.urlopen(url, timeout=1) as response:
                if response.status < 500:
                    return
        except OSError:
            pass
        if time.monotonic() > deadline:
            raise SystemExit(f"{url} did not come up")
        time.sleep(0.2)


_UNITS = {"us": 0.001, "ms": 1.0, "s": 1000.0}


def _ms(text: str) -> float:
    unit = text.lstrip("0123456789.")
    return float(text.removesuffix(unit)) * _UNITS[unit]


def wrk(url: str, token: str, connections: int, seconds: int) -> dict[str, float]:
    """One wrk run: requests a second and latency percentiles (ms); non-2xx answers fail."""
    output = subprocess.run(
        ["wrk", "-t1", f"-c{connections}", f"-d{seconds}s", "--latency",
         "-H", f"Authorization: Bearer {token}", url],
        capture_output=True, text=True, check=True, timeout=seconds + 30,
    ).stdout  # fmt: skip
    if "Non-2xx" in output or "Socket errors" in output:
        raise SystemExit(f"errors against {url}:\n{output}")
    return {
        "requests_per_second": float(_found(r"Requests/sec:\s+([\d.]+)", output)),
        "p50_ms": _ms(_found(r"\s50%\s+(\S+)", output)),
        "p99_ms": _ms(_found(r"\s99%\s+(\S+)", output)),
    }


def _found(pattern: str, output: str) -> str:
    match = re.search(pattern, output)
    if match is None:
        raise SystemExit(f"no {pattern!r} in wrk's output:\n{output}")
    return match.group(1)


def tool_version(command: list[str]) -> str:
    done = subprocess.run(command, capture_output=True, text=True, check=False)
    return (done.stdout + done.stderr).strip().splitlines()[0]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--seconds", type=int, default=8)
    parser.add_argument("--latency-seconds", type=int, default=5)
    parser.add_argument("--connections", type=int, default=32)
    parser.add_argument("--serve", choices=("upstream", "otlp-sink"), help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.serve == "upstream":
        return serve_upstream()
    if args.serve == "otlp-sink":
        return serve_otlp_sink()
    for tool in ("wrk", "nginx"):
        if shutil.which(tool) is None and not Path(f"/usr/sbin/{tool}").exists():
            raise SystemExit(f"{tool} is needed: apt-get install wrk nginx")

    from bus.auth import SigningKey

    key = SigningKey.generate()
    token = key.mint(subject="bench", role="user", issuer=ISSUER, audience=AUDIENCE, ttl=86_400)
    ports = {
        name: free_port()
        for name in ("direct", "nginx", "gateway", "gateway+spans", "gateway+spans/10")
    }
    sink_port = free_port()
    upstream = f"http://127.0.0.1:{ports['direct']}"
    gateway_env = {
        **os.environ,
        "MICROSHOP_BROKER_URL": "memory://",
        "MICROSHOP_UPSTREAMS": f"order={upstream},user={upstream}",
        "MICROSHOP_JWKS_URL": f"{upstream}/.well-known/jwks.json",
        # on, and sized so that one load generator is never refused
        "MICROSHOP_RATE_LIMIT_RPS": "1000000",
        "MICROSHOP_RATE_LIMIT_BURST": "1000000",
        "MICROSHOP_LOG_LEVEL": "WARNING",
        "MICROSHOP_DRAIN_SECONDS": "1",
    }
    me = [sys.executable, "-m", "benchmarks.gateway", "--serve"]
    commands: dict[str, tuple[list[str], dict[str, str]]] = {
        "direct": (
            [*me, "upstream"],
            {**os.environ, "BENCH_KEY": key.to_pem().decode(), "BENCH_PORT": str(ports["direct"])},
        ),
        "otlp sink": ([*me, "otlp-sink"], {**os.environ, "BENCH_PORT": str(sink_port)}),
        "gateway": (
            [sys.executable, "-m", "microshop.cli", "run", "gateway"],
            {**gateway_env, "MICROSHOP_PORT": str(ports["gateway"])},
        ),
        "gateway+spans": (
            [sys.executable, "-m", "microshop.cli", "run", "gateway"],
            {
                **gateway_env,
                "MICROSHOP_PORT": str(ports["gateway+spans"]),
                "OTEL_EXPORTER_OTLP_ENDPOINT": f"http://127.0.0.1:{sink_port}",
            },
        ),
        "gateway+spans/10": (
            [sys.executable, "-m", "microshop.cli", "run", "gateway"],
            {
                **gateway_env,
                "MICROSHOP_PORT": str(ports["gateway+spans/10"]),
                "OTEL_EXPORTER_OTLP_ENDPOINT": f"http://127.0.0.1:{sink_port}",
                "OTEL_TRACES_SAMPLER": "parentbased_traceidratio",
                "OTEL_TRACES_SAMPLER_ARG": "0.1",
            },
        ),
    }

    processes: list[subprocess.Popen[bytes]] = []
    with tempfile.TemporaryDirectory(prefix="bench-gateway-") as tmp:
        conf = Path(tmp) / "nginx.conf"
        conf.write_text(NGINX_CONF.format(tmp=tmp, upstream=ports["direct"], port=ports["nginx"]))
        nginx = shutil.which("nginx") or "/usr/sbin/nginx"
        try:
            for command, env in commands.values():
                processes.append(
                    subprocess.Popen(command, env=env, cwd=Path(__file__).parent.parent)
                )
            processes.append(subprocess.Popen([nginx, "-c", str(conf), "-p", tmp]))
            for name, port in [*ports.items(), ("otlp sink", sink_port)]:
                wait_until_up(
                    f"http://127.0.0.1:{port}/health/live"
                    if name.startswith(("gateway", "otlp"))
                    else f"http://127.0.0.1:{port}{PATH}"
                )
            load_before = os.getloadavg()[0]
            results = measure(ports, token, args)
            load_after = os.getloadavg()[0]
        finally:
            # one by one, the reverse of starting: the gateways flush their spans before
            # the sink stops
            for process in reversed(processes):
                process.send_signal(signal.SIGTERM)
                try:
                    process.wait(15)
                except subprocess.TimeoutExpired:
                    process.kill()
    report(results, args, nginx, (load_before, load_after))


def measure(
    ports: dict[str, int], token: str, args: argparse.Namespace
) -> dict[str, list[dict[str, float]]]:
    """Every target in turn, round after round (so drift hits them all alike)."""
    urls = {name: f"http://127.0.0.1:{port}{PATH}" for name, port in ports.items()}
    for url in urls.values():
        wrk(url, token, args.connections, 2)  # warm-up: pools, caches, JWKS
    runs: dict[str, list[dict[str, float]]] = {name: [] for name in urls}
    for round_number in range(args.rounds):
        for name, url in urls.items():
            loaded = wrk(url, token, args.connections, args.seconds)
            single = wrk(url, token, 1, args.latency_seconds)
            runs[name].append(
                {
                    **loaded,
                    "p50_ms_one_connection": single["p50_ms"],
                    "p99_ms_one_connection": single["p99_ms"],
                    "requests_per_second_one_connection": single["requests_per_second"],
                }
            )
            print(
                f"round {round_number + 1} {name:>15}: {loaded['requests_per_second']:8.0f} req/s, "
                f"p50 {single['p50_ms']:.3f} ms at one connection",
                flush=True,
            )
    return runs


def report(
    runs: dict[str, list[dict[str, float]]],
    args: argparse.Namespace,
    nginx: str,
    load: tuple[float, float],
) -> None:
    medians = {
        name: {key: round(statistics.median(run[key] for run in rounds), 3) for key in rounds[0]}
        for name, rounds in runs.items()
    }
    direct, proxy = medians["direct"], medians["nginx"]
    ratios: dict[str, float] = {}
    for name in (n for n in medians if n.startswith("gateway")):
        ours = medians[name]
        ratios[f"{name} throughput / nginx"] = round(
            ours["requests_per_second"] / proxy["requests_per_second"], 3
        )
        ratios[f"{name} added p50 ms at one connection"] = round(
            ours["p50_ms_one_connection"] - direct["p50_ms_one_connection"], 3
        )
    ratios["nginx added p50 ms at one connection"] = round(
        proxy["p50_ms_one_connection"] - direct["p50_ms_one_connection"], 3
    )
    strictest = "gateway+spans"  # the issue's terms: tracing on as well
    document: dict[str, Any] = {
        **stamp(),
        "tools": {"wrk": tool_version(["wrk", "-v"]), "nginx": tool_version([nginx, "-v"])},
        "request": f"GET {PATH} with a bearer token; ~60-byte JSON answer",
        "conditions": {
            "load_average_1m_before_and_after": [round(value, 2) for value in load],
            "gateway": "as shipped (microshop run gateway, uvloop): JWT check (cached), rate "
            "limits (never reached), metrics, security headers; trace context made and "
            "propagated, no span recorded (no OTEL_EXPORTER_OTLP_ENDPOINT)",
            "gateway+spans": "the same, with every span recorded and exported over OTLP/HTTP "
            "by the batch processor to a local sink that drops them",
            "gateway+spans/10": "the same, recording one trace in ten",
            "upstream": "one process, a kit app (bus.web.create_app) on asyncio",
            "nginx": "one worker, keep-alive pool of 64 to the upstream",
        },
        "rounds": args.rounds,
        "seconds": args.seconds,
        "connections": args.connections,
        "median": medians,
        "ratios": ratios,
        "targets": {
            "throughput at least 25% of nginx": ratios[f"{strictest} throughput / nginx"] >= 0.25,
            "added p50 under 1 ms at one connection": ratios[
                f"{strictest} added p50 ms at one connection"
            ]
            < 1.0,
            "measured on": strictest,
        },
        "all_rounds": runs,
    }
    record(RESULTS, document)
    print(f"\n{'target':>15} {'req/s':>9} {'p50 ms':>8} {'p99 ms':>8} {'p50 ms c=1':>11}")
    for name, row in medians.items():
        print(
            f"{name:>15} {row['requests_per_second']:9.0f} {row['p50_ms']:8.2f} "
            f"{row['p99_ms']:8.2f} {row['p50_ms_one_connection']:11.3f}"
        )
    for name, value in ratios.items():
        print(f"{name}: {value}")
    print(f"wrote {RESULTS}")


if __name__ == "__main__":
    main()
