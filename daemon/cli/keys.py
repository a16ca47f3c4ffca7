"""`kvferry keys generate DIR`: the deployment's CURVE key pair for the bootstrap and control
sockets (the daemons' `security.curve_key_file`)."""

from __future__ import annotations

import click

from kvferry.transport import curve


@click.group("keys")
def keys() -> None:
    """ZeroMQ CURVE keys of a deployment."""


@keys.command("generate")
@click.argument("directory", type=click.Path(file_okay=False))
def generate(directory: str) -> None:
    """Write a new key pair into DIRECTORY (mode 0600); print the file's path and public key."""
    try:
        path = curve.generate(directory)
    except (OSError, curve.KeyFileError) as exc:
        raise click.ClickException(str(exc)) from None
    public = curve.load(path).public.decode()
    click.echo(f"{path}\npublic key {public}")
    click.echo("copy the file to every host of the deployment; set security.curve_key_file")
