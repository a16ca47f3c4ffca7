"""Helpers of the CLI and launcher tests: deployment files, free ports, invoking `kvferry`."""

from __future__ import annotations

from pathlib import Path

import yaml
from click.testing import CliRunner

from kvferry.daemon.cli import main


def write_yaml(tmp_path: Path, raw: dict, name: str = "deploy.yaml") -> str:
    path = tmp_path / name
    path.write_text(yaml.safe_dump(raw))
    return str(path)


def two_daemons(prefill_port: int, decode_port: int) -> dict:
    return {
        "daemons": [
            {"role": "prefill", "name": "prefill-0", "http_port": prefill_port},
            {
                "role": "decode",
                "name": "decode-0",
                "http_port": decode_port,
                "prefill": ["tcp://127.0.0.1:1"],
            },
        ]
    }


def invoke(*args: str):
    return CliRunner().invoke(main, list(args))


def one_error_line(result) -> str:
    assert result.exit_code == 1, result.output
    assert "Traceback" not in result.output
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1, lines
    return lines[0]
