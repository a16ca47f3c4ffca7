"""Sides of a deployment in child processes over real UCX, driven from a test (each a
`support.ucx_side.Side` behind a pipe), and the helpers the tests share."""

import multiprocessing as mp
import os
import signal
import time

import msgspec

from kvferry.transport.room import KVPoll
from support.transfer_sim import small_config
from support.ucx_side import main

SUCCESS, FAILED = int(KVPoll.Success), int(KVPoll.Failed)
# plain fields: the config crosses into the side processes
CONFIG = msgspec.structs.asdict(
    small_config(
        bootstrap_timeout_s=20.0,
        transfer_timeout_s=60.0,
        ring_wait_timeout_s=20.0,
        heartbeat_interval_s=0.25,
        heartbeat_timeout_s=5.0,
        ucx_tls="tcp,sm,self",
    )
)


class Proc:
    """A side in a child process, driven through a pipe."""

    def __init__(self, role, heads, tp, config=CONFIG, **layout):
        ctx = mp.get_context("spawn")
        self.conn, child = ctx.Pipe()
        self.proc = ctx.Process(
            target=main, args=(child, role, heads, tp, config, layout), daemon=True
        )
        self.proc.start()
        self.ready = self._reply(60)

    def __call__(self, name, *args, timeout_s=90):
        self.conn.send((name, args))
        return self._reply(timeout_s)

    def _reply(self, timeout_s):
        assert self.conn.poll(timeout_s), "the side process did not answer"
        status, value = self.conn.recv()
        assert status == "ok", value
        return value

    def kill(self):
        os.kill(self.proc.pid, signal.SIGKILL)
        self.proc.join(10)

    def close(self):
        if self.proc.is_alive():
            try:
                self("close", timeout_s=20)
            finally:
                self.proc.join(10)
                if self.proc.is_alive():
                    self.kill()


def reaches(side, seed, state, timeout_s=30.0):
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        if side("states", seed) == [int(state)]:
            return True
        time.sleep(0.02)
    return False


def transfer(prefill, decode, seeds, num_tokens=50, step=16):
    """Move requests `seeds`, their KV handed over `step` tokens at a time."""
    for i, seed in enumerate(seeds):
        decode("recv", seed, num_tokens, i * num_tokens, prefill.ready)
        prefill("send", seed, num_tokens, i * num_tokens, None, step)
    return [(prefill("wait", seed), decode("wait", seed)) for seed in seeds]
