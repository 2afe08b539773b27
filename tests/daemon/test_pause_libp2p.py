"""Pausing on the libp2p path with real hosts: the typed "paused" reply over an expert-RPC
stream, and records re-announced "paused" through ``PausedNetwork`` that a trainer's
``DhtDirectory`` passes over, then "serving" again on resume."""

from __future__ import annotations

from types import SimpleNamespace

import pytest
import torch

from volunteer.client.node import ClientNode
from volunteer.daemon.pause import PausedNetwork
from volunteer.experts.backend import ExpertBackend, OptimizerSpec
from volunteer.net.service import NetworkService
from volunteer.runtime.limits import ServingLimits
from volunteer.runtime.runtime import Runtime
from volunteer.wire.errors import PausedError
from volunteer.wire.messages import decode_reply, encode_request

HIDDEN = 16
UIDS = ["ffn.0.0", "ffn.0.1"]


@pytest.mark.timeout(120)
def test_paused_over_libp2p_and_in_the_records(tmp_path) -> None:
    torch.manual_seed(0)
    runtime = Runtime({u: ExpertBackend(u, "ffn", HIDDEN, OptimizerSpec(lr=0.0)) for u in UIDS}, ServingLimits())
    runtime.start()
    net = SimpleNamespace(bootstrap=(), relays=(), listen_port=0, announce_addrs=(), public="auto")
    svc = NetworkService(tmp_path / "home", "exp", net, submit=runtime.submit, listen_host="127.0.0.1")
    paused = [False]
    wrapped = PausedNetwork(svc, lambda: paused[0])
    client = None
    try:
        svc.start()
        client = ClientNode("exp", svc.multiaddrs, listen_addrs=("/ip4/127.0.0.1/tcp/0",)).start()
        assert wrapped.announce(UIDS, "serving", 0.0).ok
        d = client.directory(cache_ttl=0.0)
        assert d.children(["ffn.0."]) == {"ffn.0.": [0, 1]}
        t = client.transport(svc.peer_id, svc.multiaddrs)
        frames = encode_request("forward", "ffn.0.1", [torch.randn(2, HIDDEN)], request_id=7, timeout=30.0)
        assert decode_reply(t.request(frames, timeout=30.0)).tensors[0].shape == (2, HIDDEN)

        runtime.pause_gate.close()
        paused[0] = True
        with pytest.raises(PausedError):
            decode_reply(t.request(frames, timeout=30.0))
        assert wrapped.announce(UIDS, "serving", 0.0).ok  # any announce while paused says so
        assert svc.snapshot()["state"] == "paused"
        assert d.children(["ffn.0."]) == {"ffn.0.": []} and d.resolve(["ffn.0.1"]) == {}

        runtime.pause_gate.open()
        paused[0] = False
        assert wrapped.announce(UIDS, "serving", 0.0).ok
        assert d.children(["ffn.0."]) == {"ffn.0.": [0, 1]} and set(d.resolve(["ffn.0.1"])) == {"ffn.0.1"}
        assert decode_reply(t.request(frames, timeout=30.0)).tensors[0].shape == (2, HIDDEN)
    finally:
        if client is not None:
            client.stop()
        svc.stop()
        runtime.stop()
