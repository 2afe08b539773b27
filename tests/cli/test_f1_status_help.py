"""``volunteer status --help`` paragraphs are rewrapped by typer, never broken mid-sentence by
hard line breaks in the docstring (through the real CLI, on a wide terminal)."""

from __future__ import annotations

from tests.conftest import cli_env, run_cli


def test_status_help_paragraph_is_one_line_when_it_fits() -> None:
    done = run_cli("status", "--help", env=cli_env(COLUMNS="400"))
    assert done.returncode == 0, done.stderr
    lines = [line.strip() for line in done.stdout.splitlines()]
    assert any(line.startswith("On a terminal this is a live dashboard") and line.endswith("on a line of its own.")
               for line in lines), done.stdout
