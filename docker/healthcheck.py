"""The image's HEALTHCHECK: exit 0 when this container's service answers ``/health/live``.

The port is ``MICROSHOP_PORT`` when set, else the ``--port`` of the ``microshop run NAME``
that is PID 1, else NAME's default port. Standard library only: the image has no curl.
"""

from __future__ import annotations

import os
import sys
import urllib.request
from pathlib import Path

from bus.settings import DEFAULT_PORTS


def service_port(command: list[str], environ: dict[str, str]) -> int:
    """The port ``microshop run NAME [--port N]`` serves on under ``environ``."""
    if environ.get("MICROSHOP_PORT", "").strip() not in ("", "0"):
        return int(environ["MICROSHOP_PORT"])
    if "--port" in command:
        return int(command[command.index("--port") + 1])
    return DEFAULT_PORTS[command[command.index("run") + 1]]


def main() -> int:
    """Ask the service whether it is alive; 0 when it answers 200, else 1."""
    command = Path("/proc/1/cmdline").read_bytes().decode().split("\0")
    url = f"http://127.0.0.1:{service_port(command, dict(os.environ))}/health/live"
    try:
        with urllib.request.urlopen(url, timeout=2) as response:
            return 0 if response.status == 200 else 1
    except OSError as error:
        print(f"{url}: {error}", file=sys.stderr)
        return 1


if __name__ == "__main__":
    sys.exit(main())
