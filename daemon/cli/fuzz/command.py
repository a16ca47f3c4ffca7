"""`kvferry fuzz` (registered on the main command group)."""

from __future__ import annotations

import click

from kvferry.daemon.cli.common import SECONDS, note, stop_on_sigterm, target_deployment
from kvferry.daemon.cli.fuzz.report import families, problems, table, write_json
from kvferry.daemon.cli.fuzz.run import SOCKET_KINDS, FuzzError, FuzzSpec, run_fuzz
from kvferry.daemon.cli.launcher import Launcher, describe_exit
from kvferry.daemon.server.config import load

KINDS = click.Choice(SOCKET_KINDS)


@click.command()
@target_deployment("fuzz")
@click.option(
    "--frames", type=click.IntRange(min=1), default=2000, show_default=True, help="Per socket."
)
@click.option("--seed", type=int, default=0, show_default=True, help="Same seed, same frames.")
@click.option("--kind", "kinds", multiple=True, type=KINDS, help="Only these sockets; repeatable.")
@click.option("--http-timeout", type=SECONDS, default=0.25, show_default=True, help="Per request.")
@click.option("--max-fd-growth", type=click.IntRange(min=0), default=64, show_default=True)
@click.option("--max-thread-growth", type=click.IntRange(min=0), default=16, show_default=True)
@click.option("--max-rss-growth-mb", type=click.IntRange(min=0), default=200, show_default=True)
@click.option("--json", "json_path", type=click.Path(dir_okay=False), help="Write the figures.")
def fuzz(config_path, start, json_path, kinds, http_timeout, max_rss_growth_mb, **spec) -> None:
    """Send --frames hostile frames to every listening socket of a deployment (bootstrap,
    each rank's control socket, each daemon's and router's HTTP port), then check that every
    daemon, router and rank process is alive, /health is ok, a greedy completion equals the
    one taken before, no internal error was counted, and fds, threads and RSS grew within the
    bounds. Prints the figures; exits 1 on any problem.
    See docs/reliability.md."""
    stop_on_sigterm()
    spec = FuzzSpec(
        kinds=tuple(kinds) or SOCKET_KINDS,
        http_timeout_s=http_timeout,
        max_rss_growth_bytes=max_rss_growth_mb << 20,
        **spec,
    )
    deployment, codes = load(config_path), {}
    try:
        if start:
            with Launcher.from_file(config_path, log=note) as launcher:
                launcher.start(300.0)
                result = run_fuzz(deployment, spec, log=note)
                codes = launcher.stop()
        else:
            result = run_fuzz(deployment, spec, log=note)
    except FuzzError as exc:
        raise click.ClickException(str(exc)) from None
    click.echo(table(result))
    click.echo(families(result))
    if json_path is not None:
        write_json(result, json_path)
    click.echo(problems(result), err=not result.ok)
    failed = [f"{name} {describe_exit(code)}" for name, code in codes.items() if code != 0]
    if failed:
        click.echo("stopping: " + "; ".join(failed), err=True)
    if not result.ok or failed:
        raise click.exceptions.Exit(1)
