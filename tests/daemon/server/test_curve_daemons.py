"""Daemons with the deployment's CURVE keys: a completion is served through keyed bootstrap and
control sockets, control sockets bind in their configured ports, and a client without the keys
is not answered."""

import zmq

from kvferry.daemon.server.config import load
from kvferry.transport import curve
from kvferry.transport.messages import Codec, QueryPeers
from ports import free_ports
from support.cluster import FAST_TRANSFER, client, decode, generate, prefill, running, write


def test_keyed_daemons_serve_and_refuse_strangers(tmp_path):
    key_file = str(curve.generate(tmp_path / "keys"))
    low = free_ports(1)[0]
    transfer = {**FAST_TRANSFER, "control_ports": f"{low}-{low + 49}"}
    security = {"curve_key_file": key_file}
    p = prefill("prefill-0", tp=2, transfer=transfer, security=security)
    path = write(tmp_path, [p, decode("decode-0", [p], transfer=transfer, security=security)])
    with running(path) as launcher:
        assert len(generate(launcher, "decode-0", [5, 17, 99, 3]).token_ids) == 8
        ranks = client(launcher, "decode-0").status()["ranks"]
        assert all(low <= _port(rank["control_address"]) <= low + 49 for rank in ranks)
        bootstrap = f"tcp://127.0.0.1:{p['bootstrap_port']}"
        assert _answered(bootstrap, curve.load(key_file))
        assert not _answered(bootstrap, None)
        prefill_status = client(launcher, "prefill-0").status()
        assert key_file not in str(prefill_status)
        assert curve.load(key_file).secret.decode() not in str(prefill_status)
    assert load(path).daemons[0].security.curve_key_file == key_file


def _answered(address: str, keys) -> bool:
    """Whether the bootstrap server answers a QueryPeers sent with `keys` (None: none)."""
    context = curve.context(keys)
    socket = context.socket(zmq.DEALER)
    try:
        socket.connect(address)
        socket.send(Codec().encode(QueryPeers()))
        return bool(socket.poll(5000))
    finally:
        socket.close(linger=0)
        curve.close(context)


def _port(address: str) -> int:
    return int(address.rsplit(":", 1)[1])
