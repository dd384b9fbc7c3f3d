"""`skyfuse keys init|list|rotate|retire`: the event-signing keys and the local inference API key."""
from __future__ import annotations

from pathlib import Path
from typing import Annotated

import typer
from rich.table import Table

from skyfuse import signing
from skyfuse.cli.common import Command, Group, app, fail, load_fleet, out

keys_app = typer.Typer(help="The fleet's event-signing keys and the local inference API key (under signing.keys_dir).",
                       no_args_is_help=True, cls=Group)
app.add_typer(keys_app, name="keys")


@keys_app.command("init", cls=Command)
def keys_init() -> None:
    """Make a signing key for every function in every cloud and for the CLI, where none exists yet,
    and the local inference API key; `skyfuse up` and `make run` do this themselves."""
    from skyfuse.dev import local

    fleet = load_fleet()
    made = signing.ensure_local_keys(fleet)
    local.api_key(fleet)
    out.print(f"{len(made)} new signing key(s) in {fleet.signing.keys_dir}; trust file "
              f"{Path(fleet.signing.keys_dir) / 'trust.json'} lists {len(signing.trusted(fleet.signing.keys_dir))}",
              highlight=False)


@keys_app.command("list", cls=Command)
def keys_list() -> None:
    """The trusted public keys: which principal each one signs for."""
    fleet = load_fleet()
    table = Table("key id", "principal", title=f"trusted keys ({Path(fleet.signing.keys_dir) / 'trust.json'})")
    for entry in signing.trusted(fleet.signing.keys_dir):
        table.add_row(entry["id"], entry["principal"])
    out.print(table)


@keys_app.command("rotate", cls=Command)
def keys_rotate(who: Annotated[str, typer.Argument(help="cloud/function (e.g. aws/scheduler), or cli.")]) -> None:
    """A new key for WHO: it signs from now on; the old one stays trusted until `skyfuse keys retire`."""
    fleet = load_fleet()
    if who not in signing.fleet_principals(fleet):
        fail(f"{who!r} is not a principal of this fleet; expected cli or cloud/function, e.g. "
             f"{signing.principal(next(iter(fleet.clouds)), 'scheduler')}")
    out.print(f"new key {signing.rotate(fleet.signing.keys_dir, who)} for {who}; retire the old one after "
              f"signing.max_age_s ({fleet.signing.max_age_s:.0f} s)", highlight=False)


@keys_app.command("retire", cls=Command)
def keys_retire(key_id: Annotated[str, typer.Argument(help="A key id from `skyfuse keys list`.")]) -> None:
    """Stop trusting a key: events signed with it are dead-lettered from now on."""
    try:
        signing.retire(load_fleet().signing.keys_dir, key_id)
    except signing.KeySetupError as exc:
        fail(str(exc))  # an unknown key id is a usage error, not a broken key setup
    out.print(f"retired {key_id}", highlight=False)
