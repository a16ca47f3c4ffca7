"""`kvferry status` (registered on the main command group): a readable summary of each daemon's
`GET /status`. Any key of an answer may be missing; what is missing prints as `?`."""

from __future__ import annotations

import json
import time

import click

from kvferry.daemon.cli.client import (
    DEFAULT_URL,
    ClientError,
    DaemonClient,
    Unreachable,
    daemon_url,
)
from kvferry.daemon.cli.common import CONFIG_PATH, SECONDS
from kvferry.daemon.server.config import load


@click.command()
@click.option("--url", "urls", multiple=True, help="A daemon's HTTP address; repeatable.")
@click.option("--config", "config_path", type=CONFIG_PATH, help="Every daemon of this file.")
@click.option("--json", "as_json", is_flag=True, help="Print the raw /status objects.")
@click.option("--timeout", type=SECONDS, default=10.0, show_default=True, help="Seconds.")
def status(urls: tuple[str, ...], config_path: str | None, as_json: bool, timeout: float) -> None:
    """Show what daemons are doing: requests, prefill daemons, bootstrap server, rooms, staging
    ring, KV pages, peers.

    Asks --url (default http://127.0.0.1:17000) or every daemon of --config. Exits 1 when any
    daemon does not answer.
    """
    answers, failed = [], False
    for name, url in _targets(urls, config_path):
        try:
            with DaemonClient(url, timeout) as client:
                answer = client.status()
        except ClientError as exc:
            failed = True
            kind = "unreachable" if isinstance(exc, Unreachable) else "error"
            click.echo(f"{name}: {kind} ({exc.reason})", err=True)
            answers.append({"name": name, "url": url, "error": exc.reason})
            continue
        answers.append(answer)
        if not as_json:
            click.echo("\n".join(_status_lines(answer, name, url)))
    if as_json:
        click.echo(json.dumps(answers, indent=2))
    if failed:
        raise click.exceptions.Exit(1)


def _targets(urls: tuple[str, ...], config_path: str | None) -> list[tuple[str, str]]:
    if urls and config_path is not None:
        raise click.UsageError("give --url or --config, not both")
    if config_path is None:
        return [(url, url) for url in urls or (DEFAULT_URL,)]
    daemons = load(config_path).daemons
    return [
        (daemon.name or f"daemons[{i}]", daemon_url(daemon)) for i, daemon in enumerate(daemons)
    ]


def _status_lines(answer: dict, name: str, url: str) -> list[str]:
    """The summary of one /status answer, one line per part of the daemon."""
    requests = answer.get("requests") or {}
    lines = [
        f"{answer.get('name') or name}: {answer.get('role', '?')}, {answer.get('state', '?')}, "
        f"tp={answer.get('tp', '?')}, {url}",
        "  requests: " + ", ".join(f"{key} {value}" for key, value in requests.items()),
    ]
    now = time.time()
    for prefill in answer.get("prefill") or []:
        lines.append(f"  prefill {prefill.get('address', '?')}: " + _prefill(prefill, now))
    if bootstrap := answer.get("bootstrap"):
        counts = ", ".join(f"{key} {value}" for key, value in bootstrap.items() if key != "address")
        lines.append(f"  bootstrap {bootstrap.get('address', '?')}: {counts}")
    for rank in answer.get("ranks") or []:
        lines.append(f"  rank {rank.get('rank', '?')}: " + " | ".join(_rank_parts(rank)))
    return lines


def _prefill(prefill: dict, now: float) -> str:
    """A decode daemon's view of one prefill daemon, from its probe."""
    reachable = prefill.get("reachable")
    if reachable is None and "reachable" in prefill:
        return "not probed yet"
    parts = [{True: "reachable", False: "unreachable"}.get(reachable, "?")]
    if error := prefill.get("last_error"):
        parts.append(f"last error: {error}")
    seen = prefill.get("last_seen")
    if isinstance(seen, (int, float)):
        parts.append(f"last seen {max(now - seen, 0):.1f} s ago")
    elif "last_seen" in prefill:
        parts.append("never seen")
    return " | ".join(parts)


def _rank_parts(rank: dict) -> list[str]:
    parts = []
    if (rooms := rank.get("rooms")) is not None:
        busy = [f"{state} {count}" for state, count in rooms.items() if count]
        parts.append("rooms " + (", ".join(busy) or "none"))
    if (ring := rank.get("ring")) is not None:
        used, cap, high = (
            ring.get(k) for k in ("used_bytes", "capacity_bytes", "high_water_bytes")
        )
        parts.append(f"ring {_size(used)} / {_size(cap)} (high {_size(high)})")
    if (pages := rank.get("kv_pages")) is not None:
        parts.append(f"kv pages {pages.get('used', '?')}/{pages.get('total', '?')}")
    if (peers := rank.get("peers")) is not None:
        parts.append("peers " + (", ".join(map(str, peers)) or "none"))
    if (pid := rank.get("pid")) is not None:
        parts.append(f"pid {pid}")
    if (control := rank.get("control_address")) is not None:
        parts.append(f"control {control}")
    return parts


def _size(size) -> str:
    if not isinstance(size, (int, float)):
        return "?"
    for unit in ("B", "KiB", "MiB"):
        if size < 1024:
            return f"{size:.0f} {unit}" if unit == "B" else f"{size:.1f} {unit}"
        size /= 1024
    return f"{size:.1f} GiB"
