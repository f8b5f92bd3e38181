"""Benchmarks: each runs against the real broker and database and writes results/NAME.json."""

from __future__ import annotations

import hashlib
import json
import os
import platform
import statistics
import time
from datetime import UTC, datetime
from pathlib import Path
from typing import Any


def stamp() -> dict[str, Any]:
    """When and on what a result was measured: the head of every results file."""
    return {
        "when": datetime.now(UTC).isoformat(timespec="seconds"),
        "machine": {
            "cpus": os.cpu_count(),
            "python": platform.python_version(),
            "reference_cpu_ms": reference_cpu_ms(),
        },
    }


def reference_cpu_ms(rounds: int = 5) -> float:
    """CPU milliseconds a fixed piece of pure-Python work takes here now (median).

    This shared machine's speed drifts, by up to half within an hour; taken as a result is
    written (just after its run), this says roughly how fast the machine was running.
    """
    times = []
    for _ in range(rounds):
        started = time.process_time()
        digest = b""
        for _ in range(20_000):
            digest = hashlib.sha256(digest).digest()
        sum(i * i % 7 for i in range(200_000))
        times.append((time.process_time() - started) * 1000)
    return round(statistics.median(times), 1)


def record(path: Path, result: dict[str, Any]) -> None:
    """Write ``result`` to ``path`` as indented JSON."""
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(result, indent=2) + "\n")
