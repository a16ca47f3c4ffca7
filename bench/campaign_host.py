"""The host stage's smaller benches and their rows in the campaign's table: the HTTP front
alone, the load generator's client, a router, a prompt's hand-off, a TP step's exchanges and a
garbage-collector pass (bench/campaign.py, `host`)."""

from __future__ import annotations

from campaign_rows import Row  # bench/ is on sys.path (a script)

# (bench, its arguments under --quick, its JSON file), run after host_costs.py
SMALL_BENCHES = (
    ("control_path.py", ["--requests", "30", "--warmup", "5"], "control.json"),
    ("group_exchange.py", ["--calls", "100", "--rounds", "3"], "group.json"),
    ("http_front.py", ["--requests", "64", "--stacks", "fronts"], "http_front.json"),
    ("handoff.py", ["--calls", "200"], "handoff.json"),
    ("client_overhead.py", ["--requests", "40", "--rounds", "1"], "client.json"),
    ("router_relay.py", ["--requests", "32", "--concurrency", "1,8"], "router.json"),
    ("gc_pauses.py", [], "gc.json"),  # a full GC pass, start-up heap walked vs frozen
)


def front_rows(front: dict | None) -> list[Row]:
    """The decode HTTP front alone (a stand-in engine behind it): the TTFT it adds and its
    CPU per token, at the lowest and highest concurrency."""
    if not front:
        return []
    low, high = front["points"][0], front["points"][-1]
    detail = (f"{high['front_ttft_ms_p50']:.3g} vs {low['front_ttft_ms_p50']:.3g} ms; "
              f"{high['tokens_per_s']:.0f} tok/s")  # fmt: skip
    c = high["concurrency"]
    rows = [
        Row(f"HTTP front's TTFT, c={c} / c={low['concurrency']}", front["front_ratio"], None,
            "x", higher_is_better=False, detail=detail),
        Row(f"HTTP front CPU per streamed token, c={c}", high["front_cpu_us_per_token"], None,
            " us", higher_is_better=False,
            detail=f"client {high['client_cpu_us_per_token']:.3g} us"),
    ]  # fmt: skip
    stock = front.get("stock_over_fronts")
    if stock:
        rows.append(Row(f"HTTP front CPU per token, stock uvicorn / the fronts', c={c}",
                        stock["cpu_per_token"], None, "x",
                        detail=f"front's TTFT {stock['front_ttft']:.2f}x"))  # fmt: skip
    ratios = front.get("loop_over_thread")  # the ranks' reports read on the loop / by a thread
    if ratios:
        others = ", ".join(f"c={n} {r:.2f}x" for n, r in ratios["ttft"].items() if n != str(c))
        cpu = f"daemon CPU per token {ratios['cpu_per_token']:.2f}x"
        rows.append(Row(f"HTTP front, reports read on its loop / by a thread: TTFT p50, c={c}",
                        ratios["ttft"][str(c)], None, "x", detail=f"{others}; {cpu}"))  # fmt: skip
    ratios = front.get("starlette_over_events")  # a stream's response: Starlette's / its own
    if ratios:
        others = ", ".join(f"c={n} {r:.2f}x" for n, r in ratios["ttft"].items() if n != str(c))
        cpu = f"daemon CPU per request {ratios['cpu_per_request']:.2f}x"
        rows.append(Row(f"HTTP front, Starlette's StreamingResponse / its own: TTFT p50, c={c}",
                        ratios["ttft"][str(c)], None, "x", detail=f"{others}; {cpu}"))  # fmt: skip
    return rows


def client_rows(client: dict | None) -> list[Row]:
    """`kvferry bench`'s client against a server that answers at once: httpx's / aiohttp's."""
    if not client:
        return []
    ratios, figures = client["httpx_over_aiohttp"], client["figures"]
    c = client["args"]["concurrency"]
    detail = (f"{figures['httpx']['ttft_p50_us_c1']:.0f} vs "
              f"{figures['aiohttp']['ttft_p50_us_c1']:.0f} us; CPU per token at c={c} "
              f"{ratios['cpu_per_token_us']:.2f}x")  # fmt: skip
    return [Row("bench client, httpx / aiohttp: TTFT p50 c=1 (a server answering at once)",
                ratios["ttft_p50_us_c1"], None, "x", detail=detail)]  # fmt: skip


def router_rows(router: dict | None) -> list[Row]:
    """A router in front of a stand-in decode daemon: its TTFT through ÷ straight, its CPU."""
    if not router:
        return []
    high = router["points"][-1]
    c = high["concurrency"]
    detail = (f"{high['router_ttft_ms_p50']:.3g} vs {high['direct_ttft_ms_p50']:.3g} ms; "
              f"{high['tokens_per_s']:.0f} tok/s")  # fmt: skip
    return [
        Row(f"router, TTFT p50 through it / straight, c={c}", high["ttft_ratio"], None, "x",
            higher_is_better=False, detail=detail),
        Row(f"router CPU per relayed token, c={c}", high["router_cpu_us_per_token"], None,
            " us", higher_is_better=False,
            detail=f"{high['router_cpu_us_per_request']:.0f} us per request"),
    ]  # fmt: skip


def handoff_rows(handoff: dict | None) -> list[Row]:
    """A prompt's hand-off exchange: a connection per request / kept connections."""
    rows = []
    for name, r in (handoff or {}).get("modes", {}).items():
        each, kept = r["connection_per_request"]["p50_us"], r["kept"]["p50_us"]
        rows.append(Row(f"prompt hand-off, a connection per request / kept, {name}", r["ratio"],
                        None, "x", detail=f"{each:.0f} vs {kept:.0f} us"))  # fmt: skip
    return rows


def group_rows(group: dict | None) -> list[Row]:
    """A TP rank's step: the commands' broadcast and the rooms' verdicts, gloo vs pipes."""
    if not group:
        return []
    ops = group["operations"]
    step = [op for op in ops if op.startswith(("broadcast, no", "verdicts"))]
    gloo, pipes = (sum(ops[op][way] for op in step) for way in ("gloo_us", "pipes_us"))
    barrier = ops["barrier"]
    detail = f"{gloo:.0f} vs {pipes:.0f} us; barrier {barrier['gloo_us']:.0f} vs "
    detail += f"{barrier['pipes_us']:.0f} us"
    return [Row("TP step exchange (broadcast + verdicts), gloo / the ranks' pipes",
                gloo / pipes, None, "x", detail=detail)]  # fmt: skip


def gc_rows(gc: dict | None) -> list[Row]:
    """A full garbage-collector pass in a process holding a daemon's start-up heap, walked
    (CPython's default) / frozen out of reach (daemon/server/heap.py)."""
    if not gc:
        return []
    walked, frozen = gc["walked"], gc["frozen"]
    detail = (f"{walked['full_pass_ms']:.3g} vs {frozen['full_pass_ms']:.3g} ms; "
              f"{walked['objects']} vs {frozen['objects']} objects walked")  # fmt: skip
    return [Row("a full GC pass, start-up heap walked / frozen", gc["ratio"], None, "x",
                detail=detail)]  # fmt: skip
