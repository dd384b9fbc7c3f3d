"""What every command shares: the typer app, its help conventions, the consoles, the fleet config
and bus, and the one place errors become exit codes.

Exit codes: 0 success; 1 a runtime failure (a server unreachable, no fleet up, nothing fused in
time, deliveries missing); 2 a usage error (an unknown option, command or value, invalid data, a
bad config key), with what to change. A `SkyfuseError` from the library is printed as one line
with its `exit_code`; any other exception is a bug and keeps its traceback.
"""
from __future__ import annotations

from typing import TYPE_CHECKING, Any, NoReturn

import typer
from cloudevents.http import CloudEvent
from rich.console import Console
from typer.core import TyperArgument, TyperCommand, TyperGroup, TyperOption

from skyfuse import config as fleet_config
from skyfuse import contracts, events, signing
from skyfuse.bus import Bus, Record, open_bus
from skyfuse.errors import SkyfuseError

if TYPE_CHECKING:  # typer's own copy of click: the types its command classes take
    from typer._click import Context, Parameter

USAGE, FAILURE = 2, 1  # exit codes: see the module docstring
# Help shows what to type: options as NAME placeholders (CLOUD, DATA), flags bare, arguments with
# plain types; typer would print Python type names (<str>, <bool>).
PLAIN_TYPES = {"<str>": "TEXT", "<int>": "INTEGER", "<float>": "NUMBER", "<path>": "PATH", "<bool>": ""}

out = Console()
err = Console(stderr=True)


def _plain_help(params: list[Parameter], ctx: Context) -> list[Parameter]:
    """`params` with the help conventions above (each parameter changed once: help asks again)."""
    for param in params:
        if isinstance(param, TyperOption) and param.metavar is None:
            param.metavar = "" if param.is_flag else (param.name or "").strip("_").upper()
        elif isinstance(param, TyperArgument) and "display_type_rich" not in vars(param):  # not plain yet
            param.metavar = param.metavar or (param.name or "").upper()
            shown = param.display_type_rich(ctx)

            def plain(ctx: Context, shown: str | None = shown) -> str | None:
                return None if shown is None else PLAIN_TYPES.get(shown, shown)

            vars(param)["display_type_rich"] = plain  # this parameter's help only, not the class's
    return params


class Command(TyperCommand):
    def get_params(self, ctx: Context) -> list[Parameter]:
        return _plain_help(super().get_params(ctx), ctx)


class Group(TyperGroup):
    def get_params(self, ctx: Context) -> list[Parameter]:
        return _plain_help(super().get_params(ctx), ctx)

    def invoke(self, ctx: Context) -> Any:
        """Run the command; a SkyfuseError becomes its one-line message and exit code, nothing else does."""
        try:
            return super().invoke(ctx)
        except SkyfuseError as exc:
            fail(str(exc), exc.exit_code)


app = typer.Typer(help="skyfuse: train where the data lives, fuse the sub-models, serve from the best cloud.",
                  no_args_is_help=True, pretty_exceptions_enable=False, cls=Group)


class _Options:
    config_path: str | None = None  # --config, set by the app's callback


options = _Options()


def fail(message: str, code: int = USAGE) -> NoReturn:
    """Print the error and exit: USAGE (2) for what the user must change, FAILURE (1) for what went wrong."""
    err.print(f"[bold red]error:[/] {message}", highlight=False)
    raise typer.Exit(code)


def load_fleet() -> fleet_config.Fleet:
    return fleet_config.load(options.config_path)


def connect(fleet: fleet_config.Fleet) -> Bus:
    """The fleet's bus; a Kafka broker that does not answer is a runtime failure with a hint."""
    bus = open_bus(fleet)
    if fleet.bus.backend == "kafka":
        try:
            bus.topics()
        except Exception as exc:  # noqa: BLE001 - kafka-python raises many kinds for an unreachable broker
            local_broker = all(s.strip().startswith(("127.0.0.1:", "localhost:"))
                               for s in fleet.bus.kafka.bootstrap_servers.split(","))
            fail(f"cannot reach Kafka at {fleet.bus.kafka.bootstrap_servers} ({type(exc).__name__}: {exc})"
                 + ("; start the local broker with `make kafka-up`, or set bus.backend = \"embedded\""
                    if local_broker else ""), FAILURE)
    return bus


def all_topics(fleet: fleet_config.Fleet) -> list[str]:
    functions = contracts.event_functions()
    return [t.topic for t in contracts.catalog().values()] + [contracts.dlq_topic(f) for f in functions]


def ready_bus(fleet: fleet_config.Fleet) -> Bus:
    """The fleet's bus with every topic of the catalog and every dead-letter topic in place."""
    bus = connect(fleet)
    bus.ensure_topics(all_topics(fleet), fleet.bus.partitions)
    return bus


def publish_event(fleet: fleet_config.Fleet, bus: Bus, event: CloudEvent) -> Record:
    """Publish inside a span of its own (the root of a trace, when tracing is on)."""
    from skyfuse import tracing

    with tracing.producing(event, fleet, "cli", event.get("subject")):
        key, value, headers = events.encode(event)
        return bus.publish(events.topic_of(event), value, key, headers)


def event_as(fleet: fleet_config.Fleet, who: str, type_name: str, data: dict[str, Any]) -> CloudEvent:
    """An event emitted by principal `who` (`cli`, or `cloud/function` of a local fleet), signed with
    its key when signing is on (signing.KeySetupError, a runtime failure, when the key is missing)."""
    event = events.new_event(type_name, data, source=signing.source_of(who), subject=data.get("cloud"))
    signer = signing.signer_for(fleet, who)
    return signer.sign(event) if signer else event


def local_fleet_running() -> bool:
    from skyfuse.dev import local

    return local.running() is not None
