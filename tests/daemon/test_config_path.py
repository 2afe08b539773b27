"""One typed configuration path: the manifest's ``serving`` section is the node's one
``ServingLimits``, enforced alike by the runtime's ZeroMQ frontend and the libp2p RPC server;
the manifest's ``network`` section becomes the service's typed ``NetworkConfig``."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch

from tests.conftest import DaemonFactory
from tests.integration.shard_helpers import poll, status
from tests.runtime.servers import make_backends
from volunteer.client.node import ClientNode
from volunteer.client.zmq_transport import ZmqTransport
from volunteer.daemon.network import start_network
from volunteer.manifest import load_manifest
from volunteer.net.config import NetworkConfig
from volunteer.runtime.runtime import Runtime
from volunteer.runtime.zmq_frontend import ZmqFrontend
from volunteer.wire.errors import TooLargeError
from volunteer.wire.messages import decode_reply, encode_request

H = 16
MAX_BYTES = 8192  # one message of at most 8 KiB of tensors ...
MAX_HEADER = 1024  # ... and 1 KiB of header: a stream message holds at most 9 KiB
QUEUED = 3 * 2**20


def write_manifest(path: Path, name: str = "cfgpath") -> Path:
    path.write_text(f"""
experiment: {{name: {name}, version: "1"}}
expert: {{kind: ffn, hidden_dim: {H}}}
grid: {{prefix: {name}.ffn, dims: [1]}}
serving: {{max_bytes: {MAX_BYTES}, max_header_bytes: {MAX_HEADER}, max_queued_bytes: {QUEUED}, max_grad_norm: 1000.0}}
network: {{listen_port: 0, public: "yes"}}
""")
    return path


@pytest.fixture
def node(tmp_path: Path) -> Iterator[SimpleNamespace]:
    """A runtime, its ZeroMQ frontend and a network service started the daemon's way."""
    m = load_manifest(str(write_manifest(tmp_path / "m.yaml")))
    runtime = Runtime(make_backends({"e.0": ("ffn", H)}), m.serving)
    runtime.start()
    frontend = ZmqFrontend(runtime, bind="tcp://127.0.0.1:0")
    frontend.start()
    svc = client = None
    try:
        svc = start_network(tmp_path / "home", m.experiment.name, m.network, runtime.submit, frontend.endpoint,
                            "127.0.0.1", ["e.0"], 0.0, limits=runtime.limits)
        client = ClientNode(m.experiment.name, svc.multiaddrs, listen_addrs=("/ip4/127.0.0.1/tcp/0",)).start()
        yield SimpleNamespace(m=m, runtime=runtime, svc=svc, client=client, zmq=frontend.endpoint)
    finally:
        for part in (client, svc, frontend, runtime):
            if part is not None:
                part.stop()


def backward(transport, rows: int, request_id: int) -> list[torch.Tensor]:  # type: ignore[no-untyped-def]
    x, g = torch.randn(rows, H), torch.randn(rows, H)
    frames = encode_request("backward", "e.0", [x, g], request_id=request_id, timeout=30.0)
    return decode_reply(transport.request(frames, timeout=30.0)).tensors


@pytest.mark.timeout(120)
def test_manifest_limits_are_the_ones_every_frontend_applies(node: SimpleNamespace) -> None:
    m, svc = node.m, node.svc
    assert node.runtime.limits is m.serving and svc.limits is m.serving
    assert isinstance(svc.config, NetworkConfig) and svc.config.public == "yes"
    assert svc.config.listen_host == "127.0.0.1"
    rpc = svc._thread.run_sync(lambda: svc.rpc)
    assert rpc.limits == m.serving.wire() and rpc.budget.capacity == QUEUED

    # 2 x 32 rows x 16 floats = 4 KiB of tensors: within bounds. 2 x 100 rows = 12.8 KiB: each
    # frame fits (so libzmq lets it through) but the message exceeds max_bytes (+ the header
    # bound, on a stream); with the default bounds (256 MiB) it would be served.
    zmq = ZmqTransport(node.zmq)
    p2p = node.client.transport(svc.peer_id, svc.multiaddrs)
    try:
        for i, transport in enumerate((zmq, p2p)):
            assert backward(transport, 32, 10 * i + 1)[0].shape == (32, H)
            with pytest.raises(TooLargeError):
                backward(transport, 100, 10 * i + 2)
    finally:
        zmq.close()
    # Over libp2p the RPC server itself refused it from the lengths, before reading the body
    # and before the runtime saw it: it applies the manifest's bound, not a default one.
    stats = svc.snapshot()["rpc"]
    assert stats["requests"] == 1 and stats["framing_errors"] == 1, stats
    assert stats["inflight_bytes"]["capacity"] == QUEUED


@pytest.mark.timeout(150)
def test_the_daemon_hands_the_manifest_limits_to_its_libp2p_server(
        tmp_path: Path, volunteer_daemon: DaemonFactory) -> None:
    manifest = write_manifest(tmp_path / "m.yaml", "cfgdaemon")
    daemon = volunteer_daemon.start(tmp_path / "home", "--new-swarm", "--num-experts", "1",
                                    experiment=str(manifest), network=True)
    snap = poll(lambda: (s := status(daemon))["network"] and s, 60, "the network section")
    rpc = snap["network"]["rpc"]
    assert rpc["inflight_bytes"]["capacity"] == QUEUED, rpc
    assert snap["network"]["dht_mode"] == "server" and snap["network"]["reachability"] == "public"
