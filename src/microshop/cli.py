"""``microshop``: run a service; publish, watch and mend messages; export the schemas.

Errors a user can make print one line and exit non-zero; never a traceback.
"""

from __future__ import annotations

import argparse
import asyncio
import importlib
import sys
from collections.abc import Sequence
from pathlib import Path
from typing import NoReturn

from pydantic import ValidationError
from pydantic_settings import SettingsError

from bus.broker import BrokerUnavailable
from bus.schemas import check, export
from bus.settings import Settings, redacted
from microshop.ops import CLI_SOURCE, OpsError, quiet_logging

SERVICE_MODULES = {
    "user": "user_svc",
    "payment": "payment_svc",
    "order": "order_svc",
    "inventory": "inventory_svc",
    "gateway": "gateway",
}


class UsageError(Exception):
    """A mistake on the command line or in the environment, shown as one line."""

    exit_code = 2


class StartupError(UsageError):
    """The service could not start: its broker, database or port is not available."""

    exit_code = 1


class _Parser(argparse.ArgumentParser):
    def error(self, message: str) -> NoReturn:
        raise UsageError(f"{message} (see '{self.prog} --help')")


def _parser() -> argparse.ArgumentParser:
    parser = _Parser(prog="microshop", description="microshop: an event-driven shop backend")
    commands = parser.add_subparsers(dest="command", required=True, parser_class=_Parser)

    run = commands.add_parser("run", help="run one service until SIGTERM or Ctrl-C")
    run.add_argument(
        "name",
        choices=sorted(SERVICE_MODULES),
        metavar="NAME",
        help="one of: " + ", ".join(sorted(SERVICE_MODULES)),
    )
    run.add_argument("--port", type=_port, help="port to serve on (default: the service's own)")

    demo = commands.add_parser("demo", help="every service in one process, no servers needed")
    demo.add_argument(
        "--once", action="store_true", help="place sample orders, print how each ended, and exit"
    )

    schemas = commands.add_parser("schemas", help="the message contracts in schemas/")
    actions = schemas.add_subparsers(dest="action", required=True, parser_class=_Parser)
    for action, text in (("export", "write"), ("check", "fail when stale:")):
        sub = actions.add_parser(action, help=f"{text} JSON Schemas and the AsyncAPI document")
        sub.add_argument("directory", nargs="?", type=Path, default=Path("schemas"))
    _add_event_parsers(commands)
    _add_dlq_parsers(commands)
    return parser


def _add_event_parsers(commands: argparse._SubParsersAction[_Parser]) -> None:
    publish = commands.add_parser("publish", help="validate one message and publish it")
    publish.add_argument("type", metavar="TYPE", help="its type, e.g. user.created")
    publish.add_argument(
        "--data", required=True, metavar="JSON|@FILE", help="its data: JSON, @FILE or @- (stdin)"
    )
    publish.add_argument("--source", default=CLI_SOURCE, help=f"who sends it ({CLI_SOURCE})")
    publish.add_argument(
        "--correlation-id", metavar="ID", help="the flow it belongs to (default: a new one)"
    )
    publish.add_argument(
        "--id",
        metavar="ID",
        help="its message id (default: a new one): an unconfirmed publish, sent again "
        "with the same data (the services drop a second message of one id, whatever it says)",
    )

    tail = commands.add_parser("tail", help="show messages as they flow, until Ctrl-C")
    tail.add_argument(
        "patterns", nargs="*", default=["#"], metavar="PATTERN", help="e.g. order.* (default: #)"
    )
    tail.add_argument("--json", action="store_true", help="one CloudEvent per line")


def _add_dlq_parsers(commands: argparse._SubParsersAction[_Parser]) -> None:
    dlq = commands.add_parser("dlq", help="a service's dead letters")
    actions = dlq.add_subparsers(dest="action", required=True, parser_class=_Parser)
    service = "the service's queue name (MICROSHOP_QUEUE; by default the service's name)"

    listing = actions.add_parser("list", help="show dead letters, leaving them in place")
    listing.add_argument("service", nargs="?", metavar="SERVICE", help=f"{service}; default: all")
    listing.add_argument("--json", action="store_true", help="one dead letter per line")

    replay = actions.add_parser("replay", help="send dead letters back to their service")
    replay.add_argument("service", metavar="SERVICE", help=service)
    which = replay.add_mutually_exclusive_group(required=True)
    which.add_argument("--id", metavar="ID", help="the one with this message id")
    which.add_argument("--all", action="store_true", help="every one")

    purge = actions.add_parser(
        "purge", help="delete a service's dead letters: those counted in the question"
    )
    purge.add_argument("service", metavar="SERVICE", help=service)
    purge.add_argument("--yes", action="store_true", help="do not ask first: delete every one")


def _port(value: str) -> int:
    try:
        port = int(value)
    except ValueError:
        raise argparse.ArgumentTypeError(f"not a port number: {value!r}") from None
    if not 1 <= port <= 65535:
        raise argparse.ArgumentTypeError(f"port must be 1-65535, not {port}")
    return port


