"""Receives posted ahead of their messages, between processes over real UCX (tcp and shared
memory on loopback; a cache in host memory, where they are off unless configured)."""

import time

import pytest

from kvferry.transport.room import KVPoll
from support.ucx_procs import CONFIG, FAILED, SUCCESS, reaches, transfer

pytest.importorskip("ucxx", reason="the UCX data plane needs the ucxx package")


@pytest.mark.parametrize(
    "ahead, staging_bytes", [(True, None), (True, 12 << 10), (False, None), (None, None)],
    ids=["ahead", "ring-mostly-full", "off", "default"],
)  # fmt: skip
def test_receives_posted_ahead_of_their_messages(procs, ahead, staging_bytes):
    """A decode rank posts a room's receives as it registers, while its ring stays at most half
    full (the rest come by probe), or none with post_receives_ahead off (and by default for a
    cache in host memory): the KV arrives bit-exact either way, and the ring is empty after."""
    config = dict(CONFIG, post_receives_ahead=ahead, staging_bytes=staging_bytes)
    prefill = procs("prefill", 4, 2, config)
    decode = procs("decode", 4, 1, config)
    for (p_states, p_reasons, _), (d_states, d_reasons, matches) in transfer(
        prefill, decode, [3, 4]
    ):
        assert p_states == [SUCCESS] * 2 and d_states == [SUCCESS], (p_reasons, d_reasons)
        assert matches
    d_idle, _, received = decode("idle")
    assert d_idle and prefill("idle")[0]
    posted_ahead = decode("stats")[0]["receives_ahead"]
    if not ahead:  # off, or the default for a cache in host memory
        assert posted_ahead == 0
    elif staging_bytes is None:
        assert posted_ahead == received == 2 * -(-50 // 16) * 2  # rooms x chunks x writers
    else:  # 6 KiB of a 12 KiB ring: some of each room's messages, not all
        assert 0 < posted_ahead < received


def test_receives_posted_ahead_give_way_when_the_ring_fills(procs):
    """Two rooms registered, the second sent first, rings of two messages on both sides: the
    first room's receive posted ahead holds the decode ring's oldest region, so the second
    room's messages fill the ring, and its unsent ones the prefill ring, where the first
    room's KV would have to go to reach decode. A message that finds the decode ring full
    revokes the receives posted ahead (their messages come by probe later): both rooms
    arrive."""
    # two chunks of 192 KiB: sent by rendezvous, so a send holds its prefill region until
    # decode has taken the message (small ones leave at once, eagerly)
    config = dict(CONFIG, chunk_tokens=64, staging_bytes=384 << 10, post_receives_ahead=True)
    prefill = procs("prefill", 4, 1, config, head_dim=64)
    decode = procs("decode", 4, 1, config, head_dim=64)
    for i, seed in enumerate([7, 8]):
        decode("recv", seed, 256, i * 256, prefill.ready)
        assert reaches(decode, seed, KVPoll.WaitingForInput)
    assert decode("stats")[0]["receives_ahead"] == 1  # half the ring: room 7's first chunk
    prefill("send", 8, 256, 256, None, 256)
    deadline = time.monotonic() + 10
    while decode("stats")[0]["ring_waits"] == 0 and time.monotonic() < deadline:
        time.sleep(0.01)
    assert decode("stats")[0]["ring_waits"] > 0
    prefill("send", 7, 256, 0, None, 256)
    for seed in (8, 7):
        states, reasons, matches = decode("wait", seed)
        assert states == [SUCCESS] and matches, (seed, reasons)
    assert decode("idle")[0] and prefill("idle")[0]


def test_messages_of_revoked_receives_come_by_probe(procs):
    """Receives posted ahead are revoked (the ring was full), and their messages arrive before
    the decode thread has taken the cancellations in: the probe that finds them must not take
    them for duplicates of the receives just cancelled. The room arrives bit-exact."""
    config = dict(CONFIG, post_receives_ahead=True)  # a cache in host memory: not by default
    prefill = procs("prefill", 4, 1, config)
    decode = procs("decode", 4, 1, config)
    _, (d_states, d_reasons, _) = transfer(prefill, decode, [6])[0]  # the endpoints wired up
    assert d_states == [SUCCESS], d_reasons
    decode("recv", 5, 50, 50, prefill.ready)
    assert reaches(decode, 5, KVPoll.WaitingForInput)
    decode("revoke_and_hold")
    prefill("send", 5, 50, 50)
    assert prefill("idle")[0]  # every send complete: the messages are at decode's worker
    decode("release")
    states, reasons, matches = decode("wait", 5)
    assert states == [SUCCESS] and matches, reasons
    assert decode("idle")[0] and prefill("idle")[0]


@pytest.mark.parametrize("scale", [2, 0.5], ids=["longer", "shorter"])
def test_a_message_of_the_wrong_size_into_a_receive_posted_ahead(procs, scale):
    """A message longer than its receive posted ahead writes nothing past it, a shorter one
    launches no scatter: either fails its room with the sizes said, gives its ring region
    back, and the rank serves the next room."""
    config = dict(CONFIG, post_receives_ahead=True)  # a cache in host memory: not by default
    prefill = procs("prefill", 4, 1, config)
    decode = procs("decode", 4, 1, config)
    decode("recv", 5, 50, 0, prefill.ready)
    assert reaches(decode, 5, KVPoll.WaitingForInput)
    assert decode("stats")[0]["receives_ahead"] == -(-50 // 16)
    assert decode("inject", 5, 0, 0, scale)
    states, reasons, _ = decode("wait", 5)
    assert states == [FAILED], reasons
    assert ("truncated" if scale > 1 else "where") in reasons[0].lower(), reasons
    assert decode("idle")[0]
    _, (d_states, d_reasons, matches) = transfer(prefill, decode, [6])[0]
    assert d_states == [SUCCESS] and matches, d_reasons
