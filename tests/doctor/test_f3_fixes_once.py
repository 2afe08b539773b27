"""The doctor says each fix once and names the flags ``join`` really has."""

from __future__ import annotations

import socket
from pathlib import Path
from types import SimpleNamespace

from volunteer.doctor.bootstrap import check_bootstrap
from volunteer.doctor.report import FAIL, OK, WARN, Report, render_text
from volunteer.doctor.runner import run_doctor

PEER = "12D3KooWJik9SDvQrdNggBWJZTXzTskZdQ2AKc63QrK74iMwMbEx"


def _result(port: int, ok: bool) -> SimpleNamespace:
    return SimpleNamespace(addr=f"/ip4/127.0.0.1/tcp/{port}/p2p/{PEER}", ok=ok, rtt_s=0.01 if ok else None,
                           kind="ok" if ok else "refused",
                           problem=None if ok else f"connection refused at 127.0.0.1:{port}")


def manifest_origin(addr: str) -> str:
    return "the manifest's network.bootstrap (demo)"


def test_no_peer_answering_gives_the_fix_once_under_the_failure() -> None:
    checks = check_bootstrap([_result(4001, False), _result(4002, False)], manifest_origin)
    assert [c.verdict for c in checks] == [WARN, WARN, FAIL]
    assert [bool(c.fix) for c in checks] == [False, False, True]
    report = Report("demo", "/h", checks)
    text = render_text(report, 200)
    assert text.count("fix:") == 1 and "network.bootstrap peer is down" in text


def test_fixes_differing_by_origin_are_each_said_once() -> None:
    origins = {4001: "the --bootstrap flag", 4002: "the manifest's network.bootstrap (demo)"}
    results = [_result(4001, False), _result(4002, False), _result(4003, False)]
    checks = check_bootstrap(results, lambda a: origins.get(int(a.split("/")[4]), origins[4002]))
    assert checks[-1].verdict == FAIL and "--bootstrap address" in checks[-1].fix
    assert "network.bootstrap peer is down" in checks[-1].fix
    assert render_text(Report("demo", "/h", checks), 300).count("fix:") == 1


def test_with_a_live_peer_each_dead_address_fix_appears_once() -> None:
    checks = check_bootstrap([_result(4001, True), _result(4002, False), _result(4003, False)], manifest_origin)
    assert [c.verdict for c in checks] == [OK, WARN, WARN]
    assert checks[1].fix and not checks[2].fix


def test_a_held_zmq_port_names_joins_port_flag(tmp_path: Path) -> None:
    with socket.socket() as held:
        held.bind(("127.0.0.1", 0))
        held.listen()
        env = {"VOLUNTEER_ZMQ_PORT": str(held.getsockname()[1]), "VOLUNTEER_NETWORK_ENABLED": "false"}
        report = run_doctor(None, tmp_path / "home", env=env)
    (zmq,) = [c for c in report.checks if c.name == "zmq port"]
    assert zmq.verdict == FAIL and "join --port N" in zmq.fix and "--set zmq_port" not in zmq.fix
