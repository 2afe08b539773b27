"""``volunteer status``: the node's health as a live dashboard, one frame, plain text or JSON."""

from __future__ import annotations

import json
import os
import sys
import time
from pathlib import Path
from typing import Any, Optional

import typer

from volunteer.cli.console import EXIT_NOT_RUNNING, domain_errors, fail, stdout_console


def status(
    home: Optional[Path] = typer.Option(None, "--home", envvar="VOLUNTEER_HOME", show_envvar=True,
                                        help="Node home of the daemon to ask."),
    once: bool = typer.Option(False, "--once", help="Print one frame and exit (default when not a TTY)."),
    as_json: bool = typer.Option(False, "--json", help="Print the full snapshot as JSON and exit."),
    interval: float = typer.Option(1.0, "--interval", min=0.2, max=60.0, help="Refresh period of the live view (s)."),
) -> None:
    """Show the running node: state, device, each hosted expert's load, network, and why it is idle or degraded.

    On a terminal this is a live dashboard (Ctrl-C to quit) laid out for the terminal's width; piped, it prints plain text once, fitted to COLUMNS or the terminal behind the pipe (long lines wrap, addresses stay whole). The addresses other volunteers pass to --bootstrap are printed whole, each on a line of its own.
    """
    from volunteer.daemon.control_client import call
    from volunteer.daemon.home import resolve_home

    root = resolve_home(home)
    with domain_errors():
        snap = call(root, "status")
        if as_json:
            sys.stdout.write(json.dumps(snap, indent=2, sort_keys=True) + "\n")
            return
        if not sys.stdout.isatty():
            from volunteer.status.plain import render_plain

            sys.stdout.write(render_plain(snap, plain_width()) + "\n")
            return
        from volunteer.status.dashboard import print_dashboard

        console = stdout_console()
        if once:
            print_dashboard(console, snap)
            return
        _live(root, console, snap, interval)


def plain_width() -> int | None:
    """The width to fit the plain text to: ``COLUMNS`` when set, else the terminal behind
    stderr or stdin (``volunteer status | less`` in a terminal), else None (a file, cron: every
    line stays whole)."""
    cols = os.environ.get("COLUMNS", "").strip()
    if cols.isdigit() and int(cols) > 0:
        return int(cols)
    for fd in (2, 0):
        try:
            return os.get_terminal_size(fd).columns or None
        except (OSError, ValueError):
            continue
    return None


def _live(root: Path, console: Any, snap: dict, interval: float) -> None:
    """Redraw the dashboard every ``interval`` s; the addresses to copy are printed above the
    redrawn area (whole, soft-wrapped), once and again whenever they change."""
    from rich.live import Live

    from volunteer.daemon.control_client import ControlError, DaemonNotRunningError, call
    from volunteer.status.dashboard import print_addresses, render_dashboard
    from volunteer.status.network_view import copy_addresses

    shown = copy_addresses(snap)
    print_addresses(console, shown)
    try:
        with Live(render_dashboard(snap), console=console, auto_refresh=False, screen=False) as live:
            while True:
                time.sleep(interval)
                try:
                    snap = call(root, "status")
                except (DaemonNotRunningError, ControlError):
                    break
                if copy_addresses(snap) != shown:
                    shown = copy_addresses(snap)
                    print_addresses(live.console, shown)
                live.update(render_dashboard(snap), refresh=True)
    except KeyboardInterrupt:
        return
    raise fail("the daemon stopped", EXIT_NOT_RUNNING)
