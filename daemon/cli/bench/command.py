"""`kvferry bench` and `kvferry bench plot` (registered on the main command group)."""

from __future__ import annotations

from pathlib import Path

import click
import msgspec

from kvferry.daemon.cli.api_key import api_key_option, client_api_key
from kvferry.daemon.cli.bench.lines import first_wave_lines, gc_lines, rss_lines
from kvferry.daemon.cli.bench.plot import plot, plot_results, read_result
from kvferry.daemon.cli.bench.report import table
from kvferry.daemon.cli.bench.run import BenchSpec, run_bench, run_deployment, write_result
from kvferry.daemon.cli.bench.timeline import stage_table, write_trace
from kvferry.daemon.cli.bench.workload import BenchError
from kvferry.daemon.cli.client import DEFAULT_URL
from kvferry.daemon.cli.common import CONFIG_PATH, SECONDS, note, stop_on_sigterm
from kvferry.daemon.cli.launcher import describe_exit


class _Numbers(click.ParamType):
    """A comma-separated list of positive numbers: 1,4,16."""

    name = "N,N,..."

    def __init__(self, kind: type) -> None:
        self.kind = kind

    def convert(self, value, param, ctx) -> tuple:
        if isinstance(value, tuple):
            return value
        try:
            numbers = tuple(self.kind(part) for part in value.split(",") if part.strip())
        except ValueError:
            numbers = ()
        if not numbers or min(numbers) <= 0:
            self.fail(f"{value!r} is not a comma-separated list of positive numbers", param, ctx)
        return numbers


_COUNT = click.IntRange(min=1)


