"""The Prometheus endpoint (``volunteer.daemon.metrics``), scraped over HTTP on loopback and
parsed with ``prometheus_client.parser``: a snapshot with every section, the per-expert
figures of a real runtime that served requests, a failing snapshot, and a port in use."""

from __future__ import annotations

import socket
import time
import urllib.request

import pytest
import torch
from prometheus_client.parser import text_string_to_metric_families

from tests.runtime.servers import make_backends
from volunteer.daemon.metrics import MetricsError, MetricsServer
from volunteer.runtime.limits import ServingLimits
from volunteer.runtime.runtime import Runtime
from volunteer.runtime.zmq_frontend import ZmqFrontend
from volunteer.wire.messages import decode_reply, encode_request
from volunteer.wire.zmtp import ZmtpConnection

pytestmark = pytest.mark.timeout(60)

SNAPSHOT = {
    "version": 1,
    "node": {"pid": 42, "home": "/h", "node_id": "12D3KooWTest", "version": "0.1.0", "uptime_s": 3725.0},
    "experiment": {"name": "demo", "version": "1"},
    "state": "serving",
    "endpoint": "tcp://127.0.0.1:5555",
    "device": {"name": "cpu", "utilization_pct": 37.0, "memory_used_bytes": 2**30, "memory_total_bytes": 2**33},
    "system": {"cpu_pct": 50.0, "cpu_count": 2},
    "process": {"cpu_pct": 120.0, "rss_bytes": 5 * 2**20, "threads": 9},
    "experts": {
        "demo.ffn.1.0": {"requests": 100, "samples": 3200, "requests_per_s": 12.5, "samples_per_s": 400.0,
                         "mean_batch_size": 32.0, "queue_depth": 3, "bytes_in": 1000, "bytes_out": 2000,
                         "latency_ms": {"queue_p50": 1.0, "queue_p99": 5.0, "compute_p50": 2.0, "compute_p99": 20.0},
                         "updates_applied": 17, "errors": {"overloaded": 2}},
        "demo.ffn.0.0": {"updates_applied": 0, "errors": {}, "requests": None},
    },
    "totals": {"requests": 100, "samples": 3200, "requests_per_s": 12.5, "samples_per_s": 400.0,
               "errors": {"overloaded": 2}},
    "checkpoints": {"interval_s": 300, "last_age_s": 12, "last_error": None},
    "network": {"peers": {"direct": 3, "relayed": 1, "hole_punched": 2}, "connected_peers": 6},
    "shards": {"hosted": {"demo.ffn.1.0": {}, "demo.ffn.0.0": {}}, "downloads": {}},
    "transfer": {"bytes_in": 10, "bytes_out": 20, "cap": 5 * 10**9},
    "pause": {"paused": True, "reason": "on battery", "until": None},
    "contribution": {"experiment": "demo", "samples": 123456, "updates": 789, "uptime_s": 86400.5,
                     "bytes_served": 10**10, "since": 1.7e9},
    "health": {"level": "idle", "why": "no trainer has sent work for 61s"},
}


def scrape(server: MetricsServer) -> dict[str, list]:
    """name -> samples [(labels, value)] of every family the endpoint serves."""
    with urllib.request.urlopen(server.url, timeout=10) as resp:
        assert resp.status == 200
        text = resp.read().decode()
    out: dict[str, list] = {}
    for family in text_string_to_metric_families(text):
        for sample in family.samples:
            out.setdefault(sample.name, []).append((sample.labels, sample.value))
    return out


def value(samples: dict[str, list], name: str, **labels: str) -> float:
    hits = [v for lab, v in samples[name] if all(lab.get(k) == x for k, x in labels.items())]
    assert len(hits) == 1, (name, labels, samples.get(name))
    return hits[0]


