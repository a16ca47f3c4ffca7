"""`kvferry`: serve one daemon, run a deployment, generate, inspect status, check config.

Mistakes a user can make (a bad config file, an unreachable daemon, a daemon that will not start)
end as one line on stderr and exit status 1; wrong usage of a command exits 2.
"""

from __future__ import annotations

import json
import logging
import os
import signal
import sys
from contextlib import contextmanager

import click
import msgspec
import yaml

from kvferry.daemon.cli.api_key import api_key_option, client_api_key
from kvferry.daemon.cli.bench.command import bench
from kvferry.daemon.cli.client import DEFAULT_URL, ClientError, Completion, DaemonClient, daemon_url
from kvferry.daemon.cli.common import (
    CONFIG_PATH,
    SECONDS,
    deployment_option,
    note,
    stop_on_sigterm,
)
from kvferry.daemon.cli.demo import run_demo
from kvferry.daemon.cli.fuzz.command import fuzz
from kvferry.daemon.cli.keys import keys
from kvferry.daemon.cli.launcher import Launcher, LaunchError, describe_exit
from kvferry.daemon.cli.router import router
from kvferry.daemon.cli.soak.command import soak
from kvferry.daemon.cli.status import status
from kvferry.daemon.server.api import CompletionRequest
from kvferry.daemon.server.config import ConfigError, DaemonConfig, Deployment, load
from kvferry.daemon.server.model_fit import check_against

LOG_LEVELS = click.Choice(["debug", "info", "warning", "error"], case_sensitive=False)


class _Commands(click.Group):
    def invoke(self, ctx: click.Context):
        try:
            return super().invoke(ctx)
        except (ConfigError, ClientError, LaunchError) as exc:
            raise click.ClickException(str(exc)) from None


@click.group(cls=_Commands, context_settings={"help_option_names": ["-h", "--help"]})
def main() -> None:
    """KV-cache transfer for disaggregated LLM serving: prefill and decode daemons."""


@main.command()
@click.option("--config", "config_path", required=True, type=CONFIG_PATH, help="Deployment file.")
@click.option("--name", help="Daemon to serve; optional when the file lists only one.")
@click.option("--log-level", type=LOG_LEVELS, default="info", show_default=True)
def serve(config_path: str, name: str | None, log_level: str) -> None:
    """Serve one daemon of a deployment file until SIGTERM or Ctrl-C."""
    daemon = _pick(load(config_path), name, config_path)
    where = (daemon.name or daemon.role).replace("%", "%%")
    os.environ["KVFERRY_LOG_LEVEL"] = log_level.upper()  # rank worker processes inherit it
    logging.basicConfig(
        level=log_level.upper(),
        format=f"%(asctime)s {where} %(levelname)s %(name)s: %(message)s",
        stream=sys.stderr,
    )
    from kvferry.daemon.server.daemon import serve as serve_daemon  # the engine: torch and all

    sys.exit(serve_daemon(daemon))


@main.command()
@deployment_option("Deployment file.")
@click.option(
    "--start-timeout",
    type=SECONDS,
    default=300.0,
    show_default=True,
    help="Seconds each group of daemons (prefill, then decode) has to answer /health.",
)
@click.option(
    "--stop-timeout",
    type=SECONDS,
    default=60.0,
    show_default=True,
    help="Seconds a daemon has to exit after SIGTERM before it gets SIGKILL "
    "(more than its drain_timeout_s).",
)
@click.option("--log-level", type=LOG_LEVELS, help="Passed to every daemon.")
def up(config_path: str, start_timeout: float, stop_timeout: float, log_level: str | None) -> None:
    """Run every daemon and router of a deployment until Ctrl-C or SIGTERM.

    Prefill daemons start first; decode daemons start once every prefill daemon answers
    GET /health, routers once every decode daemon does. Stopping sends SIGTERM to routers first,
    then decode daemons, then prefill. Every daemon and router needs a unique name and a fixed
    http_port. Exits 0 when every one of them exited 0.
    """
    launcher = Launcher.from_file(
        config_path, log_level=log_level, log=note, stop_timeout=stop_timeout
    )
    with _calling_on_signals(launcher.request_stop), launcher:
        launcher.start(start_timeout)
        for child in launcher.children:
            click.echo(f"{child.name}\t{child.role}\t{child.url}")
        note("all daemons ready; Ctrl-C or SIGTERM stops them")
        died = launcher.wait()
        if died is not None:
            note(f"{died.name} {describe_exit(died.returncode)} on its own; stopping the others")
        codes = launcher.stop()
    if died is not None:
        raise click.ClickException(f"{died.name} {describe_exit(codes[died.name])} while running")
    failed = [f"{name} {describe_exit(code)}" for name, code in codes.items() if code != 0]
    if failed:
        raise click.ClickException("; ".join(failed))


