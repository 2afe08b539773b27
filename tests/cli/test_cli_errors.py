"""The CLI as a user meets it (real subprocesses): help, one-line errors, exit codes."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from tests.conftest import cli_env, run_cli
from tests.manifest.broken_cases import CASES, mutate

EXTRA_CASES = [  # problems only the expert registry can see (checked after importing torch)
    ("unknown-kind", mutate("expert.kind", "moe9000"), "expert.kind", "not installed on this machine"),
    ("bad-expert-options", mutate("expert.kind", "transformer").replace("hidden_dim: 16", "hidden_dim: 20"),
     "expert", "not divisible by num_heads"),
]


@pytest.mark.parametrize(("case_id", "text", "key_path", "fragment"), CASES + EXTRA_CASES,
                         ids=[c[0] for c in CASES + EXTRA_CASES])
def test_broken_manifest_exits_2_with_one_line(tmp_path: Path, case_id: str, text: str, key_path: str,
                                               fragment: str) -> None:
    manifest = tmp_path / f"{case_id}.yaml"
    manifest.write_text(text)
    home = tmp_path / "home"
    result = run_cli("join", str(manifest), "--home", str(home))
    assert result.returncode == 2, result.stderr
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1, result.stderr
    where = f"{manifest}: {key_path}: " if key_path else f"{manifest}: "
    assert lines[0].startswith("error: " + where), lines[0]
    assert fragment in lines[0]
    assert "Traceback" not in result.stderr
    assert not (home / "control.json").exists()


def test_unknown_experiment_name_lists_shipped_ones(tmp_path: Path) -> None:
    result = run_cli("join", "no-such-exp", "--home", str(tmp_path))
    assert result.returncode == 2
    assert result.stderr.startswith("error: no-such-exp: no such manifest file, and not a shipped manifest name "
                                    "(shipped: ")
    assert "demo" in result.stderr and result.stderr.count("\n") == 1


@pytest.mark.parametrize(
    ("args", "env", "fragment"),
    [
        (["--set", "num_experts=lots"], {}, "command line: num_experts: expected an integer"),
        (["--set", "colour=red"], {}, "unknown setting 'colour'"),
        ([], {"VOLUNTEER_LOG_LEVEL": "loud"}, "environment VOLUNTEER_LOG_LEVEL: log_level: expected one of"),
        (["--device", "cuda:7"], {}, "cuda:7"),
    ],
)
def test_bad_settings_exit_2(tmp_path: Path, args: list[str], env: dict[str, str], fragment: str) -> None:
    result = run_cli("join", "demo", "--home", str(tmp_path / "h"), *args, env=cli_env(**env))
    assert result.returncode == 2, result.stderr
    assert result.stderr.count("\n") == 1 and fragment in result.stderr, result.stderr


def test_status_and_leave_without_daemon(tmp_path: Path) -> None:
    for command in ("status", "leave"):
        result = run_cli(command, "--home", str(tmp_path))
        assert result.returncode == 3
        assert result.stderr.strip() == (f"error: daemon not running (home {tmp_path}): start it with "
                                         f"`volunteer join demo --home {tmp_path}`")
    result = run_cli("status", env=cli_env(VOLUNTEER_HOME=str(tmp_path)))  # home from the environment
    assert result.returncode == 3 and str(tmp_path) in result.stderr


def test_help_explains_each_command() -> None:
    top = run_cli("--help")
    assert top.returncode == 0
    for command in ("join", "status", "leave", "info", "settings"):
        assert command in top.stdout
        result = run_cli(command, "--help")
        assert result.returncode == 0 and "--home" in result.stdout, command
    assert "shipped manifest" in run_cli("join", "--help").stdout
    assert "draining" in run_cli("leave", "--help").stdout


def test_info_and_settings_json(tmp_path: Path) -> None:
    (tmp_path / "config.yaml").write_text("num_experts: 2\n")
    info = run_cli("info", "--json", "--home", str(tmp_path))
    assert info.returncode == 0, info.stderr
    doc = json.loads(info.stdout)
    assert doc["device"] == "cpu" or doc["device"].startswith(("cuda", "mps"))
    assert doc["hardware"]["cpu_logical"] >= 1 and "gpus" in doc["hardware"]
    plain = run_cli("info", "--home", str(tmp_path))
    assert plain.returncode == 0 and "device" in plain.stdout and "\x1b[" not in plain.stdout
    settings = run_cli("settings", "--json", "--home", str(tmp_path), env=cli_env(VOLUNTEER_ZMQ_PORT="7100"))
    rows = {r["name"]: r for r in json.loads(settings.stdout)["settings"]}
    assert rows["num_experts"]["value"] == 2 and rows["num_experts"]["source"] == "config"
    assert rows["zmq_port"]["value"] == 7100 and rows["zmq_port"]["source"] == "env"
    assert rows["selfbench"]["env"] == "VOLUNTEER_SELFBENCH"


def test_home_that_is_a_file_is_one_line(tmp_path: Path) -> None:
    not_a_dir = tmp_path / "file"
    not_a_dir.write_text("x")
    result = run_cli("join", "demo", "--home", str(not_a_dir))
    assert result.returncode != 0
    assert result.stderr.startswith(f"error: {not_a_dir}") and result.stderr.count("\n") == 1
