"""Pieces every `kvferry` command module uses."""

from __future__ import annotations

import signal
import sys
from importlib import resources

import click

SECONDS = click.FloatRange(min=0, min_open=True)
CONFIG_PATH = click.Path(dir_okay=False)
# deploy/local.yaml as installed with the package: `kvferry demo` runs it from any directory
EMBEDDED_DEFAULT = resources.files("kvferry.deploy") / "local.yaml"


def deployment_option(help_text: str):
    """`--config FILE`, the embedded default when absent."""
    return click.option(
        "--config",
        "config_path",
        default=str(EMBEDDED_DEFAULT),
        show_default="the embedded default, deploy/local.yaml",
        type=CONFIG_PATH,
        help=help_text,
    )


def target_deployment(verb: str):
    """`--config FILE` (required) and `--start/--running`: a command that `verb`s either a
    deployment it starts and stops itself, or daemons already running from the file."""

    def decorate(command):
        command = click.option(
            "--start/--running",
            default=True,
            show_default=True,
            help=f"Start the deployment (and stop it after), or {verb} daemons already running "
            "from it.",
        )(command)
        return click.option(
            "--config", "config_path", required=True, type=CONFIG_PATH, help="Deployment file."
        )(command)

    return decorate


def stop_on_sigterm() -> None:
    """SIGTERM unwinds like Ctrl-C, so a deployment this command started is stopped too."""
    signal.signal(signal.SIGTERM, lambda signum, _frame: sys.exit(128 + signum))


def note(line: str) -> None:
    click.echo(line, err=True)
