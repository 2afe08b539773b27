"""``volunteer doctor`` through real subprocesses: a held port, an unwritable home, an
unreachable bootstrap peer, the ``--json`` shape and the exit codes (0 can serve, 1 cannot,
2 bad input). All offline: no libp2p peer is needed, so each run takes the time torch takes
to import."""

from __future__ import annotations

import json
import os
import socket
from pathlib import Path

import pytest

from tests.conftest import cli_env, run_cli

REPO = Path(__file__).resolve().parents[2]
PEER = "12D3KooWJik9SDvQrdNggBWJZTXzTskZdQ2AKc63QrK74iMwMbEx"
CHECK_KEYS = {"name", "verdict", "detail", "fix", "data"}


def _checks(doc: dict) -> dict[str, list[dict]]:
    out: dict[str, list[dict]] = {}
    for c in doc["checks"]:
        out.setdefault(c["name"], []).append(c)
    return out


def test_a_fresh_machine_can_serve_and_json_has_every_check(tmp_path: Path) -> None:
    result = run_cli("doctor", "demo", "--home", str(tmp_path / "home"), "--json", env=cli_env(network=True))
    assert result.returncode == 0, result.stdout + result.stderr
    doc = json.loads(result.stdout)
    assert set(doc) == {"version", "experiment", "home", "can_serve", "counts", "checks"}
    assert doc["can_serve"] is True and doc["experiment"] == "demo" and doc["counts"]["fail"] == 0
    assert all(set(c) == CHECK_KEYS for c in doc["checks"])
    checks = _checks(doc)
    for name in ("python", "torch", "device", "home", "disk", "zmq port", "libp2p port", "bootstrap"):
        assert name in checks, name
    assert checks["device"][0]["verdict"] == "ok" and checks["device"][0]["data"]["devices"]
    assert checks["bootstrap"][0]["verdict"] == "skip"  # the demo manifest starts a new swarm
    assert not (tmp_path / "home").exists()  # the doctor creates nothing


def test_held_ports_fail_and_name_the_setting_to_change(tmp_path: Path) -> None:
    manifest = tmp_path / "held.yaml"
    with socket.socket() as zmq_sock, socket.socket() as p2p_sock:
        for s in (zmq_sock, p2p_sock):
            s.bind(("127.0.0.1", 0))
            s.listen()
        zmq_port, p2p_port = zmq_sock.getsockname()[1], p2p_sock.getsockname()[1]
        text = (REPO / "configs" / "demo.yaml").read_text().replace("listen_port: 0", f"listen_port: {p2p_port}")
        manifest.write_text(text)
        result = run_cli("doctor", str(manifest), "--home", str(tmp_path / "h"),
                         env=cli_env(VOLUNTEER_ZMQ_PORT=str(zmq_port)))
    assert result.returncode == 1, result.stdout + result.stderr
    out = " ".join(result.stdout.split())  # lines wrap at 80 columns
    assert "[fail] zmq port" in out and f"127.0.0.1:{zmq_port} is already in use by pid {os.getpid()}" in out
    assert f"127.0.0.1:{p2p_port} is already in use" in out and "--listen-port N" in out
    assert result.stdout.splitlines()[-1].startswith("verdict: this node cannot serve")
    assert "[skip] network" in out  # cli_env turns the peer network off


def test_a_home_below_a_file_fails(tmp_path: Path) -> None:
    # Root may write anywhere, so "unwritable" is made of a regular file where the home's
    # parent directory should be: nobody can create a directory below it.
    (tmp_path / "file").write_text("not a directory")
    result = run_cli("doctor", "demo", "--home", str(tmp_path / "file" / "home"), "--json")
    assert result.returncode == 1, result.stdout + result.stderr
    home = _checks(json.loads(result.stdout))["home"][0]
    assert home["verdict"] == "fail" and "is a file, not a directory" in home["detail"] and home["fix"]


@pytest.mark.skipif(os.geteuid() == 0, reason="root writes to a 0500 directory anyway (the test above covers root)")
def test_an_unwritable_home_fails(tmp_path: Path) -> None:
    home = tmp_path / "ro"
    home.mkdir()
    home.chmod(0o500)
    try:
        result = run_cli("doctor", "demo", "--home", str(home))
    finally:
        home.chmod(0o700)
    assert result.returncode == 1, result.stdout + result.stderr
    assert "is not writable" in " ".join(result.stdout.split())


def test_an_unreachable_bootstrap_is_connection_refused(tmp_path: Path) -> None:
    with socket.socket() as s:  # bound, not listening: a connect is refused
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
        addr = f"/ip4/127.0.0.1/tcp/{port}/p2p/{PEER}"
        doc = run_cli("doctor", "demo", "--home", str(tmp_path / "h"), "--bootstrap", addr, "--json",
                      env=cli_env(network=True))
    assert doc.returncode == 1, doc.stdout + doc.stderr
    boot = _checks(json.loads(doc.stdout))["bootstrap"]
    assert [c["verdict"] for c in boot] == ["warn", "fail"]
    assert boot[0]["data"]["addr"] == addr and boot[0]["data"]["kind"] == "refused"
    assert boot[0]["data"]["origin"] == "the --bootstrap flag"
    assert boot[0]["detail"].startswith(f"connection refused at 127.0.0.1:{port}")
    assert "(address from the --bootstrap flag" in boot[0]["detail"]
    assert "check the --bootstrap address" in boot[1]["fix"] and "no trainer could find it" in boot[1]["detail"]


def test_bad_input_exits_2(tmp_path: Path) -> None:
    bad = run_cli("doctor", "demo", "--home", str(tmp_path / "h"), "--bootstrap", "/ip4/127.0.0.1/tcp/1")
    assert bad.returncode == 2 and "error: --bootstrap" in bad.stderr and "/p2p/<peer id>" in bad.stderr
    missing = run_cli("doctor", "no-such-experiment", "--home", str(tmp_path / "h"))
    assert missing.returncode == 2 and missing.stderr.startswith("error:")


def test_help_explains_doctor_and_swarm() -> None:
    top = run_cli("--help").stdout
    assert "doctor" in top and "swarm" in top
    doctor = run_cli("doctor", "--help").stdout
    assert "--home" in doctor and "--json" in doctor and "--bootstrap" in doctor and "Exit code 0" in doctor
    swarm = run_cli("swarm", "--help").stdout
    assert "--home" in swarm and "--json" in swarm and "--bootstrap" in swarm and "nobody serves" in swarm
