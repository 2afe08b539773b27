"""``volunteer service install|uninstall|status`` through real subprocesses of the CLI.

The unit file is checked three ways: ``systemd-analyze verify`` where it is installed (no
warning about the file; skipped cleanly elsewhere), parsed with configparser, and its
``ExecStart`` run for real with ``--help`` appended (the interpreter, the module and every
argument must be accepted by ``volunteer join``). systemctl is either absent from PATH (the
container case: the file is written and the next step printed) or a recording stand-in
script (the calls install/status/uninstall make, and a systemctl that fails).
"""

from __future__ import annotations

import configparser
import os
import shlex
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

pytestmark = pytest.mark.timeout(120)
REPO = Path(__file__).resolve().parents[2]


def cli(args: list[str], env: dict[str, str], cwd: Path) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "volunteer", *args], capture_output=True, text=True,
                          env=env, cwd=cwd, timeout=60)


def environment(tmp_path: Path, bin_dir: Path) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith("VOLUNTEER_")}
    env.update(XDG_CONFIG_HOME=str(tmp_path / "config"), PATH=str(bin_dir), NO_COLOR="1",
               PYTHONPATH=str(REPO))
    return env


def unit_path(tmp_path: Path, name: str = "demo") -> Path:
    return tmp_path / "config" / "systemd" / "user" / f"volunteer-{name}.service"


def exec_argv(exec_start: str) -> list[str]:
    """ExecStart split as systemd does for what we write (double quotes, %% and $$)."""
    return [a.replace("%%", "%").replace("$$", "$") for a in shlex.split(exec_start)]


def parse_unit(path: Path) -> configparser.ConfigParser:
    parser = configparser.ConfigParser(interpolation=None, strict=False, comment_prefixes=("#", ";"))
    parser.optionxform = str  # keys are case-sensitive in systemd
    parser.read_string(path.read_text())
    return parser


def test_install_without_systemctl_writes_a_valid_unit_and_prints_the_next_step(tmp_path):
    empty = tmp_path / "bin"
    empty.mkdir()
    home = tmp_path / "my home %x"  # a space and a systemd specifier: both must be quoted
    env = environment(tmp_path, empty)
    out = cli(["service", "install", "demo", "--home", str(home), "--", "--num-experts", "2",
               "--set", "leave_timeout_s=45"], env, tmp_path)
    assert out.returncode == 0, out.stderr
    path = unit_path(tmp_path)
    assert f"wrote {path}" in out.stdout
    assert "systemctl --user daemon-reload && systemctl --user enable --now volunteer-demo.service" in out.stdout
    assert home.is_dir()  # WorkingDirectory must exist when systemd starts the unit

    unit = parse_unit(path)
    service = unit["Service"]
    assert service["Restart"] == "on-failure"
    assert service["KillSignal"] == "SIGTERM" and service["KillMode"] == "mixed"
    assert int(service["TimeoutStopSec"]) > 45  # the leave deadline from --set, plus the hand-off margin
    assert service["WorkingDirectory"].replace("%%", "%") == str(home)
    assert f'Environment="VOLUNTEER_HOME={home}"'.replace("%", "%%") in path.read_text()
    assert unit["Install"]["WantedBy"] == "default.target"
    assert "User" not in service

    argv = exec_argv(service["ExecStart"])
    assert argv[:6] == [sys.executable, "-m", "volunteer", "join", "demo", "--home"]
    assert argv[6] == str(home) and argv[7:] == ["--num-experts", "2", "--set", "leave_timeout_s=45"]
    ran = subprocess.run([*argv, "--help"], capture_output=True, text=True, env=env, timeout=60)
    assert ran.returncode == 0, ran.stderr  # every argument is one `volunteer join` accepts
    assert "EXPERIMENT" in ran.stdout

    analyze = shutil.which("systemd-analyze")
    if analyze is None:
        pytest.skip("systemd-analyze not installed: the unit was checked with configparser only")
    verify = subprocess.run([analyze, "verify", str(path)], capture_output=True, text=True, timeout=60)
    assert verify.returncode == 0, verify.stderr
    assert path.name not in verify.stderr, verify.stderr  # no warning about our file