class _TokenIds(click.ParamType):
    name = "IDS"

    def convert(self, value, param, ctx) -> list[int]:
        if isinstance(value, list):
            return value
        try:
            ids = [int(part) for part in value.split(",") if part.strip()]
        except ValueError:
            ids = []
        if not ids or min(ids) < 0:
            self.fail(f"{value!r} is not a comma-separated list of token ids", param, ctx)
        return ids


@main.command()
@click.argument("prompt", required=False)
@click.option("--prompt-ids", type=_TokenIds(), help="Token ids instead of text: 1,2,3.")
@click.option("--url", help=f"Decode daemon's HTTP address.  [default: {DEFAULT_URL}]")
@click.option(
    "--config", "config_path", type=CONFIG_PATH, help="Use this file's first decode daemon."
)
@click.option("--max-tokens", type=click.IntRange(min=1), default=32, show_default=True)
@click.option("--temperature", type=click.FloatRange(min=0), default=0.0, show_default=True)
@click.option("--top-p", type=click.FloatRange(0, 1, min_open=True), default=1.0, show_default=True)
@click.option("--seed", type=int, help="Sampling seed, for repeatable sampled output.")
@click.option("--stream/--no-stream", default=True, show_default=True, help="Ask for SSE events.")
@click.option("--json", "as_json", is_flag=True, help="Print only one JSON object at the end.")
@click.option("--timeout", type=SECONDS, default=120.0, show_default=True, help="Seconds.")
@api_key_option()
def generate(
    prompt, prompt_ids, url, config_path, stream, as_json, timeout, api_key_file, **sampling
) -> None:
    """Complete PROMPT (text; - reads stdin) or --prompt-ids on a decode daemon.

    Text is printed as it streams in and a summary line goes to stderr. With --json, stdout gets
    one object instead: text, token_ids, prompt_tokens, finish_reason, ttft_s (time to the first
    event carrying tokens, measured here) and latency_s.
    """
    if (prompt is None) == (prompt_ids is None):
        raise click.UsageError("give exactly one of PROMPT or --prompt-ids")
    if prompt == "-":
        prompt = click.get_text_stream("stdin").read()
    request = CompletionRequest(prompt=prompt_ids or prompt, **sampling)
    out = _TextOut(enabled=not as_json)
    try:
        target, daemon = _decode_target(url, config_path)
        key = client_api_key(api_key_file, daemon)
        with DaemonClient(target, timeout, key) as client:
            completion = client.stream(request, out) if stream else client.complete(request)
        if not stream:
            out(completion.text)
    finally:
        out.end_line()
    if as_json:
        click.echo(json.dumps(msgspec.to_builtins(completion)))
    else:
        click.echo(_completion_summary(completion), err=True)


@main.command()
@deployment_option("Deployment to start (and stop afterwards).")
@click.option("--requests", type=click.IntRange(min=1), default=24, show_default=True)
@click.option("--concurrency", type=click.IntRange(min=1), default=8, show_default=True)
@click.option("--max-tokens", type=click.IntRange(min=1), default=32, show_default=True)
def demo(config_path: str, requests: int, concurrency: int, max_tokens: int) -> None:
    """Start a deployment, generate a few completions and a burst of concurrent requests,
    print a summary (tokens/s, TTFT, KV bytes moved, UCX messages per request), stop."""
    stop_on_sigterm()
    sys.exit(run_demo(config_path, requests, concurrency, max_tokens))


