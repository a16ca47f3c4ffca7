"""The layer rule: imports only go down, `cli → server → engine → model` and
`engine → transport → staging → cuda`, and the CLI entry point imports without torch.

Every module's imports are read from its AST, function-level and `TYPE_CHECKING` ones included:
a deferred import is still an edge between layers. `daemon/` is one flat folder for now, so
`DAEMON_FLOORS` says which floor each of its modules belongs to (issue 11's floor plan).
"""

from __future__ import annotations

import ast
import subprocess
import sys
import textwrap
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
PACKAGES = ("daemon", "transport", "staging", "cuda")

# What each floor may import besides itself: everything below it. The daemon's model floor
# sits beside transport, both above staging (KV layouts, TP head plans).
BELOW = {
    "cli": {"server", "engine", "model", "transport", "staging", "cuda"},
    "server": {"engine", "model", "transport", "staging", "cuda"},
    "engine": {"model", "transport", "staging", "cuda"},
    "model": {"staging", "cuda"},
    "transport": {"staging", "cuda"},
    "staging": {"cuda"},
    "cuda": set(),
}

DAEMON_FLOORS = {
    # model: the model and what it is made of
    "model": "model",
    "model_config": "model",
    "rope": "model",
    "tokenizer": "model",
    "weights": "model",
    # engine: one rank's serving engine, no processes, no HTTP
    "block_manager": "engine",
    "decode_engine": "engine",
    "engine_builder": "engine",
    "group": "engine",
    "prefill_engine": "engine",
    "runner": "engine",
    "sampler": "engine",
    "scheduler": "engine",
    "sequence": "engine",
    # server: the daemon process, its HTTP front, rank processes, their protocol, metrics, config
    "config": "server",
    "http_front": "server",
    "metrics": "server",
    "prefill_probe": "server",
    "prompt_handoff": "server",
    "prompt_intake": "server",
    "prompt_quota": "server",
    "protocol": "server",
    "ranks": "server",
    "request": "server",
    "serve": "server",
    "status": "server",
    "worker": "server",
    # cli: user-facing commands, the HTTP client, launcher, demo, bench and fuzz
    "__init__": "cli",
    "bench": "cli",
    "bench_report": "cli",
    "bench_workload": "cli",
    "cli": "cli",
    "cli_bench": "cli",
    "cli_common": "cli",
    "cli_fuzz": "cli",
    "cli_status": "cli",
    "client": "cli",
    "demo": "cli",
    "fuzz": "cli",
    "fuzz_frames": "cli",
    "fuzz_http": "cli",
    "fuzz_report": "cli",
    "fuzz_targets": "cli",
    "fuzz_values": "cli",
    "fuzz_zmq": "cli",
    "launcher": "cli",
}

# Upward imports that today's flat daemon/ still has; each goes away with the move into
# subpackages (issue 11), not before. (importer, imported), both "package.module".
KNOWN_UPWARD = {
    # The engines return `Progress` and collect `Samples`, which live in the daemon<->rank
    # protocol (server); they become the engine's own outputs module in the move.
    ("daemon.prefill_engine", "daemon.protocol"),
    ("daemon.decode_engine", "daemon.protocol"),
    # The builder takes the cache and scheduler sections of the deployment config (server);
    # the move gives the engine its own config structs, which the deployment config holds.
    ("daemon.engine_builder", "daemon.config"),
}


def _modules() -> list[tuple[str, Path]]:
    """("package.module", path) of every module of the four packages."""
    return [
        (f"{package}.{path.stem}", path)
        for package in PACKAGES
        for path in sorted((ROOT / package).glob("*.py"))
    ]


def _imports(path: Path, package: str) -> list[tuple[int, str]]:
    """(line, "package.module") of each kvferry module `path` imports, anywhere in its AST."""
    found = []
    for node in ast.walk(ast.parse(path.read_text(), str(path))):
        if isinstance(node, ast.Import):
            found += [(node.lineno, alias.name) for alias in node.names]
        elif isinstance(node, ast.ImportFrom):
            if node.level:  # relative: from the importer's own package
                base = f"kvferry.{package}" + (f".{node.module}" if node.module else "")
            else:
                base = node.module or ""
            if base.count(".") >= 2:  # from kvferry.daemon.sequence import Sequence, ...
                found.append((node.lineno, base))
            else:  # from kvferry.daemon import sequence, ...: the names are modules
                found += [(node.lineno, f"{base}.{alias.name}") for alias in node.names]
    return [
        (line, ".".join(name.split(".")[1:3]))
        for line, name in found
        if name.startswith("kvferry.") and name.count(".") >= 2
    ]


def _floor(module: str) -> str:
    """The module's floor; "?" for a daemon module missing from DAEMON_FLOORS."""
    package, name = module.split(".")
    return DAEMON_FLOORS.get(name, "?") if package == "daemon" else package


def _edges() -> list[tuple[str, int, str]]:
    """(importer, line, imported) for every kvferry import between two different modules."""
    return [
        (module, line, imported)
        for module, path in _modules()
        for line, imported in _imports(path, module.split(".")[0])
        if imported != module
    ]


def test_every_daemon_module_has_a_floor():
    daemon = {path.stem for path in (ROOT / "daemon").glob("*.py")}
    assert not daemon - DAEMON_FLOORS.keys(), "put these in DAEMON_FLOORS"
    assert not DAEMON_FLOORS.keys() - daemon, "modules gone; drop them from DAEMON_FLOORS"


def test_imports_only_go_down():
    upward = []
    for module, line, imported in _edges():
        mine, theirs = _floor(module), _floor(imported)
        if "?" in (mine, theirs):
            continue  # test_every_daemon_module_has_a_floor names it
        if theirs == mine or theirs in BELOW[mine] or (module, imported) in KNOWN_UPWARD:
            continue
        path = module.replace(".", "/")
        upward.append(f"{path}.py:{line} ({mine}) imports kvferry.{imported} ({theirs})")
    assert not upward, "imports against the layer rule:\n" + "\n".join(upward)


def test_known_upward_imports_still_exist():
    """An exception that no longer happens comes off the list, so it cannot come back unseen."""
    edges = {(module, imported) for module, _, imported in _edges()}
    assert not KNOWN_UPWARD - edges, "fixed; drop from KNOWN_UPWARD"


def _torch_after(*args: str) -> list[str]:
    """The torch modules loaded by a fresh interpreter that runs `kvferry ARGS`."""
    code = textwrap.dedent(
        f"""
        import sys
        from kvferry.daemon.cli import main
        try:
            main({list(args)!r})
        except SystemExit:
            pass
        print(sorted(m for m in sys.modules if m.split(".")[0] == "torch"))
        """
    )
    done = subprocess.run(
        [sys.executable, "-c", code], capture_output=True, text=True, timeout=60, cwd=ROOT
    )
    assert done.returncode == 0, done.stderr
    return ast.literal_eval(done.stdout.strip().splitlines()[-1])


def test_the_cli_imports_without_torch():
    """Importing the entry point and `kvferry --help` stay fast: no torch."""
    assert _torch_after("--help") == []


def test_config_check_runs_without_torch():
    assert _torch_after("config", "check", "deploy/local.yaml") == []
