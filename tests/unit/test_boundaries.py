"""Package boundaries: a service's ``messages.py`` is all another package may import of it.

The rule, as the code under ``src/`` keeps it today:

- a service (``user_svc``, ``inventory_svc``, ``payment_svc``, ``order_svc``) may import
  another service's ``messages`` module (its published language) and nothing else of it;
- the gateway imports no service at all: it knows the services over HTTP, and their
  messages through ``microshop.catalogue``;
- the bus kit imports no service, nor the gateway or the CLI: every service builds on it;
- ``microshop`` (the CLI, ``demo`` and ``local``) wires the services together, so it may
  also import their composition roots, ``<service>.app``.

Only static imports are seen (also those inside functions or under ``TYPE_CHECKING``);
``importlib.import_module(f"{name}_svc.app")`` in the CLI and the demo is not.
"""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

SRC = Path(__file__).resolve().parents[2] / "src"
SERVICES = frozenset({"user_svc", "inventory_svc", "payment_svc", "order_svc"})
FIRST_PARTY = SERVICES | {"bus", "gateway", "microshop"}
PUBLISHED = frozenset({"messages"})
# the modules a package may import of a service other than itself, where not PUBLISHED
ALLOWED_OF_A_SERVICE = {
    "gateway": frozenset(),
    "microshop": frozenset({"messages", "app"}),
}


def imported_modules(node: ast.Import | ast.ImportFrom) -> list[str]:
    """The absolute names an import statement reaches (``from a import b``: ``a.b``)."""
    if isinstance(node, ast.Import):
        return [alias.name for alias in node.names]
    if node.level or node.module is None:  # relative: inside the importer's own package
        return []
    return [f"{node.module}.{alias.name}" for alias in node.names]


def refusal(package: str, module: str) -> str | None:
    """Why ``package`` may not import ``module``, or None when it may."""
    top, _, rest = module.partition(".")
    if top == package or top not in FIRST_PARTY:
        return None
    if package == "bus":
        return "the bus kit imports no other package of this repository"
    if top not in SERVICES:
        return None
    allowed = ALLOWED_OF_A_SERVICE.get(package, PUBLISHED)
    if rest.partition(".")[0] in allowed:
        return None
    if not allowed:
        return f"{package} imports no service"
    return f"{package} may import only {', '.join(sorted(allowed))} of {top}"


def violations(package: str, source: str, filename: str) -> list[str]:
    """Each import in ``source`` (a module of ``package``) that breaks the rule, in line
    order, as ``file:line: imports name (why)``."""
    found = []
    for node in ast.walk(ast.parse(source, filename)):
        if isinstance(node, ast.Import | ast.ImportFrom):
            for module in imported_modules(node):
                why = refusal(package, module)
                if why is not None:
                    found.append(
                        (node.lineno, f"{filename}:{node.lineno}: imports {module} ({why})")
                    )
    return [problem for _, problem in sorted(found)]


def test_no_package_imports_more_of_a_service_than_its_messages() -> None:
    files = sorted(SRC.rglob("*.py"))
    assert len(files) > 40  # the walk found the source tree

    found = [
        problem
        for path in files
        for problem in violations(
            path.relative_to(SRC).parts[0], path.read_text(), str(path.relative_to(SRC.parent))
        )
    ]

    assert found == []


@pytest.mark.parametrize(
    ("package", "source"),
    [
        ("order_svc", "from payment_svc.messages import PaymentCharge"),
        ("order_svc", "from payment_svc import messages"),
        ("order_svc", "import inventory_svc.messages as stock"),
        ("order_svc", "from order_svc.store import orders\nfrom . import domain"),
        ("gateway", "from bus.web import REQUEST_ID\nfrom microshop.catalogue import CONTRACTS"),
        ("microshop", "from user_svc.app import DEMO_PASSWORD\nimport gateway.app"),
        ("microshop", "from payment_svc.messages import EVENTS"),
        ("bus", "import aio_pika\nfrom bus.envelope import Envelope"),
    ],
)
def test_allowed_imports_pass(package: str, source: str) -> None:
    assert violations(package, source, "example.py") == []


ONLY_MESSAGES = "may import only messages of"
NO_OTHER_PACKAGE = "the bus kit imports no other package of this repository"


@pytest.mark.parametrize(
    ("package", "source", "where", "why"),
    [
        (
            "order_svc",
            "import os\nfrom payment_svc.store import payments",
            "example.py:2: imports payment_svc.store.payments",
            f"order_svc {ONLY_MESSAGES} payment_svc",
        ),
        (
            "order_svc",
            "from payment_svc import messages, domain",
            "example.py:1: imports payment_svc.domain",
            f"order_svc {ONLY_MESSAGES} payment_svc",
        ),
        (
            "user_svc",
            "def later():\n    import inventory_svc\n",
            "example.py:2: imports inventory_svc",
            f"user_svc {ONLY_MESSAGES} inventory_svc",
        ),
        (
            "inventory_svc",
            "from typing import TYPE_CHECKING\nif TYPE_CHECKING:\n    from order_svc.app import X",
            "example.py:3: imports order_svc.app.X",
            f"inventory_svc {ONLY_MESSAGES} order_svc",
        ),
        (
            "gateway",
            "from order_svc.messages import OrderCreated",
            "example.py:1: imports order_svc.messages.OrderCreated",
            "gateway imports no service",
        ),
        (
            "microshop",
            "from user_svc.store import users",
            "example.py:1: imports user_svc.store.users",
            "microshop may import only app, messages of user_svc",
        ),
        (
            "bus",
            "from payment_svc.messages import PaymentCharge",
            "example.py:1: imports payment_svc.messages.PaymentCharge",
            NO_OTHER_PACKAGE,
        ),
        (
            "bus",
            "from microshop.catalogue import REGISTRY",
            "example.py:1: imports microshop.catalogue.REGISTRY",
            NO_OTHER_PACKAGE,
        ),
    ],
)
def test_a_forbidden_import_is_named_with_file_and_line(
    package: str, source: str, where: str, why: str
) -> None:
    assert violations(package, source, "example.py") == [f"{where} ({why})"]
