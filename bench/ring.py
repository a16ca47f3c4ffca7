"""Ring allocator cost on the hot path: microseconds per alloc + free.

    python bench/ring.py [--ops 200000] [--outstanding 64]

Two patterns: FIFO frees (the steady state of a transfer stream) and frees in random order
(completions arriving out of order), both with `outstanding` live regions of 64 KiB-4 MiB.
"""

from __future__ import annotations

import argparse
import random
import time
from collections import deque

from kvferry.staging.ring import RingAllocator


def run(ops: int, outstanding: int, shuffle: bool, seed: int = 0) -> tuple[float, int]:
    rnd = random.Random(seed)
    sizes = [rnd.randrange(64 << 10, 4 << 20) for _ in range(1024)]
    ring = RingAllocator(1 << 30)
    live: deque[int] = deque()
    refused = 0
    start = time.perf_counter_ns()
    for i in range(ops):
        offset = ring.alloc(sizes[i & 1023])
        if offset is None:
            refused += 1
        else:
            live.append(offset)
        if len(live) >= outstanding or offset is None:
            if shuffle:
                live.rotate(-rnd.randrange(len(live)))
            ring.free(live.popleft())
    elapsed = time.perf_counter_ns() - start
    return elapsed / ops / 1e3, refused


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--ops", type=int, default=200_000)
    parser.add_argument("--outstanding", type=int, default=64)
    args = parser.parse_args()
    print(f"{'pattern':<14}{'us/alloc+free':>15}{'refused':>9}")
    for name, shuffle in (("fifo", False), ("out-of-order", True)):
        us, refused = run(args.ops, args.outstanding, shuffle)
        print(f"{name:<14}{us:>15.3f}{refused:>9}")


if __name__ == "__main__":
    main()
