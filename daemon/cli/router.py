"""`kvferry router`: serve one router of a deployment file (`daemon/router/`, docs/fleet.md)."""

from __future__ import annotations

import logging
import sys

import click

from kvferry.daemon.cli.common import CONFIG_PATH
from kvferry.daemon.server.config import Deployment, RouterConfig, load

LOG_LEVELS = click.Choice(["debug", "info", "warning", "error"], case_sensitive=False)


@click.command()
@click.option("--config", "config_path", required=True, type=CONFIG_PATH, help="Deployment file.")
@click.option("--name", help="Router to serve; optional when the file lists only one.")
@click.option("--log-level", type=LOG_LEVELS, default="info", show_default=True)
def router(config_path: str, name: str | None, log_level: str) -> None:
    """Serve one router of a deployment file until SIGTERM or Ctrl-C.

    The router answers the decode daemons' OpenAI API (/v1/completions, /v1/chat/completions,
    /v1/models) and sends each request to the least-loaded healthy decode daemon of its
    `targets`, trying another when one fails before any byte of its answer went out.
    """
    config = pick_router(load(config_path), name, config_path)
    where = (config.name or "router").replace("%", "%%")
    logging.basicConfig(
        level=log_level.upper(),
        format=f"%(asctime)s {where} %(levelname)s %(name)s: %(message)s",
        stream=sys.stderr,
    )
    from kvferry.daemon.router.server import serve  # uvicorn, starlette, aiohttp: only here

    sys.exit(serve(config))


def pick_router(deployment: Deployment, name: str | None, path: str) -> RouterConfig:
    """The router named `name` in the file (the only one when `name` is None)."""
    routers = deployment.routers
    names = ", ".join(r.name or "(unnamed)" for r in routers) or "none"
    if name is None:
        if len(routers) == 1:
            return routers[0]
        raise click.ClickException(
            f"{path} lists {len(routers)} routers ({names}); "
            + ("pick one with --name" if routers else "add one under `routers:`")
        )
    matches = [r for r in routers if r.name == name]
    if len(matches) != 1:
        found = "no router" if not matches else f"{len(matches)} routers"
        raise click.ClickException(f"{path}: {found} named {name!r} (routers: {names})")
    return matches[0]
