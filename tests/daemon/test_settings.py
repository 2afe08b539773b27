"""Settings layering (defaults < config file < env < flags) and validation messages."""

from __future__ import annotations

from pathlib import Path

import pytest

from volunteer.daemon.settings import SETTINGS, SettingsError, parse_assignments, resolve_settings


def test_defaults_come_from_the_table() -> None:
    s = resolve_settings(None, {}, {})
    for row in SETTINGS:
        assert getattr(s, row.name) == row.default
        assert s.source(row.name) == "default"
        assert row.env == "VOLUNTEER_" + row.name.upper()


def test_layers_override_in_order(tmp_path: Path) -> None:
    cfg = tmp_path / "config.yaml"
    cfg.write_text("num_experts: 2\nzmq_port: 7000\ndevice: cpu\nselfbench: false\n")
    env = {"VOLUNTEER_ZMQ_PORT": "7001", "VOLUNTEER_DEVICE": "cuda"}
    s = resolve_settings(cfg, env, {"device": "cpu", "num_experts": None})
    assert (s.num_experts, s.source("num_experts")) == (2, "config")
    assert (s.zmq_port, s.source("zmq_port")) == (7001, "env")
    assert (s.device, s.source("device")) == ("cpu", "flag")
    assert s.selfbench is False
    assert s.checkpoint_interval_s == 300.0


@pytest.mark.parametrize(
    ("env", "fragment"),
    [
        ({"VOLUNTEER_NUM_EXPERTS": "many"}, "environment VOLUNTEER_NUM_EXPERTS: num_experts: expected an integer"),
        ({"VOLUNTEER_NUM_EXPERTS": "0"}, "expected an integer in [1, 4096]"),
        ({"VOLUNTEER_LOG_LEVEL": "loud"}, "expected one of debug, info, warning, error"),
        ({"VOLUNTEER_SELFBENCH": "maybe"}, "expected true or false"),
        ({"VOLUNTEER_CHECKPOINT_INTERVAL_S": "nan"}, "expected a number"),
        ({"VOLUNTEER_TORCH_THREADS": "0"}, "torch_threads: expected auto or an integer in [1, 1024], got '0'"),
        ({"VOLUNTEER_TORCH_THREADS": "some"}, "expected auto or an integer"),
    ],
)
def test_bad_env_values_name_the_variable(env: dict[str, str], fragment: str) -> None:
    with pytest.raises(SettingsError) as info:
        resolve_settings(None, env, {})
    assert fragment in str(info.value)


def test_config_file_errors(tmp_path: Path) -> None:
    cfg = tmp_path / "config.yaml"
    cfg.write_text("num_expert: 3\n")
    with pytest.raises(SettingsError, match=r"config.yaml: num_expert: unknown setting"):
        resolve_settings(cfg, {}, {})
    cfg.write_text("- 1\n")
    with pytest.raises(SettingsError, match="expected a mapping"):
        resolve_settings(cfg, {}, {})
    cfg.write_text("zmq_port: 1.5\n")
    with pytest.raises(SettingsError, match="zmq_port: expected an integer"):
        resolve_settings(cfg, {}, {})
    cfg.write_text("a: [\n")
    with pytest.raises(SettingsError, match="invalid YAML"):
        resolve_settings(cfg, {}, {})


def test_missing_config_file_is_fine(tmp_path: Path) -> None:
    assert resolve_settings(tmp_path / "absent.yaml", {}, {}).num_experts == 4


def test_set_flags() -> None:
    assert parse_assignments(["num-experts=3", "zmq_host=0.0.0.0"]) == {"num_experts": "3", "zmq_host": "0.0.0.0"}
    with pytest.raises(SettingsError, match="expected NAME=VALUE"):
        parse_assignments(["device"])
    with pytest.raises(SettingsError, match="unknown setting 'colour'"):
        parse_assignments(["colour=red"])
    s = resolve_settings(None, {}, parse_assignments(["selfbench=off", "leave_timeout_s=2.5"]))
    assert s.selfbench is False and s.leave_timeout_s == 2.5


def test_torch_threads_is_auto_or_an_integer(tmp_path: Path) -> None:
    assert resolve_settings(None, {}, {}).torch_threads == "auto"
    assert resolve_settings(None, {"VOLUNTEER_TORCH_THREADS": " AUTO "}, {}).torch_threads == "auto"
    assert resolve_settings(None, {}, parse_assignments(["torch-threads=3"])).torch_threads == 3
    cfg = tmp_path / "config.yaml"
    cfg.write_text("torch_threads: 2\n")
    s = resolve_settings(cfg, {}, {})
    assert (s.torch_threads, s.source("torch_threads")) == (2, "config")
    cfg.write_text("torch_threads: 1.5\n")
    with pytest.raises(SettingsError, match="torch_threads: expected auto or an integer"):
        resolve_settings(cfg, {}, {})
