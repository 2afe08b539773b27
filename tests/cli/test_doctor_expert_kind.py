"""``volunteer doctor`` fails a manifest whose expert kind this machine lacks, as ``join``
refuses it, with the install command as the fix (said once)."""

from __future__ import annotations

import json
import sys
from pathlib import Path

from tests.conftest import cli_env, run_cli
from volunteer.doctor.local import check_expert_kind
from volunteer.doctor.report import FAIL, OK

REPO = Path(__file__).resolve().parents[2]


def _manifest(tmp_path: Path, package: bool) -> Path:
    extra = "\n  package: volunteer-experts-fancy" if package else ""
    text = (REPO / "configs" / "demo.yaml").read_text().replace("kind: ffn", "kind: fancy" + extra)
    assert "kind: fancy" in text and "bootstrap: []" in text
    path = tmp_path / "fancy.yaml"
    path.write_text(text)
    return path


def test_doctor_fails_an_expert_kind_that_is_not_installed(tmp_path: Path) -> None:
    manifest = _manifest(tmp_path, package=True)
    result = run_cli("doctor", str(manifest), "--offline", "--home", str(tmp_path / "h"), "--json", env=cli_env())
    assert result.returncode == 1, result.stdout + result.stderr
    doc = json.loads(result.stdout)
    assert doc["can_serve"] is False
    (check,) = [c for c in doc["checks"] if c["name"] == "expert kind"]
    assert check["verdict"] == "fail" and "'fancy' is not installed" in check["detail"]
    assert check["fix"] == f"{sys.executable} -m pip install volunteer-experts-fancy"
    assert "pip install" not in check["detail"]  # the fix is said once
    text = run_cli("doctor", str(manifest), "--offline", "--home", str(tmp_path / "h"), env=cli_env())
    assert text.returncode == 1 and "[fail] expert kind" in text.stdout
    joined = run_cli("join", str(manifest), "--home", str(tmp_path / "j"), env=cli_env())
    assert joined.returncode == 2 and "pip install volunteer-experts-fancy" in joined.stderr


def test_the_check_passes_built_in_kinds_and_says_what_to_do_without_a_package() -> None:
    assert check_expert_kind("ffn", None, "m.yaml").verdict == OK
    missing = check_expert_kind("fancy", None, "m.yaml")
    assert missing.verdict == FAIL and "ask the experiment's owner" in missing.fix
    assert "not installed" in missing.detail and "ask" not in missing.detail
