"""How soon a finished GPU copy wakes a sleeping host thread, by mechanism (GPU only).

    python bench/wakeups.py                 # a 64 MiB device-to-device copy, 1,000 times each
    python bench/wakeups.py --mib 1 --calls 2000

Every hop of a transfer waits for a copy (a gather, a scatter) and then wakes a thread. Each
mechanism below queues the same copy on a side stream and times, on the host, from before the
copy is queued until the waiting thread runs again (median and p90 µs):

- spinning on cuEventQuery: the floor (what a busy-polling thread would see; kvferry never
  spins);
- a host function on the stream writing an eventfd that the thread polls (what the transfer
  loops use: `staging/copy_stream.py`'s HostSignal);
- a blocking-sync event, synchronized by the thread itself;
- a waiter thread in a blocking-sync event that then writes an eventfd (the earlier design);
- a loop of cuEventQuery and sched_yield.

The copy's own GPU time (timing events) comes first, and a host function on an idle stream
(the mechanism's own latency) last.
"""

from __future__ import annotations

import argparse
import os
import select
import statistics
import threading
import time

import torch

from kvferry.staging import cuda_driver
from kvferry.staging.copy_stream import HostSignal


def main() -> None:
    p = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    p.add_argument("--mib", type=int, default=64, help="bytes each copy moves")
    p.add_argument("--calls", type=int, default=1000, help="timed calls per mechanism")
    args = p.parse_args()
    if not torch.cuda.is_available():
        raise SystemExit("wakeups.py times GPU copies: it needs a GPU")
    stream = torch.cuda.Stream()
    raw = stream.cuda_stream
    src = torch.empty(args.mib << 20, dtype=torch.uint8, device="cuda")
    dst = torch.empty_like(src)

    def copy() -> None:
        with torch.cuda.stream(stream):
            dst.copy_(src)

    signal = HostSignal()
    poller = select.poll()
    poller.register(signal.fd, select.POLLIN)
    event = cuda_driver.Event()
    blocking = torch.cuda.Event(blocking=True)
    began, ended = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
    waiter_fd = os.eventfd(0, os.EFD_NONBLOCK)
    waiter_poll = select.poll()
    waiter_poll.register(waiter_fd, select.POLLIN)

    def gpu_time() -> float:
        with torch.cuda.stream(stream):
            began.record()
            dst.copy_(src)
            ended.record()
        ended.synchronize()
        return began.elapsed_time(ended) / 1e3

    # each waits, after the copy was queued, until the copy is done; timed with the queuing
    def spin() -> None:
        event.record(raw)
        while not event.query():
            pass

    def host_function() -> None:
        signal.queue(raw)
        poller.poll(10_000)
        signal.clear()

    def blocking_sync() -> None:
        blocking.record(stream)
        blocking.synchronize()

    def waiter_thread() -> None:
        blocking.record(stream)
        waiter = threading.Thread(
            target=lambda: (blocking.synchronize(), os.eventfd_write(waiter_fd, 1))
        )
        waiter.start()
        waiter_poll.poll(10_000)
        os.eventfd_read(waiter_fd)
        waiter.join()

    def query_yield() -> None:
        event.record(raw)
        while not event.query():
            os.sched_yield()

    def timed(wait, queue_copy: bool = True):
        def measure() -> float:
            start = time.perf_counter()
            if queue_copy:
                copy()
            wait()
            return time.perf_counter() - start

        return measure

    print(f"{torch.cuda.get_device_name()}: a {args.mib} MiB copy, {args.calls} calls each")
    for name, measure in (
        ("the copy alone, GPU time", gpu_time),
        ("spin on cuEventQuery (the floor)", timed(spin)),
        ("host function -> eventfd -> poll (kvferry)", timed(host_function)),
        ("blocking-sync event, synchronized", timed(blocking_sync)),
        ("waiter thread -> eventfd -> poll", timed(waiter_thread)),
        ("cuEventQuery + sched_yield loop", timed(query_yield)),
        ("host function alone, idle stream", timed(host_function, queue_copy=False)),
    ):
        for _ in range(20):
            measure()
        times = sorted(measure() for _ in range(args.calls))
        p90 = times[int(0.9 * (len(times) - 1))]
        print(f"{name:44} median {statistics.median(times) * 1e6:8.1f} us  p90 {p90 * 1e6:8.1f}")
    signal.close()
    os.close(waiter_fd)


if __name__ == "__main__":
    main()