def test_print_gives_a_system_unit_and_writes_nothing(tmp_path):
    empty = tmp_path / "bin"
    empty.mkdir()
    env = environment(tmp_path, empty)
    out = cli(["service", "install", "demo", "--home", str(tmp_path / "h"), "--print", "--user", "volunteer"],
              env, tmp_path)
    assert out.returncode == 0, out.stderr
    assert not unit_path(tmp_path).exists()
    unit = configparser.ConfigParser(interpolation=None, strict=False)
    unit.optionxform = str
    unit.read_string(out.stdout)
    assert unit["Service"]["User"] == "volunteer"
    assert unit["Install"]["WantedBy"] == "multi-user.target"
    assert unit["Unit"]["After"] == "network-online.target"
    assert "/etc/systemd/system/volunteer-demo.service" in out.stderr


def fake_systemctl(bin_dir: Path, log: Path, fail: bool = False) -> None:
    """A systemctl stand-in that records its arguments (and answers ``show``)."""
    script = bin_dir / "systemctl"
    body = ('echo "Failed to connect to bus: No medium found" >&2; exit 1' if fail else
            'case "$*" in *show*) echo ActiveState=active; echo SubState=running; '
            'echo UnitFileState=enabled; echo MainPID=4242;; esac; exit 0')
    script.write_text(f'#!/bin/sh\necho "$*" >> "{log}"\n{body}\n')
    script.chmod(0o755)


def test_install_status_uninstall_drive_systemctl(tmp_path):
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir()
    log = tmp_path / "calls"
    fake_systemctl(bin_dir, log)
    env = environment(tmp_path, bin_dir)
    out = cli(["service", "install", "demo", "--home", str(tmp_path / "h")], env, tmp_path)
    assert out.returncode == 0, out.stderr
    assert log.read_text().splitlines() == ["--user daemon-reload", "--user enable --now volunteer-demo.service"]
    assert "enabled and started volunteer-demo.service" in out.stdout and "enable-linger" in out.stdout

    out = cli(["service", "status"], env, tmp_path)
    assert out.returncode == 0, out.stderr
    assert "volunteer-demo.service: active (running), enabled, pid 4242" in out.stdout

    out = cli(["service", "uninstall"], env, tmp_path)
    assert out.returncode == 0, out.stderr
    assert log.read_text().splitlines()[-2:] == ["--user disable --now volunteer-demo.service",
                                                "--user daemon-reload"]
    assert not unit_path(tmp_path).exists()

    out = cli(["service", "status", "--name", "demo"], env, tmp_path)
    assert out.returncode == 1 and "not installed" in out.stdout
    out = cli(["service", "uninstall"], env, tmp_path)
    assert out.returncode == 1 and "no volunteer service is installed" in out.stderr


def test_a_failing_systemctl_is_one_line_naming_what_to_run(tmp_path):
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir()
    fake_systemctl(bin_dir, tmp_path / "calls", fail=True)
    env = environment(tmp_path, bin_dir)
    out = cli(["service", "install", "demo", "--home", str(tmp_path / "h")], env, tmp_path)
    assert out.returncode == 1
    assert out.stderr.count("\n") == 1 and out.stderr.startswith("error: systemctl failed: Failed to connect")
    assert "systemctl --user enable --now volunteer-demo.service" in out.stderr
    assert unit_path(tmp_path).exists()  # written: the user can enable it from a login session


def test_bad_input_is_refused_before_anything_is_written(tmp_path):
    empty = tmp_path / "bin"
    empty.mkdir()
    env = environment(tmp_path, empty)
    for args, words in ((["nosuchexperiment"], "unknown experiment"),
                        (["./missing.yaml"], "not found"),
                        (["demo", "--name", "bad name"], "service name"),
                        (["demo", "--", "--set", "leave_timeout_s=soon"], "leave_timeout_s"),
                        (["demo", "--", "--home", "/elsewhere"], "pass --home before")):
        out = cli(["service", "install", "--home", str(tmp_path / "h"), *args], env, tmp_path)
        assert out.returncode == 2, (args, out.stderr)
        assert words in out.stderr and out.stderr.count("\n") == 1
    assert not (tmp_path / "config").exists()
