"""``volunteer admission`` as a user meets it (real subprocesses): keygen -> issue -> install -> show."""

from __future__ import annotations

import json
import time
from pathlib import Path

import yaml

from tests.conftest import run_cli
from volunteer.manifest.admission import parse_admission
from volunteer.net import admission as adm
from volunteer.net import admission_files as admf


def one_line_error(result, code: int = 2) -> str:
    assert result.returncode == code, (result.returncode, result.stdout, result.stderr)
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: "), result.stderr
    assert "Traceback" not in result.stderr
    return lines[0]


def test_owner_and_volunteer_workflow(tmp_path: Path) -> None:
    key, home, token_file = tmp_path / "owner.key", tmp_path / "home", tmp_path / "peer.token"

    made = run_cli("admission", "keygen", str(key))
    assert made.returncode == 0, made.stderr
    assert key.stat().st_mode & 0o777 == 0o600
    spec = parse_admission(yaml.safe_load(made.stdout)["admission"])  # paste-ready manifest lines
    assert spec.owner == adm.owner_key_text(admf.load_owner_key(key))

    before = run_cli("admission", "show", "--experiment", "exp", "--home", str(home), "--json")
    assert before.returncode == 0, before.stderr
    doc = json.loads(before.stdout)
    peer_id = doc["peer_id"]
    assert doc["token"] is None and peer_id.startswith("12D3KooW")

    issued = run_cli("admission", "issue", "--key", str(key), "--experiment", "exp", "--peer", peer_id,
                     "--days", "7", "--out", str(token_file))
    assert issued.returncode == 0, issued.stderr
    assert "volunteer admission install" in issued.stderr

    installed = run_cli("admission", "install", str(token_file), "--experiment", "exp", "--home", str(home))
    assert installed.returncode == 0, installed.stderr
    stored = admf.load_token(home, "exp")
    policy = adm.AdmissionPolicy(spec.owner, (), "exp")
    assert stored is not None and policy.admits(peer_id, stored)

    after = run_cli("admission", "show", "--experiment", "exp", "--home", str(home), "--json")
    token = json.loads(after.stdout)["token"]
    assert token["for_this_node"] and not token["expired"] and token["owner"] == spec.owner
    assert token["expires"] - token["issued_at"] == 7 * 86400
    plain = run_cli("admission", "show", "--experiment", "exp", "--home", str(home))
    assert peer_id in plain.stdout and "(this node)" in plain.stdout and "days left" in plain.stdout


def test_keygen_refuses_to_overwrite(tmp_path: Path) -> None:
    key = tmp_path / "owner.key"
    key.write_bytes(b"precious")
    line = one_line_error(run_cli("admission", "keygen", str(key)))
    assert "refusing to overwrite" in line
    assert key.read_bytes() == b"precious"


def test_bad_input_is_one_line_with_exit_2(tmp_path: Path) -> None:
    key, home = tmp_path / "owner.key", tmp_path / "home"
    owner = admf.create_owner_key(key)
    line = one_line_error(run_cli("admission", "issue", "--key", str(key), "--experiment", "exp",
                                  "--peer", "QmNotAPeer"))
    assert "bad peer id" in line

    garbage = tmp_path / "garbage.token"
    garbage.write_text("this is no token\n")
    line = one_line_error(run_cli("admission", "install", str(garbage), "--experiment", "exp",
                                  "--home", str(home)))
    assert line.startswith(f"error: {garbage}: ")

    # a token for another peer id: refused, and the node's home gets no token
    other_peer = "QmNnooDu7bfjPFoTZYxMNLWUQJyrVwtbZg5gBMjTezGAJN"
    other = tmp_path / "other.token"
    other.write_text(adm.encode_token_text(adm.issue_token(owner, "exp", other_peer, expires=time.time() + 86400)))
    line = one_line_error(run_cli("admission", "install", str(other), "--experiment", "exp",
                                  "--home", str(home)))
    assert f"token is for peer {other_peer}, but this node is" in line
    line = one_line_error(run_cli("admission", "install", str(other), "--experiment", "another",
                                  "--home", str(home)))
    assert "not 'another'" in line
    assert admf.load_token(home, "exp") is None


def test_help_explains_the_workflow() -> None:
    top = run_cli("--help")
    assert "admission" in top.stdout
    result = run_cli("admission", "--help")
    assert result.returncode == 0
    for word in ("keygen", "issue", "install", "show", "admission.peers"):
        assert word in result.stdout, word
