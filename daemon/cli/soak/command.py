"""`kvferry soak` (registered on the main command group)."""

from __future__ import annotations

import click

from kvferry.daemon.cli.common import SECONDS, note, stop_on_sigterm, target_deployment
from kvferry.daemon.cli.launcher import Launcher, describe_exit
from kvferry.daemon.cli.soak.load import LoadSpec
from kvferry.daemon.cli.soak.report import Bounds, table, write_json
from kvferry.daemon.cli.soak.run import SoakError, SoakSpec, run_soak
from kvferry.daemon.server.config import load

RANGE = click.IntRange(min=1)


@click.command()
@target_deployment("soak")
@click.option("--duration", type=SECONDS, default=600.0, show_default=True, help="Seconds.")
@click.option("--workers", type=RANGE, default=4, show_default=True, help="Requests in flight.")
@click.option("--prompt-len", type=(RANGE, RANGE), default=(1, 200), show_default=True)
@click.option("--output-len", type=(RANGE, RANGE), default=(1, 64), show_default=True)
@click.option("--stream-ratio", type=click.FloatRange(0, 1), default=0.5, show_default=True)
@click.option("--abort-ratio", type=click.FloatRange(0, 1), default=0.05, show_default=True)
@click.option("--restart", multiple=True, help="A daemon to restart in turn; repeatable.")
@click.option("--restart-every", type=SECONDS, default=180.0, show_default=True, help="Seconds.")
@click.option("--grace", type=SECONDS, default=15.0, show_default=True, help="See the docs.")
@click.option("--timeout", type=SECONDS, default=120.0, show_default=True, help="Per request.")
@click.option("--seed", type=int, default=0, show_default=True)
@click.option("--max-fd-growth", type=click.IntRange(min=0), default=64, show_default=True)
@click.option("--max-thread-growth", type=click.IntRange(min=0), default=16, show_default=True)
@click.option("--max-rss-growth-mb", type=click.IntRange(min=0), default=200, show_default=True)
@click.option("--json", "json_path", type=click.Path(dir_okay=False), help="Write the figures.")
def soak(config_path, start, json_path, **options) -> None:
    """Mixed load on a deployment for --duration seconds (prompt and output lengths drawn from
    the ranges, streamed or not, some aborted by their client), restarting the --restart daemons
    in turn every --restart-every seconds; then reports requests served, failures by kind
    (injected by a restart or not) and every process's RSS, fds and threads at its start and
    the end. Exits 1 on a failure not injected, a process gone, or growth past the bounds. See
    docs/reliability.md."""
    stop_on_sigterm()
    deployment, spec, codes = load(config_path), _spec(**options), {}
    try:
        if start:
            with Launcher.from_file(config_path, log=note) as launcher:
                launcher.start(300.0)
                result = run_soak(deployment, spec, launcher, note)
                codes = launcher.stop()
        else:
            result = run_soak(deployment, spec, None, note)
    except SoakError as exc:
        raise click.ClickException(str(exc)) from None
    click.echo(table(result))
    if json_path is not None:
        write_json(result, json_path)
    failed = [f"{name} {describe_exit(code)}" for name, code in codes.items() if code != 0]
    for line in result.problems + [f"stopping: {'; '.join(failed)}"] * bool(failed):
        click.echo(f"PROBLEM: {line}", err=True)
    if not result.ok or failed:
        raise click.exceptions.Exit(1)


def _spec(**o) -> SoakSpec:
    load_spec = LoadSpec(
        duration_s=o["duration"],
        workers=o["workers"],
        prompt_len=o["prompt_len"],
        output_len=o["output_len"],
        stream_ratio=o["stream_ratio"],
        abort_ratio=o["abort_ratio"],
        timeout_s=o["timeout"],
        seed=o["seed"],
    )
    bounds = Bounds(
        fds=o["max_fd_growth"],
        threads=o["max_thread_growth"],
        rss_bytes=o["max_rss_growth_mb"] << 20,
    )
    return SoakSpec(
        load=load_spec,
        restart=tuple(o["restart"]),
        restart_every_s=o["restart_every"],
        grace_s=o["grace"],
        bounds=bounds,
    )