@click.group(invoke_without_command=True)
@click.option("--url", help=f"Decode daemon to load.  [default: {DEFAULT_URL}]")
@click.option(
    "--metrics-url", "metrics_urls", multiple=True, help="Another daemon to scrape; repeatable."
)
@click.option(
    "--config", "config_path", type=CONFIG_PATH, help="Start this deployment, then stop it."
)
@click.option(
    "--concurrency", type=_Numbers(int), help="Points: requests in flight.  [default: 1,4,16]"
)
@click.option("--request-rate", type=_Numbers(float), help="Points: Poisson arrivals, req/s.")
@click.option(
    "--max-concurrency", type=_COUNT, default=256, show_default=True, help="In flight, at most."
)
@click.option("--num-requests", type=_COUNT, default=64, show_default=True, help="Per point.")
@click.option(
    "--warmup", type=click.IntRange(min=0), default=4, show_default=True, help="Before each point."
)
@click.option("--input-len", type=_COUNT, default=256, show_default=True, help="Prompt tokens.")
@click.option("--output-len", type=_COUNT, default=64, show_default=True, help="Tokens to make.")
@click.option(
    "--range-ratio",
    type=click.FloatRange(0, 1),
    default=0.5,
    show_default=True,
    help="Lengths are uniform in [len * ratio, len].",
)
@click.option("--dataset", type=click.Path(dir_okay=False), help="ShareGPT-style JSON file.")
@click.option("--vocab", type=_COUNT, help="Prompt ids in [0, N).  [model's, else 256]")
@click.option("--seed", type=int, default=0, show_default=True)
@click.option("--timeout", type=SECONDS, default=300.0, show_default=True, help="Per request, s.")
@click.option(
    "--idle",
    "idle_s",
    type=click.FloatRange(min=0),
    default=5.0,
    show_default=True,
    help="Seconds of idle CPU measured before the first point (0: skip).",
)
@api_key_option()
@click.option("--label", help="Name of this run in the JSON and in plots.")
@click.option("--out", type=click.Path(dir_okay=False), help="Write the full results as JSON.")
@click.option(
    "--trace",
    "trace_path",
    type=click.Path(dir_okay=False),
    help="Write each request's stage timeline here, one JSON line per request.",
)
@click.option(
    "--plot",
    "plot_path",
    type=click.Path(dir_okay=False),
    help="Draw this run (and any --compare files) into this PNG.",
)
@click.option(
    "--compare",
    multiple=True,
    type=click.Path(exists=True, dir_okay=False),
    help="An earlier --out file to draw next to this run (repeatable; needs --plot).",
)
@click.pass_context
def bench(
    ctx,
    url,
    metrics_urls,
    config_path,
    concurrency,
    request_rate,
    out,
    trace_path,
    plot_path,
    compare,
    api_key_file,
    **load,
) -> None:
    """Load a decode daemon, sweeping concurrency or request rate; print one row per point.

    Each point sends its warm-up requests, then --num-requests streamed, greedy requests, and
    reports throughput, TTFT, inter-token and end-to-end latency, and what the daemons' metrics
    say crossed the data plane (scraped before and after). `kvferry bench plot` draws result
    files. See docs/bench.md.
    """
    if ctx.invoked_subcommand is not None:
        given = [p.opts[0] for p in ctx.command.params if _given(ctx, p.name)]
        if given:
            raise click.UsageError(f"{', '.join(given)} cannot go with `bench plot`")
        return
    stop_on_sigterm()
    if url is not None and config_path is not None:
        raise click.UsageError("give --url or --config, not both")
    if concurrency and request_rate:
        raise click.UsageError("give --concurrency or --request-rate, not both")
    if compare and plot_path is None:
        raise click.UsageError("--compare needs --plot")
    load["timeout_s"] = load.pop("timeout")
    try:
        earlier = [(Path(file).stem, read_result(file)) for file in compare]  # checked up front
        concurrency = concurrency or (() if request_rate else (1, 4, 16))
        spec = BenchSpec(concurrency=concurrency, request_rate=request_rate or (), **load)
        key = client_api_key(api_key_file)  # else, with --config, what the file names
        if config_path is None:
            target = url or DEFAULT_URL
            result, codes = run_bench(spec, target, metrics_urls, api_key=key), {}
        else:
            result, codes = run_deployment(spec, config_path, metrics_urls, log=note, api_key=key)
    except BenchError as exc:
        raise click.ClickException(str(exc)) from None
    click.echo(table(result.points))
    if result.idle_cpu_s_per_min:
        idle = ", ".join(f"{r} {s:.3f}" for r, s in sorted(result.idle_cpu_s_per_min.items()))
        click.echo(f"idle ranks' CPU, seconds per minute: {idle}")
    stages = stage_table(result.points)
    if stages:
        click.echo(stages)
    for line in first_wave_lines(result.points):
        click.echo(line)
    for line in [*rss_lines(result.points), *gc_lines(result.points)]:
        click.echo(line)
    if trace_path is not None:
        write_trace(result, trace_path)
    if out is not None:
        write_result(result, out)
    if plot_path is not None:
        _plot(result, earlier, plot_path)
    failed = [f"{name} {describe_exit(code)}" for name, code in codes.items() if code != 0]
    if failed:
        raise click.ClickException("; ".join(failed))


@bench.command("plot")
@click.argument("files", nargs=-1, required=True, type=click.Path(exists=True, dir_okay=False))
@click.option("--out", required=True, type=click.Path(dir_okay=False), help="PNG to write.")
def bench_plot(files: tuple[str, ...], out: str) -> None:
    """Draw output throughput and median TTFT against concurrency (or request rate) for one or
    several `kvferry bench --out` FILES, one line each, named by their --label."""
    try:
        plot(list(files), out)
    except BenchError as exc:
        raise click.ClickException(str(exc)) from None
    click.echo(out)


def _plot(result, earlier: list[tuple[str, dict]], path: str) -> None:
    """This run's points and the --compare files' on one chart."""
    plot_results([("this run", msgspec.to_builtins(result)), *earlier], path)
    click.echo(path)


def _given(ctx: click.Context, name: str) -> bool:
    return ctx.get_parameter_source(name) not in (None, click.core.ParameterSource.DEFAULT)