def test_every_section_of_the_snapshot_is_served():
    calls = []

    def snap() -> dict:
        calls.append(1)
        return SNAPSHOT

    server = MetricsServer(snap, "127.0.0.1", 0).start()
    try:
        m = scrape(server)
    finally:
        server.stop()
    assert len(calls) == 1  # read on the scrape, not before
    assert value(m, "volunteer_up") == 1
    assert value(m, "volunteer_node_info", node_id="12D3KooWTest", experiment="demo", version="0.1.0") == 1
    assert value(m, "volunteer_state", volunteer_state="serving") == 1
    assert value(m, "volunteer_state", volunteer_state="draining") == 0
    assert value(m, "volunteer_health", volunteer_health="idle") == 1
    assert value(m, "volunteer_uptime_seconds") == 3725
    assert value(m, "volunteer_requests_total") == 100
    assert value(m, "volunteer_errors_total", code="overloaded") == 2
    assert value(m, "volunteer_expert_requests_total", uid="demo.ffn.1.0") == 100
    assert [lab["uid"] for lab, _ in m["volunteer_expert_requests_total"]] == ["demo.ffn.1.0"]  # null skipped
    assert value(m, "volunteer_expert_updates_applied_total", uid="demo.ffn.0.0") == 0
    assert value(m, "volunteer_expert_bytes_out_total", uid="demo.ffn.1.0") == 2000
    assert value(m, "volunteer_expert_queue_depth", uid="demo.ffn.1.0") == 3
    assert value(m, "volunteer_expert_errors_total", uid="demo.ffn.1.0", code="overloaded") == 2
    assert value(m, "volunteer_expert_latency_seconds", uid="demo.ffn.1.0", phase="compute",
                 quantile="0.99") == pytest.approx(0.020)
    assert value(m, "volunteer_device_utilization_ratio") == pytest.approx(0.37)
    assert value(m, "volunteer_process_resident_memory_bytes") == 5 * 2**20
    assert value(m, "volunteer_connected_peers") == 6
    assert value(m, "volunteer_peers", path="hole_punched") == 2
    assert value(m, "volunteer_shards_hosted") == 2
    assert value(m, "volunteer_checkpoint_age_seconds") == 12
    assert value(m, "volunteer_transfer_bytes_today", direction="out") == 20
    assert value(m, "volunteer_transfer_daily_cap_bytes") == 5e9
    assert value(m, "volunteer_paused") == 1
    assert value(m, "volunteer_contribution_samples_total") == 123456
    assert value(m, "volunteer_contribution_uptime_seconds_total") == 86400.5
    assert value(m, "volunteer_contribution_bytes_served_total") == 1e10


def test_a_real_runtime_s_figures_follow_the_requests_it_served():
    runtime = Runtime(make_backends({"n.0": ("nop", 64)}), ServingLimits())
    runtime.start()
    frontend = ZmqFrontend(runtime)
    server = None
    try:
        frontend.start()
        server = MetricsServer(lambda: {"state": "serving", "experts": runtime.stats()}, "127.0.0.1", 0).start()
        before = scrape(server)
        assert value(before, "volunteer_expert_requests_total", uid="n.0") == 0
        host, port = frontend.endpoint[len("tcp://"):].rsplit(":", 1)
        conn = ZmtpConnection(host, int(port), time.monotonic() + 30, spin_s=0.0)
        try:
            for i in range(5):
                reply = conn.request(encode_request("forward", "n.0", [torch.ones(4, 64)], request_id=i),
                                     time.monotonic() + 30)
                assert decode_reply(reply).request_id == i
        finally:
            conn.close()
        after = scrape(server)
        assert value(after, "volunteer_expert_requests_total", uid="n.0") == 5
        assert value(after, "volunteer_expert_samples_total", uid="n.0") == 20
        assert value(after, "volunteer_expert_bytes_in_total", uid="n.0") > 5 * 4 * 64 * 4
    finally:
        if server is not None:
            server.stop()
        frontend.stop()
        runtime.stop()


def test_a_failing_snapshot_is_up_0_and_the_scrape_still_answers():
    def broken() -> dict:
        raise RuntimeError("daemon busy")

    server = MetricsServer(broken, "127.0.0.1", 0).start()
    try:
        m = scrape(server)
    finally:
        server.stop()
    assert value(m, "volunteer_up") == 0
    assert "volunteer_requests_total" not in m


def test_a_port_in_use_is_a_one_line_error():
    holder = socket.socket()
    holder.bind(("127.0.0.1", 0))
    holder.listen(1)
    port = holder.getsockname()[1]
    try:
        with pytest.raises(MetricsError) as err:
            MetricsServer(lambda: SNAPSHOT, "127.0.0.1", port).start()
    finally:
        holder.close()
    message = str(err.value)
    assert "\n" not in message
    assert f"127.0.0.1:{port}" in message and "metrics_port" in message
