"""One name, one meaning: no public class name is defined in two modules of the product."""

import ast
from collections import defaultdict
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
PACKAGES = ("daemon", "transport", "staging", "cuda")


def _classes() -> dict[str, list[str]]:
    """Public class name -> the modules (paths) that define it, top level or nested."""
    found = defaultdict(list)
    for package in PACKAGES:
        for path in sorted((ROOT / package).rglob("*.py")):
            for node in ast.walk(ast.parse(path.read_text(), str(path))):
                if isinstance(node, ast.ClassDef) and not node.name.startswith("_"):
                    found[node.name].append(str(path.relative_to(ROOT)))
    return found


def test_no_public_class_name_has_two_meanings():
    twice = {name: paths for name, paths in _classes().items() if len(paths) > 1}
    assert not twice, f"rename one of each: {twice}"


def test_the_scan_sees_the_classes():
    classes = _classes()
    assert classes["CompletionRequest"] == ["daemon/server/api.py"]
    assert classes["Failure"] == ["transport/failure.py"]