def load_settings(settings_type: type[Settings] = Settings, **overrides: object) -> Settings:
    """Settings from the environment (and ``overrides``); a bad one is a :class:`UsageError`."""
    try:
        return settings_type(**overrides)  # type: ignore[arg-type]
    except ValidationError as error:
        first = error.errors(include_url=False)[0]
        where = ".".join(str(part) for part in first["loc"])
        raise UsageError(f"bad setting MICROSHOP_{where.upper()}: {first['msg']}") from None
    except SettingsError as error:
        raise UsageError(f"bad setting: {error}") from None


def run_service(name: str, port: int | None) -> int:
    """Build the named service from its ``app.build`` and serve until signalled."""
    from bus.service import run, run_until_signalled

    module_name = f"{SERVICE_MODULES[name]}.app"
    try:
        module = importlib.import_module(module_name)
    except ModuleNotFoundError as error:
        if error.name not in (module_name, SERVICE_MODULES[name]):
            raise
        raise UsageError(f"the {name} service is not built yet (no {module_name})") from None
    overrides: dict[str, object] = {"service": name}
    if port is not None:
        overrides["port"] = port
    settings = load_settings(getattr(module, "Settings", Settings), **overrides)
    service = module.build(settings)
    try:
        run(run_until_signalled(service))
    except BrokerUnavailable as error:
        raise StartupError(
            f"{name}: {error} (MICROSHOP_BROKER_URL={redacted(settings.broker_url)})"
        ) from None
    except OSError as error:
        raise StartupError(
            f"{name}: cannot serve on port {settings.listen_port}: {error}"
        ) from None
    return 0


def demo_command(once: bool) -> int:
    """Run ``microshop demo`` (see :mod:`microshop.demo`)."""
    from bus.service import run
    from microshop.demo import run_demo

    try:
        return run(run_demo(once))
    except BrokerUnavailable as error:
        raise StartupError(f"demo: {error}") from None
    except OSError as error:
        raise StartupError(f"demo: cannot serve: {error} (is another demo running?)") from None


def schemas_command(action: str, directory: Path) -> int:
    """Export the schemas, or report (and fail) when the committed ones are stale."""
    from microshop.catalogue import CONTRACTS

    version = Settings().version
    if action == "export":
        written = export(CONTRACTS, directory, version=version)
        print(f"wrote {len(written)} files to {directory}/")
        return 0
    problems = check(CONTRACTS, directory, version=version)
    for problem in problems:
        print(problem)
    if problems:
        print(f"{directory}/ is stale: run 'microshop schemas export'", file=sys.stderr)
        return 1
    print(f"{directory}/ is up to date")
    return 0


def publish_command(args: argparse.Namespace) -> int:
    """Validate, wrap and publish one message; print its id."""
    from microshop.ops.events import envelope_for, publish, read_data

    data = read_data(args.data)
    envelope = envelope_for(
        args.type, data, source=args.source, correlation_id=args.correlation_id, message_id=args.id
    )
    asyncio.run(publish(load_settings(), envelope))
    print(envelope.id)
    return 0


def tail_command(args: argparse.Namespace) -> int:
    """Show messages as they flow until Ctrl-C, which is a clean exit."""
    from microshop.ops.events import tail

    asyncio.run(tail(load_settings(), args.patterns, as_json=args.json))
    return 0


def dlq_command(args: argparse.Namespace) -> int:
    """``microshop dlq list|replay|purge`` (see :mod:`microshop.ops.dead_letters`)."""
    from microshop.ops import dlq

    settings = load_settings()
    if args.action == "list":
        queues = [args.service] if args.service else None
        return asyncio.run(dlq.list_letters(settings, queues, json_lines=args.json))
    if args.action == "replay":
        return asyncio.run(dlq.replay_letters(settings, args.service, message_id=args.id))
    return asyncio.run(dlq.purge_letters(settings, args.service, ask=None if args.yes else _ask))


def _ask(question: str) -> bool:
    try:
        return input(f"{question} [y/N] ").strip().lower() in ("y", "yes")
    except EOFError:
        return False


def main(argv: Sequence[str] | None = None) -> int:
    """Entry point of the ``microshop`` console script."""
    try:
        args = _parser().parse_args(argv)
        if args.command == "run":
            return run_service(args.name, args.port)
        if args.command == "demo":
            return demo_command(args.once)
        if args.command == "schemas":
            return schemas_command(args.action, args.directory)
        commands = {"publish": publish_command, "tail": tail_command, "dlq": dlq_command}
        quiet_logging()
        return commands[args.command](args)
    except (UsageError, OpsError) as error:
        print(f"microshop: {error}", file=sys.stderr)
        return error.exit_code
    except KeyboardInterrupt:
        return 130


if __name__ == "__main__":
    sys.exit(main())
