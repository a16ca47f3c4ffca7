"""Fuzz UCX endpoint creation with mutated worker addresses, behind the address parser.

Every mutation the parser accepts must be survived by UCX: endpoint creation returns an
endpoint or raises a Python exception, and a while of progress afterwards does not kill the
process. A crash aborts the process that saw it, so mutations run in child processes, a batch
each; a child that dies of a signal is restarted after the mutation that killed it.

    python tests/transport/ucx_address_fuzz.py --mutations 5000 [--unchecked]

`--unchecked` hands every mutation to UCX, parser or not (shows what the parser stops).
Prints one JSON summary line; exit status 1 if any accepted mutation crashed UCX.
"""

from __future__ import annotations

import argparse
import json
import os
import random
import subprocess
import sys

PROGRESS_ROUNDS = 200  # worker.progress() calls after each endpoint: wireup runs in these
CHILD_TIMEOUT_S = 300.0


def mutate(rng: random.Random, address: bytes) -> tuple[str, bytes]:
    """One mutation of a real address, drawn by `rng`: (kind, bytes)."""
    data = bytearray(address)
    kind = rng.choice(
        ["flip", "flip", "flip", "byte", "byte", "truncate", "extend", "random", "version", "run"]
    )
    if kind == "flip":
        for _ in range(rng.randint(1, 3)):
            data[rng.randrange(len(data))] ^= 1 << rng.randrange(8)
    elif kind == "byte":
        for _ in range(rng.randint(1, 4)):
            data[rng.randrange(len(data))] = rng.randrange(256)
    elif kind == "truncate":
        del data[rng.randrange(len(data)) :]
    elif kind == "extend":
        data += rng.randbytes(rng.randint(1, 16))
    elif kind == "random":
        data = bytearray(rng.randbytes(rng.randint(1, 2 * len(address))))
    elif kind == "version":
        data[0] = (data[0] & 0xF0) | rng.choice([v for v in range(16) if v != data[0] & 0x0F])
    else:  # a run of bytes set to one value (zeroed lengths, saturated flags)
        start = rng.randrange(len(data))
        end = min(len(data), start + rng.randint(2, 12))
        data[start:end] = bytes([rng.choice([0, 0xFF, rng.randrange(256)])]) * (end - start)
    return kind, bytes(data)


def _child(seed: int, start: int, count: int, checked: bool) -> None:
    """Runs mutations start.. in this process; reports each on stdout before and after."""
    os.environ.setdefault("UCX_TLS", "tcp,sm,self")
    os.environ["UCX_WARN_UNUSED_ENV_VARS"] = "n"
    import ucxx._lib.libucxx as ucx

    from kvferry.transport.dataplane import InvalidAddress
    from kvferry.transport.ucx_address import check_peer_address, parse_worker_address

    context = ucx.UCXContext(feature_flags=(ucx.Feature.TAG, ucx.Feature.WAKEUP))
    worker, target = ucx.UCXWorker(context), ucx.UCXWorker(context)
    address = target.address.tobytes()
    local = parse_worker_address(worker.address.tobytes())
    for index in range(start, start + count):
        kind, data = mutate(random.Random(seed * 1_000_003 + index), address)
        try:
            check_peer_address(data, local)
        except InvalidAddress as exc:
            if checked:
                print(json.dumps({"index": index, "result": "rejected", "why": str(exc)}))
                continue
        print(json.dumps({"index": index, "result": "try", "kind": kind, "hex": data.hex()}))
        sys.stdout.flush()
        print(json.dumps({"index": index, "result": _connect(ucx, worker, target, data)}))
        sys.stdout.flush()


def _connect(ucx, worker, target, data: bytes) -> str:
    try:
        endpoint = worker.create_endpoint_from_worker_address(
            ucx.UCXAddress.create_from_buffer(data), True
        )
    except Exception as exc:  # any Python exception is survival; we record which
        return f"exception {type(exc).__name__}"
    for _ in range(PROGRESS_ROUNDS):
        worker.progress()
        target.progress()
    endpoint.close()
    for _ in range(PROGRESS_ROUNDS):
        worker.progress()
        target.progress()
    return "endpoint"


def _run_batch(seed: int, start: int, count: int, checked: bool) -> tuple[list[dict], int]:
    argv = [sys.executable, __file__, "--child", str(seed), str(start), str(count)]
    if not checked:
        argv.append("--unchecked")
    proc = subprocess.run(argv, capture_output=True, timeout=CHILD_TIMEOUT_S)
    # UCX logs to stdout too, sometimes bytes of the mutated address: keep only our lines.
    out = proc.stdout.decode(errors="replace").splitlines()
    lines = [json.loads(line) for line in out if line.startswith('{"index"')]
    if proc.returncode not in (0,) and not lines:
        raise RuntimeError(f"fuzz child failed before any mutation: {proc.stderr[-2000:]!r}")
    return lines, proc.returncode


def fuzz(mutations: int, seed: int, batch: int, checked: bool = True) -> dict:
    """Runs `mutations` mutations in batches of child processes; a summary dict."""
    results: dict[int, dict] = {}
    crashes: list[dict] = []
    start = 0
    while start < mutations:
        lines, rc = _run_batch(seed, start, min(batch, mutations - start), checked)
        for line in lines:
            results.setdefault(line["index"], {}).update(line)
        last = lines[-1]["index"] if lines else start - 1
        if rc != 0:
            crash = dict(results[last], result="crash", returncode=rc)
            results[last] = crash
            crashes.append(crash)
        start = last + 1
    outcomes = [r["result"] for r in results.values()]
    return {
        "mutations": mutations,
        "rejected": outcomes.count("rejected"),
        "endpoint": outcomes.count("endpoint"),
        "exception": sum(o.startswith("exception") for o in outcomes),
        "exception_kinds": sorted({o.split()[1] for o in outcomes if o.startswith("exception")}),
        "crashes": crashes,
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--mutations", type=int, default=2000)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--batch", type=int, default=500)
    parser.add_argument("--unchecked", action="store_true")
    parser.add_argument("--child", type=int, nargs=3, metavar=("SEED", "START", "COUNT"))
    args = parser.parse_args()
    if args.child:
        _child(*args.child, checked=not args.unchecked)
        return
    summary = fuzz(args.mutations, args.seed, args.batch, checked=not args.unchecked)
    print(json.dumps(summary))
    sys.exit(1 if summary["crashes"] else 0)


if __name__ == "__main__":
    main()
