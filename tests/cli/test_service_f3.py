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


def _other_account() -> tuple[str, str]:
    import getpass
    import pwd

    me = getpass.getuser()
    for entry in pwd.getpwall():
        if entry.pw_name != me and entry.pw_dir not in ("", "/") and entry.pw_name.isidentifier():
            return entry.pw_name, entry.pw_dir
    pytest.skip("no second account on this machine")


def test_a_system_unit_for_another_user_uses_their_home(tmp_path: Path) -> None:
    env = _no_systemctl(tmp_path)
    user, their_dir = _other_account()
    out = cli(["service", "install", "demo", "--print", "--user", user], env, tmp_path)
    assert out.returncode == 0, out.stderr
    lines = dict(line.split("=", 1) for line in out.stdout.splitlines() if "=" in line and not line.startswith("#"))
    assert lines["User"] == user
    assert lines["WorkingDirectory"].startswith(their_dir.rstrip("/") + "/")
    assert f"--home {lines['WorkingDirectory']}" in lines["ExecStart"]
    assert lines["RestartPreventExitStatus"] == "2"
    help_text = " ".join(cli(["service", "install", "--help"], {**env, "COLUMNS": "300"}, tmp_path).stdout
                         .replace("\u2502", " ").split())
    assert "with --print --user NAME, that account's" in help_text


@pytest.mark.parametrize(("args", "words"), [
    (["--print", "--user", "no-such-user-f3"], "no such user on this machine"),
    (["--print", "--user", "bad user"], "not a user name"),
    (["--print", "--user", "-x"], "not a user name"),
    (["--user", "root"], "--user needs --print"),
    (["--", "--bogus-flag"], "No such option: --bogus-flag"),
    (["--", "--num-experts", "x"], "--num-experts"),
    (["--", "--set", "schedule=bogus"], "schedule: "),
    (["--", "--public", "maybe"], "expected one of yes, no, auto"),
    (["--", "--bootstrap", "/ip4/127.0.0.1/tcp/1"], "/p2p/<peer id>"),
    (["--", "--help"], "not a join argument"),
])
def test_bad_users_and_join_arguments_are_refused_at_install(tmp_path: Path, args: list[str], words: str) -> None:
    env = _no_systemctl(tmp_path)
    home = [] if "no such" in words else ["--home", str(tmp_path / "h")]  # with --home it may be absent
    out = cli(["service", "install", "demo", *home, *args], env, tmp_path)
    assert out.returncode == 2, (args, out.stdout, out.stderr)
    assert words in out.stderr and out.stderr.count("\n") == 1, out.stderr
    assert not (tmp_path / "config").exists() and not (tmp_path / "h").exists()


def test_the_user_unit_never_restarts_on_bad_input(tmp_path: Path) -> None:
    env = _no_systemctl(tmp_path)
    out = cli(["service", "install", "demo", "--home", str(tmp_path / "h"), "--no-start"], env, tmp_path)
    assert out.returncode == 0, out.stderr
    from volunteer.cli.console import EXIT_BAD_INPUT

    assert f"RestartPreventExitStatus={EXIT_BAD_INPUT}\n" in unit_path(tmp_path).read_text()


def _systemctl(tmp_path: Path, body: str) -> tuple[dict[str, str], Path]:
    """A systemctl stand-in on an otherwise empty PATH that records its calls and runs ``body``."""
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir(exist_ok=True)
    log = tmp_path / "calls"
    script = bin_dir / "systemctl"
    script.write_text(f'#!/bin/sh\necho "$*" >> "{log}"\n{body}\n')
    script.chmod(0o755)
    return environment(tmp_path, bin_dir), log


NO_BUS = 'echo "Failed to connect to bus: No medium found" >&2; exit 1'


def test_uninstall_without_a_reachable_manager_removes_the_unit(tmp_path: Path) -> None:
    env, log = _systemctl(tmp_path, NO_BUS)
    out = cli(["service", "install", "demo", "--home", str(tmp_path / "h")], env, tmp_path)
    assert out.returncode == 1 and unit_path(tmp_path).exists()  # written; enabling needs a manager
    wants = unit_path(tmp_path).parent / "default.target.wants"
    wants.mkdir()
    (wants / unit_path(tmp_path).name).symlink_to(unit_path(tmp_path))  # enabled once, elsewhere
    out = cli(["service", "uninstall"], env, tmp_path)
    assert out.returncode == 0, out.stdout + out.stderr
    assert not unit_path(tmp_path).exists() and not list(wants.iterdir())
    assert "no user service manager is reachable here (Failed to connect to bus" in out.stdout
    assert "systemctl --user stop volunteer-demo.service; systemctl --user daemon-reload" in out.stdout
    assert log.read_text().splitlines()[-1] == "--user disable --now volunteer-demo.service"
    out = cli(["service", "uninstall"], env, tmp_path)
    assert out.returncode == 1 and "no volunteer service is installed" in out.stderr


def test_another_systemctl_failure_keeps_the_unit_unless_forced(tmp_path: Path) -> None:
    env, _ = _systemctl(tmp_path, 'case "$*" in *disable*) echo "Access denied" >&2; exit 1;; esac; exit 0')
    out = cli(["service", "install", "demo", "--home", str(tmp_path / "h")], env, tmp_path)
    assert out.returncode == 0, out.stderr
    out = cli(["service", "uninstall"], env, tmp_path)
    assert out.returncode == 1 and unit_path(tmp_path).exists()
    assert "systemctl failed: Access denied" in out.stderr and "--force" in out.stderr
    out = cli(["service", "uninstall", "--force"], env, tmp_path)
    assert out.returncode == 0, out.stderr
    assert not unit_path(tmp_path).exists() and "although systemctl failed (Access denied)" in out.stdout