@main.group("config")
def config_group() -> None:
    """Check or show a deployment file."""


@config_group.command("check")
@click.argument("file", type=CONFIG_PATH)
def config_check(file: str) -> None:
    """Validate FILE, including the checks that need each daemon's model (TP against its heads,
    staging ring against one chunk)."""
    deployment = load(file)
    for daemon in deployment.daemons:
        check_against(daemon, _model_config(daemon))
    count, routers = len(deployment.daemons), len(deployment.routers)
    also = f", {routers} router{'' if routers == 1 else 's'}" if routers else ""
    click.echo(f"{file}: ok ({count} daemon{'' if count == 1 else 's'}{also})")


@config_group.command("show")
@click.argument("file", type=CONFIG_PATH)
@click.option("--name", help="Only this daemon.")
def config_show(file: str, name: str | None) -> None:
    """Print FILE as YAML with every default filled in (itself a valid deployment file)."""
    deployment = load(file)
    if name is not None:
        deployment = Deployment(daemons=[_pick(deployment, name, file)])
    click.echo(yaml.safe_dump(msgspec.to_builtins(deployment), sort_keys=False), nl=False)


def _pick(deployment: Deployment, name: str | None, path: str) -> DaemonConfig:
    names = ", ".join(daemon.name or "(unnamed)" for daemon in deployment.daemons)
    if name is None:
        if len(deployment.daemons) == 1:
            return deployment.daemons[0]
        raise click.ClickException(
            f"{path} lists {len(deployment.daemons)} daemons ({names}); pick one with --name"
        )
    matches = [daemon for daemon in deployment.daemons if daemon.name == name]
    if len(matches) != 1:
        found = "no daemon" if not matches else f"{len(matches)} daemons"
        raise click.ClickException(f"{path}: {found} named {name!r} (names: {names})")
    return matches[0]


def _model_config(daemon: DaemonConfig):
    try:
        return daemon.model.model_config()
    except ValueError as exc:
        raise ConfigError(f"{daemon.name or daemon.role}: model: {exc}") from None


def _decode_target(url: str | None, config_path: str | None) -> tuple[str, DaemonConfig | None]:
    """The decode daemon's URL and, with --config, its config (which names its key)."""
    if url is not None and config_path is not None:
        raise click.UsageError("give --url or --config, not both")
    if config_path is None:
        return url or DEFAULT_URL, None
    decode = [daemon for daemon in load(config_path).daemons if daemon.role == "decode"]
    if not decode:
        raise click.ClickException(f"{config_path} lists no decode daemon")
    return daemon_url(decode[0]), decode[0]


def _completion_summary(completion: Completion) -> str:
    ttft = "-" if completion.ttft_s is None else f"{completion.ttft_s:.3f} s"
    return (
        f"[{len(completion.token_ids)} tokens, finish {completion.finish_reason}, "
        f"prompt {completion.prompt_tokens} tokens, ttft {ttft}, "
        f"latency {completion.latency_s:.3f} s]"
    )


class _TextOut:
    """Completion text to stdout as it arrives; ends the line once, however the request ends."""

    def __init__(self, enabled: bool) -> None:
        self.enabled = enabled
        self.wrote = False

    def __call__(self, text: str) -> None:
        if self.enabled and text:
            click.echo(text, nl=False)
            self.wrote = True

    def end_line(self) -> None:
        if self.wrote:
            click.echo()


@contextmanager
def _calling_on_signals(callback):
    """SIGINT and SIGTERM call `callback` instead of ending the process, until the block ends."""
    signals = (signal.SIGINT, signal.SIGTERM)
    previous = {sig: signal.signal(sig, lambda *_: callback()) for sig in signals}
    try:
        yield
    finally:
        for sig, handler in previous.items():
            signal.signal(sig, handler)


main.add_command(bench)
main.add_command(fuzz)
main.add_command(keys)
main.add_command(soak)
main.add_command(status)
main.add_command(router)

if __name__ == "__main__":
    main()
