"""``volunteer --version`` / ``-V`` print the installed version and exit 0 before any command
runs (through the real CLI); the ``version`` command stays and prints the same line."""

from __future__ import annotations

import pytest

from tests.conftest import run_cli
from volunteer import __version__


@pytest.mark.parametrize("flag", ["--version", "-V"])
def test_version_flag(flag: str) -> None:
    done = run_cli(flag)
    assert done.returncode == 0, done.stderr
    assert done.stdout.strip() == f"volunteer {__version__}"


def test_version_flag_wins_over_a_command_and_the_command_stays() -> None:
    done = run_cli("--version", "status", "--home", "/nonexistent/never-created")
    assert done.returncode == 0 and done.stdout.strip() == f"volunteer {__version__}", done.stderr
    done = run_cli("version")
    assert done.returncode == 0 and done.stdout.strip() == f"volunteer {__version__}"
    assert "--version" in run_cli("--help").stdout
