"""``volunteer service``: the unit's name, the system unit's user and home, the join
arguments checked at install time, and an uninstall without a reachable user manager.
Real subprocesses of the CLI; systemctl is absent or a stand-in (see ``test_service``)."""

from __future__ import annotations

from pathlib import Path

import pytest

from tests.cli.test_service import cli, environment, unit_path

pytestmark = pytest.mark.timeout(180)
REPO = Path(__file__).resolve().parents[2]


def _no_systemctl(tmp_path: Path) -> dict[str, str]:
    empty = tmp_path / "bin"
    empty.mkdir(exist_ok=True)
    return environment(tmp_path, empty)


def test_the_unit_is_named_after_the_experiment_not_the_file(tmp_path: Path) -> None:
    env = _no_systemctl(tmp_path)
    text = (REPO / "configs" / "demo.yaml").read_text()
    assert "  name: demo\n" in text
    manifest = tmp_path / "r1-my-exp.yaml"
    manifest.write_text(text.replace("  name: demo\n", "  name: my-exp\n", 1))
    out = cli(["service", "install", str(manifest), "--home", str(tmp_path / "h"), "--no-start"], env, tmp_path)
    assert out.returncode == 0, out.stderr
    assert unit_path(tmp_path, "my-exp").exists() and not unit_path(tmp_path, "r1-my-exp").exists()
    wide = {**env, "COLUMNS": "300"}

    def help_text(command: str) -> str:
        text = cli(["service", command, "--help"], wide, tmp_path).stdout
        return " ".join(text.replace("\u2502", " ").split())

    for command in ("status", "uninstall"):
        assert "experiment's name" not in help_text(command), command
        assert "the only volunteer service installed" in help_text(command)
    assert "(default: the experiment's name, experiment.name in its manifest)" in help_text("install")
