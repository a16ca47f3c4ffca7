"""A prompt's hand-off to its prefill daemon: a connection per request vs kept connections.

    python bench/handoff.py                  # 2,000 exchanges each way, plain and CURVE
    python bench/handoff.py --calls 500 --json out.json

The decode daemon hands every request's prompt to a prefill daemon's bootstrap server
(`SubmitPrompt`, answered by `Ack`) before the prefill can start. The exchange is timed against
a ROUTER server in this process that answers at once, with a 1,024-token prompt: once as
`control.request` makes it, a DEALER of its own per exchange (connect, ZMTP handshake, and with
CURVE the key exchange and the ZAP check), and once through `requester.Requester`, which keeps a
connection per server and exchange in progress (what the hand-off uses). Median and p90 µs, and
the ratio, per security mode.
"""

from __future__ import annotations

import argparse
import json
import statistics
import tempfile
import threading
import time

import zmq

from kvferry.transport import curve
from kvferry.transport.control import request
from kvferry.transport.messages import Ack, Codec, SubmitPrompt
from kvferry.transport.requester import Requester


def serve(router: zmq.Socket, codec: Codec, stop: threading.Event) -> None:
    poller = zmq.Poller()
    poller.register(router, zmq.POLLIN)
    answer = codec.encode(Ack())
    while not stop.is_set():
        if dict(poller.poll(50)):
            identity, _ = router.recv_multipart()
            router.send_multipart([identity, answer])


def timed(call, calls: int) -> list[float]:
    for _ in range(calls // 10):  # warm-up
        call()
    times = []
    for _ in range(calls):
        began = time.perf_counter()
        call()
        times.append((time.perf_counter() - began) * 1e6)
    return times


def mode(keys: curve.CurveKeys | None, calls: int, prompt: int) -> dict:
    context, codec = curve.context(keys), Codec()
    router = context.socket(zmq.ROUTER)
    curve.serve(router)
    address = f"tcp://127.0.0.1:{router.bind_to_random_port('tcp://127.0.0.1')}"
    stop = threading.Event()
    server = threading.Thread(target=serve, args=(router, codec, stop), daemon=True)
    server.start()
    message = SubmitPrompt(1, list(range(prompt)))
    kept = Requester(context, codec)
    try:
        each = timed(lambda: request(context, codec, address, message, 10.0), calls)
        reused = timed(lambda: kept.request(address, message, 10.0), calls)
    finally:
        kept.close()
        stop.set()
        server.join(5)
        router.close(linger=0)
        curve.close(context)

    def summary(times: list[float]) -> dict:
        ordered = sorted(times)
        return {"p50_us": statistics.median(times), "p90_us": ordered[int(0.9 * len(times))]}

    per_request, kept_result = summary(each), summary(reused)
    ratio = per_request["p50_us"] / kept_result["p50_us"]
    return {"connection_per_request": per_request, "kept": kept_result, "ratio": ratio}


def main() -> None:
    p = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    p.add_argument("--calls", type=int, default=2000, help="timed exchanges per way and mode")
    p.add_argument("--prompt", type=int, default=1024, help="prompt tokens in each SubmitPrompt")
    p.add_argument("--json", help="write the results here")
    args = p.parse_args()
    with tempfile.TemporaryDirectory() as keys_dir:
        keys = curve.load(curve.generate(keys_dir))
        modes = (("plain", None), ("curve", keys))
        results = {name: mode(k, args.calls, args.prompt) for name, k in modes}
    print(f"prompt hand-off exchange, {args.prompt}-token prompt, {args.calls} calls each")
    print(f"{'mode':6} {'per request p50/p90 us':>24} {'kept p50/p90 us':>18} {'ratio':>7}")
    for name, r in results.items():
        each, kept = r["connection_per_request"], r["kept"]
        print(
            f"{name:6} {each['p50_us']:>15.0f} / {each['p90_us']:<6.0f} "
            f"{kept['p50_us']:>9.0f} / {kept['p90_us']:<6.0f} {r['ratio']:>6.2f}x"
        )
    if args.json:
        with open(args.json, "w") as f:
            json.dump({"args": vars(args), "modes": results}, f, indent=1)


if __name__ == "__main__":
    main()
