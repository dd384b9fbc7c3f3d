"""`skyfuse predict`: one call to the local fleet's inference, through its router or one cloud."""
from __future__ import annotations

from pathlib import Path
from typing import Annotated

import typer

from skyfuse import httpclient
from skyfuse.cli.common import FAILURE, Command, app, fail, load_fleet


@app.command(cls=Command)
def predict(
    data: Annotated[str, typer.Option("--data", "-d", help='{"instances": [[...], ...]} as JSON, or @FILE.')],
    cloud: Annotated[str | None, typer.Option("--cloud", help="Call this cloud's endpoint (default: the router, "
                                                              "which follows placement).")] = None,
) -> None:
    """Call the fleet's inference (`skyfuse up` must be running) and print its answer."""
    from skyfuse.dev import local

    endpoints = local.running()
    if not endpoints:
        fail("no fleet is up in this folder: start one with `skyfuse up`", FAILURE)
    if cloud is not None and cloud not in endpoints:
        fail(f"--cloud {cloud!r} has no endpoint; serving clouds: {', '.join(endpoints)}")
    target = endpoints[cloud] if cloud else local.router()
    if not target:
        fail("this fleet runs without a router (skyfuse up --router-port 0): name a cloud with --cloud")
    body = Path(data[1:]).read_bytes() if data.startswith("@") else data.encode()
    answer = httpclient.post_json(f"{target}/predict", body, headers={"x-api-key": local.api_key(load_fleet())},
                                  timeout_s=30)
    print(answer.body.decode())
    if answer.status >= 300:
        raise typer.Exit(FAILURE)
