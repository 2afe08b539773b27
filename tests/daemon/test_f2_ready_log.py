"""The ready lines name what another volunteer types: the manifest as given, announced vs
listening addresses (issue 12 review, F2 #1 and #20)."""

from __future__ import annotations

import logging
from pathlib import Path
from types import SimpleNamespace

import pytest

from volunteer.daemon.ready_log import _log_network, manifest_argument
from volunteer.manifest import load_manifest
from volunteer.manifest.loader import resolve_manifest_path

PID = "12D3KooWDpJ7As7BWAwRMfu1VU2WCqNjvq387JEYKDBj4kx6nXTN"


def _sup(manifest, announce=(), full=None, listen=()):
    net = SimpleNamespace(
        config=SimpleNamespace(announce_addrs=tuple(announce)), peer_id=PID,
        multiaddrs=full or [f"/ip4/127.0.0.1/tcp/4001/p2p/{PID}"], listen_addrs=list(listen),
        snapshot=lambda: {"connected_peers": 0, "new_swarm": True})
    return SimpleNamespace(network=net, manifest=manifest, network_ready_s=0.5)


def _custom_manifest(tmp_path: Path) -> Path:
    _, data = resolve_manifest_path("demo")
    text = data.decode().replace("name: demo", "name: my-exp", 1)
    assert "name: my-exp" in text
    path = tmp_path / "my-exp.yaml"
    path.write_text(text)
    return path


def _join_arg(caplog: pytest.LogCaptureFixture) -> str:
    line = next(r.getMessage() for r in caplog.records if "started a new swarm" in r.getMessage())
    return line.split("`volunteer join ", 1)[1].split(" --bootstrap", 1)[0]


def test_printed_join_command_loads_the_same_manifest(tmp_path: Path, caplog: pytest.LogCaptureFixture,
                                                       monkeypatch: pytest.MonkeyPatch) -> None:
    path = _custom_manifest(tmp_path)
    monkeypatch.chdir(tmp_path)
    for given in ("my-exp.yaml", str(path), "demo"):
        caplog.clear()
        manifest = load_manifest(given)
        with caplog.at_level(logging.INFO, logger="volunteer.daemon.supervisor"):
            _log_network(_sup(manifest))
        arg = _join_arg(caplog)
        assert arg == given
        again = load_manifest(arg)  # what the other volunteer runs does load
        assert again.experiment.name == manifest.experiment.name


def test_manifest_argument_quotes_odd_paths() -> None:
    assert manifest_argument("demo (shipped: volunteer/configs/demo.yaml)") == "demo"
    assert manifest_argument("/tmp/my exp.yaml") == "'/tmp/my exp.yaml'"


def test_announced_addresses_are_not_called_listening(caplog: pytest.LogCaptureFixture) -> None:
    manifest = load_manifest("demo")
    full = [f"/ip4/203.0.113.5/tcp/4001/p2p/{PID}"]
    with caplog.at_level(logging.INFO, logger="volunteer.daemon.supervisor"):
        _log_network(_sup(manifest, announce=["/ip4/203.0.113.5/tcp/4001"], full=full,
                          listen=["/ip4/127.0.0.1/tcp/4001"]))
    text = "\n".join(r.getMessage() for r in caplog.records)
    assert f"announced as /ip4/203.0.113.5/tcp/4001/p2p/{PID}" in text
    assert "listening on /ip4/203.0.113.5" not in text
    assert "listening on /ip4/127.0.0.1/tcp/4001" in text


def test_without_announce_the_addresses_are_listening(caplog: pytest.LogCaptureFixture) -> None:
    with caplog.at_level(logging.INFO, logger="volunteer.daemon.supervisor"):
        _log_network(_sup(load_manifest("demo")))
    text = "\n".join(r.getMessage() for r in caplog.records)
    assert f"listening on /ip4/127.0.0.1/tcp/4001/p2p/{PID}" in text and "announced as" not in text


