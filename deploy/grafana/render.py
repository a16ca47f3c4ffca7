"""Draw deploy/grafana/kvferry.json's panels from a live Prometheus, without Grafana: each
panel's queries over a time range (`/api/v1/query_range`), one chart per panel, in one PNG.

    python deploy/grafana/render.py --prometheus http://127.0.0.1:9090 --minutes 10 --out dash.png

docs/img/dashboard.png is drawn so, over a `kvferry bench` run (docs/deploy.md).
"""

from __future__ import annotations

import argparse
import json
import math
import re
import time
import urllib.error
import urllib.parse
import urllib.request
from pathlib import Path

DASHBOARD = Path(__file__).with_name("kvferry.json")


def panels(path: Path = DASHBOARD) -> list[dict]:
    """The dashboard's panels: title, unit and their targets' `expr` and `legendFormat`."""
    return [
        {
            "title": p["title"],
            "unit": p["fieldConfig"]["defaults"].get("unit", ""),
            "targets": [(t["expr"], t.get("legendFormat", "")) for t in p["targets"]],
        }
        for p in json.loads(path.read_text())["panels"]
    ]


def api(prometheus: str, endpoint: str, timeout_s: float = 30, **params) -> dict:
    """One Prometheus HTTP API call; its `data`, or ValueError with Prometheus' error."""
    url = f"{prometheus}/api/v1/{endpoint}?{urllib.parse.urlencode(params)}"
    try:
        with urllib.request.urlopen(url, timeout=timeout_s) as answer:
            body = json.load(answer)
    except urllib.error.HTTPError as exc:
        body = json.load(exc)
    if body.get("status") != "success":
        raise ValueError(f"{params.get('query')!r}: {body.get('errorType')}: {body.get('error')}")
    return body["data"]


def legend(form: str, labels: dict) -> str:
    """Grafana's `{{label}}` legend format filled from a series' labels."""
    return re.sub(r"\{\{\s*(\w+)\s*\}\}", lambda m: labels.get(m.group(1), ""), form) or str(labels)


def draw(prometheus: str, start: float, end: float, out: Path, step_s: float = 5) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    shown = panels()
    rows = math.ceil(len(shown) / 2)
    fig, axes = plt.subplots(rows, 2, figsize=(14, 2.6 * rows), squeeze=False)
    for ax, panel in zip(axes.flat, shown, strict=False):
        for expr, form in panel["targets"]:
            data = api(prometheus, "query_range", query=expr, start=start, end=end, step=step_s)
            for series in data["result"]:
                t = [float(v[0]) - start for v in series["values"]]
                y = [float(v[1]) for v in series["values"]]
                ax.plot(t, y, label=legend(form, series["metric"]), linewidth=1.2)
        ax.set_title(f"{panel['title']} [{panel['unit']}]", fontsize=9)
        ax.tick_params(labelsize=7)
        if ax.get_legend_handles_labels()[0]:
            ax.legend(fontsize=6, loc="upper left")
        else:  # Grafana's "No data": e.g. no failure of any kind yet
            ax.text(0.5, 0.5, "no data", ha="center", va="center", transform=ax.transAxes)
    for ax in axes.flat[len(shown) :]:
        ax.axis("off")
    for ax in axes[-1]:
        ax.set_xlabel("seconds", fontsize=7)
    fig.tight_layout()
    fig.savefig(out, dpi=90)
    plt.close(fig)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--prometheus", default="http://127.0.0.1:9090")
    parser.add_argument("--minutes", type=float, default=10, help="the last N minutes")
    parser.add_argument("--step", type=float, default=5, help="seconds between points")
    parser.add_argument("--out", type=Path, default=Path("dashboard.png"))
    args = parser.parse_args()
    end = time.time()
    draw(args.prometheus, end - 60 * args.minutes, end, args.out, args.step)
    print(args.out)


if __name__ == "__main__":
    main()
