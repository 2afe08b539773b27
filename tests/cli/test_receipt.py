"""``volunteer receipt`` through the real CLI: signed from the home alone (no daemon), verified
by ``--verify``, and a tampered receipt refused."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from tests.conftest import run_cli
from volunteer.daemon.contribution import ContributionLedger
from volunteer.daemon.receipt import FORMAT, ReceiptError, make_receipt, verify_receipt


def _home(tmp_path: Path) -> Path:
    home = tmp_path / "home"
    home.mkdir(mode=0o700, parents=True)
    ledger = ContributionLedger(home, "demo", clock=lambda: 1_700_000_000.0)
    ledger.observe({"demo.ffn.0.1": {"samples": 1200, "updates_applied": 7, "bytes_out": 4096}}, 0.0)
    ledger.observe({"demo.ffn.0.1": {"samples": 2000, "updates_applied": 9, "bytes_out": 8192}}, 3600.0)
    ledger.save()
    return home


def test_receipt_signs_and_verifies_and_tampering_fails(tmp_path: Path) -> None:
    home = _home(tmp_path)
    out = run_cli("receipt", "--json", "--home", str(home))
    assert out.returncode == 0, out.stderr
    doc = json.loads(out.stdout)
    assert doc["format"] == FORMAT
    payload = json.loads(doc["payload"])
    assert {k: payload[k] for k in ("experiment", "samples", "updates", "bytes_served", "uptime_s")} == {
        "experiment": "demo", "samples": 2000, "updates": 2, "bytes_served": 8192, "uptime_s": 3600.0}
    assert payload["since"] == 1_700_000_000.0 and payload["peer_id"].startswith("12D3")
    # signed by the key the node's network runs with (NetworkService: <home>/identity), no other
    from volunteer.daemon.home import NodeHome
    from volunteer.net.host import load_or_create_identity, peer_id_of

    assert payload["peer_id"] == peer_id_of(load_or_create_identity(NodeHome(home).identity_dir)).to_base58()
    assert not (home / "identity.key").exists()

    good = tmp_path / "receipt.json"
    good.write_text(out.stdout)
    ok = run_cli("receipt", "--verify", str(good))
    assert ok.returncode == 0 and f"valid receipt signed by {payload['peer_id']}" in ok.stdout
    assert "experiment demo: 2000 samples, 2 updates, up 1h" in ok.stdout and "8.0 KiB served" in ok.stdout

    bad = tmp_path / "tampered.json"
    bad.write_text(json.dumps({**doc, "payload": doc["payload"].replace('"samples":2000', '"samples":9000')}))
    refused = run_cli("receipt", "--verify", str(bad))
    assert refused.returncode == 1 and "receipt does not verify: bad signature" in refused.stderr

    plain = run_cli("receipt", "--home", str(home))  # human summary + the signed record
    assert plain.returncode == 0 and "2000 samples" in plain.stdout
    assert verify_receipt(plain.stdout.strip().splitlines()[-1]) == payload | {"issued_at": verify_receipt(
        plain.stdout.strip().splitlines()[-1])["issued_at"]}


def test_receipt_without_contribution_says_what_to_do(tmp_path: Path) -> None:
    out = run_cli("receipt", "--home", str(tmp_path / "empty"))
    assert out.returncode == 1 and "no contribution recorded" in out.stderr and "volunteer join demo" in out.stderr


def test_verify_refuses_every_kind_of_damage(tmp_path: Path) -> None:
    home = _home(tmp_path)
    doc = make_receipt(home)
    assert verify_receipt(doc)["samples"] == 2000 and verify_receipt(json.dumps(doc))["updates"] == 2
    other = make_receipt(_home(tmp_path / "other"))
    payload = json.loads(doc["payload"])
    damaged = [
        "not json", [], {"format": "x"}, {**doc, "signature": other["signature"]},  # another node's signature
        {**doc, "signature": "!!"}, {**doc, "payload": 5},
        {**doc, "payload": doc["payload"].replace(payload["peer_id"], json.loads(other["payload"])["peer_id"])},
        {**doc, "payload": json.dumps({**payload, "samples": -1}, sort_keys=True, separators=(",", ":"))},
        {**doc, "payload": json.dumps({**payload, "kind": "other"}, sort_keys=True, separators=(",", ":"))},
        "x" * 100_000,
    ]
    for bad in damaged:
        with pytest.raises(ReceiptError):
            verify_receipt(bad)
