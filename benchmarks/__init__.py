"""Benchmarks: each runs against the real broker and database and writes results/NAME.json."""

from __future__ import annotations

import json
import os
import platform
from datetime import UTC, datetime
from pathlib import Path
from typing import Any


def stamp() -> dict[str, Any]:
    """When and on what a result was measured: the head of every results file."""
    return {
        "when": datetime.now(UTC).isoformat(timespec="seconds"),
        "machine": {"cpus": os.cpu_count(), "python": platform.python_version()},
    }


def record(path: Path, result: dict[str, Any]) -> None:
    """Write ``result`` to ``path`` as indented JSON."""
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(result, indent=2) + "\n")
