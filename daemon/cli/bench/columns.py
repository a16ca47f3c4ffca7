"""Aligned text columns under grouped headers: the layout of `kvferry bench`'s table."""

from __future__ import annotations


def format_table(header: list[tuple[str, str]], rows: list[list[str]]) -> str:
    """Aligned columns: the first left, the others right. `header` is (group, name) per column;
    a run of columns with the same non-empty group gets the group's name on a line above."""
    widths = [max(len(name), *(len(row[i]) for row in rows)) for i, (_, name) in enumerate(header)]
    spans = _group_spans([group for group, _ in header])
    for group, start, end in spans:  # widen a span's last column to fit its group's name
        room = sum(widths[start:end]) + 2 * (end - start - 1)
        widths[end - 1] += max(0, len(group) - room)
    lines = []
    if spans:
        lines.append(_group_line(spans, widths))
    for cells in [[name for _, name in header], *rows]:
        parts = [cell.rjust(width) for cell, width in zip(cells, widths, strict=True)]
        parts[0] = cells[0].ljust(widths[0])  # the point's name
        lines.append("  ".join(parts).rstrip())
    return "\n".join(lines)


def _group_spans(groups: list[str]) -> list[tuple[str, int, int]]:
    spans: list[tuple[str, int, int]] = []
    for i, group in enumerate(groups):
        if spans and spans[-1][0] == group and spans[-1][2] == i:
            spans[-1] = (group, spans[-1][1], i + 1)
        elif group:
            spans.append((group, i, i + 1))
    return spans


def _group_line(spans: list[tuple[str, int, int]], widths: list[int]) -> str:
    line = ""
    for group, start, end in spans:
        left = sum(widths[:start]) + 2 * start
        room = sum(widths[start:end]) + 2 * (end - start - 1)
        line = line.ljust(left) + group.center(room)
    return line.rstrip()
