"""The campaign's table machinery: reading a stage's JSON, one row of the table (a figure
against its target), printing the rows."""

from __future__ import annotations

import json
from pathlib import Path


def read_json(path: Path) -> dict | None:
    try:
        return json.loads(path.read_text())
    except (OSError, ValueError):
        return None


class Row:
    """One line of the summary: a measured figure against its target (None: reported only)."""

    def __init__(self, what: str, value: float | None, target: float | None, unit: str = "x",
                 higher_is_better: bool = True, detail: str = "") -> None:  # fmt: skip
        self.what, self.value, self.target, self.unit = what, value, target, unit
        self.higher, self.detail = higher_is_better, detail

    @property
    def verdict(self) -> str:
        if self.value is None:
            return "not measured"
        if self.target is None:
            return "reported"
        met = self.value >= self.target if self.higher else self.value <= self.target
        return "met" if met else "MISSED"

    def cells(self) -> list[str]:
        fmt = (lambda v: f"{v:.0%}") if self.unit == "%" else (lambda v: f"{v:.3g}{self.unit}")
        target = "" if self.target is None else ("≥ " if self.higher else "≤ ") + fmt(self.target)
        value = "-" if self.value is None else fmt(self.value)
        return [self.what, value, target, self.verdict, self.detail]

    def as_dict(self) -> dict:
        return {
            "what": self.what,
            "value": self.value,
            "target": self.target,
            "unit": self.unit,
            "verdict": self.verdict,
            "detail": self.detail,
        }


def print_table(rows: list[Row]) -> None:
    header = ["figure", "measured", "target", "verdict", "detail"]
    cells = [header, *(row.cells() for row in rows)]
    widths = [max(len(c[i]) for c in cells) for i in range(len(header))]
    print()
    for line in cells:
        print("  ".join(cell.ljust(width) for cell, width in zip(line, widths, strict=True)))
