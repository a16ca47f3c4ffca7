"""The API key a `kvferry` client presents to a decode daemon's or router's `/v1/*`
(`Authorization: Bearer <key>`), from the first of: `--api-key-file`, the environment variable
KVFERRY_API_KEY, and the source the deployment file names for the daemon (`api_key_file` or
`api_key_env`). The key is read once, held in memory and sent only in that header: never
printed, logged or written to a result file.
"""

from __future__ import annotations

import os

import click

from kvferry.daemon.server.api_key import read_api_key

ENV = "KVFERRY_API_KEY"


def api_key_option():
    """`--api-key-file PATH`."""
    return click.option(
        "--api-key-file",
        type=click.Path(dir_okay=False),
        help=f"File holding the API key to send (else ${ENV}, else what --config names).",
    )


def client_api_key(key_file: str | None, daemon=None) -> str | None:
    """The key to send; `daemon`: the deployment's config of the daemon (or router) talked to,
    whose key source is the last resort. None when no source gives one. ClickException naming
    the source (never the key) when a named source is empty or unreadable."""
    try:
        if key_file is not None:
            return read_api_key(key_file, None)
        if os.environ.get(ENV, "").strip():
            return read_api_key(None, ENV)
        if daemon is not None:
            return read_api_key(daemon.api_key_file, daemon.api_key_env)
    except ValueError as exc:
        raise click.ClickException(f"API key: {exc}") from None
    return None


def bearer(key: str | None) -> dict[str, str]:
    """The header that carries `key`; none without one."""
    return {"Authorization": f"Bearer {key}"} if key else {}
