"""The layer rule: imports only go down, `cli → router → server → engine → model` and
`engine → transport → staging → cuda`, and the CLI entry point imports without torch.

Every module's imports are read from its AST, function-level and `TYPE_CHECKING` ones included:
a deferred import is still an edge between layers. A module's floor is its package, or for
`daemon/` its subpackage (`daemon/engine/prefill.py` is on the engine floor).
"""

from __future__ import annotations

import ast
import subprocess
import sys
import textwrap
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
PACKAGES = ("daemon", "transport", "staging", "cuda")
DAEMON_FLOORS = ("cli", "router", "server", "engine", "model")

# What each floor may import besides itself: everything below it. The daemon's model floor
# sits beside transport, both above staging (KV layouts, TP head plans).
BELOW = {
    "cli": {"router", "server", "engine", "model", "transport", "staging", "cuda"},
    "router": {"server", "engine", "model", "transport", "staging", "cuda"},
    "server": {"engine", "model", "transport", "staging", "cuda"},
    "engine": {"model", "transport", "staging", "cuda"},
    "model": {"staging", "cuda"},
    "transport": {"staging", "cuda"},
    "staging": {"cuda"},
    "cuda": set(),
}


def _modules() -> list[tuple[str, Path]]:
    """("kvferry.package.module", path) of every module of the four packages, subpackages
    included (a package's `__init__.py` is the package itself)."""
    found = []
    for package in PACKAGES:
        for path in sorted((ROOT / package).rglob("*.py")):
            parts = [package, *path.relative_to(ROOT / package).with_suffix("").parts]
            if parts[-1] == "__init__":
                parts.pop()
            found.append((".".join(["kvferry", *parts]), path))
    return found


def _imports(path: Path, module: str) -> list[tuple[int, str]]:
    """(line, "kvferry.…") of each kvferry module or package `path` imports, anywhere in its
    AST; `from a.b import c` counts as importing `a.b.c` when that is a module, else `a.b`."""
    known = {name for name, _ in _modules()}
    package = module if path.name == "__init__.py" else module.rpartition(".")[0]
    found = []
    for node in ast.walk(ast.parse(path.read_text(), str(path))):
        if isinstance(node, ast.Import):
            found += [(node.lineno, alias.name) for alias in node.names]
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:  # relative: from the importer's own package, or above it
                anchor = package.rsplit(".", node.level - 1)[0] if node.level > 1 else package
                base = f"{anchor}.{base}" if base else anchor
            for alias in node.names:
                name = f"{base}.{alias.name}"
                found.append((node.lineno, name if name in known else base))
    return [(line, name) for line, name in found if name.startswith("kvferry.")]


def _floor(module: str) -> str:
    """The module's floor: its package, or its subpackage of daemon; "?" for a daemon module
    outside the four floors."""
    parts = module.split(".")
    if parts[1] != "daemon":
        return parts[1]
    return parts[2] if len(parts) > 2 and parts[2] in DAEMON_FLOORS else "?"


def _edges() -> list[tuple[str, Path, int, str]]:
    """(importer, its path, line, imported) for every kvferry import between two modules."""
    return [
        (module, path, line, imported)
        for module, path in _modules()
        for line, imported in _imports(path, module)
        if imported != module
    ]


def test_every_daemon_module_is_on_a_floor():
    loose = [
        str(path.relative_to(ROOT))
        for module, path in _modules()
        if module != "kvferry.daemon" and _floor(module) == "?"
    ]
    assert not loose, f"daemon modules outside {DAEMON_FLOORS}: {loose}"


def test_imports_only_go_down():
    upward = []
    for module, path, line, imported in _edges():
        mine, theirs = _floor(module), _floor(imported)
        if imported == "kvferry.daemon" or module == "kvferry.daemon":
            theirs = mine  # the package's own docstring-only __init__
        if theirs == mine or theirs in BELOW.get(mine, ()):
            continue
        where = path.relative_to(ROOT)
        upward.append(f"{where}:{line} ({mine}) imports {imported} ({theirs})")
    assert not upward, "imports against the layer rule:\n" + "\n".join(upward)


def test_the_rule_sees_an_upward_import(tmp_path, monkeypatch):
    """The checker itself: an engine module importing the server is caught, named by line."""
    engine = tmp_path / "daemon" / "engine"
    engine.mkdir(parents=True)
    (engine / "bad.py").write_text("import os\nfrom kvferry.daemon.server import metrics\n")
    monkeypatch.setattr(sys.modules[__name__], "ROOT", tmp_path)
    found = [
        (str(path.relative_to(tmp_path)), line, _floor(imported))
        for module, path, line, imported in _edges()
    ]
    assert found == [("daemon/engine/bad.py", 2, "server")]


def _torch_after(*args: str) -> list[str]:
    """The torch modules loaded by a fresh interpreter that runs `kvferry ARGS`."""
    code = textwrap.dedent(
        f"""
        import sys
        from kvferry.daemon.cli.main import main
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
