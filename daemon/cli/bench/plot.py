"""`kvferry bench plot`: result files of `kvferry bench --out` read back and drawn, output
throughput and median TTFT against concurrency (or request rate), one line per file."""

from __future__ import annotations

import json
import math
from pathlib import Path

from kvferry.daemon.cli.bench.workload import BenchError

_PLOTTED = {"mode", "value", "output_throughput", "ttft_ms"}


def read_result(path: str | Path) -> dict:
    """A result file of `kvferry bench --out`; BenchError when it is not one."""
    try:
        result = json.loads(Path(path).read_text())
    except (OSError, ValueError) as exc:
        raise BenchError(f"{path}: cannot read a result file: {exc}") from None
    if not isinstance(result, dict) or not isinstance(result.get("points"), list):
        raise BenchError(f"{path}: not a kvferry bench result (no list of points)")
    for point in result["points"]:
        if not isinstance(point, dict) or not _PLOTTED.issubset(point):
            raise BenchError(f"{path}: a point lacks one of {sorted(_PLOTTED)}")
    return result


def plot(paths: list[str], out: str) -> None:
    """Output throughput and median TTFT against concurrency (or request rate), one line per
    result file, labelled with its --label (else its file name), into the PNG `out`."""
    plot_results([(Path(path).stem, read_result(path)) for path in paths], out)


def plot_results(results: list[tuple[str, dict]], out: str) -> None:
    """As `plot`, for results already read: (name when it has no label, result)."""
    import matplotlib

    matplotlib.use("Agg")  # no display
    import matplotlib.pyplot as plt

    modes = {p.get("mode") for _, result in results for p in result["points"]}
    xlabel = "concurrency" if modes == {"concurrency"} else "request rate (req/s)"
    if len(modes) > 1:
        xlabel = "concurrency / request rate"
    fig, (top, bottom) = plt.subplots(2, 1, figsize=(7, 8), sharex=True)
    for stem, result in results:
        points = sorted(result["points"], key=lambda p: p["value"])
        xs = [p["value"] for p in points]
        label = result.get("label") or stem
        top.plot(xs, [p["output_throughput"] for p in points], marker="o", label=label)
        ttft = [p["ttft_ms"].get("median") for p in points]
        bottom.plot(xs, [math.nan if t is None else t for t in ttft], marker="o", label=label)
    top.set(ylabel="output tokens/s", title="throughput")
    bottom.set(ylabel="TTFT median (ms)", xlabel=xlabel, title="time to first token")
    for ax in (top, bottom):
        ax.grid(True, alpha=0.3)
        ax.legend()
    _x_ticks(bottom, sorted({p["value"] for _, result in results for p in result["points"]}))
    fig.tight_layout()
    fig.savefig(out, format="png")
    plt.close(fig)


def _x_ticks(ax, xs: list[float]) -> None:
    """A tick at every measured point; a log scale when they span a factor of 8 or more
    (a sweep like 1,4,16,64)."""
    if xs and xs[0] > 0 and xs[-1] / xs[0] >= 8:
        ax.set_xscale("log", base=2)
    ax.set_xticks(xs, [f"{x:g}" for x in xs])
    ax.minorticks_off()
