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


def stop_on_sigterm() -> None:
    """SIGTERM unwinds like Ctrl-C, so a deployment this command started is stopped too."""
    signal.signal(signal.SIGTERM, lambda signum, _frame: sys.exit(128 + signum))


def note(line: str) -> None:
    click.echo(line, err=True)
