"""``volunteer leave``: drain, checkpoint and stop the running node, then print a summary."""

from __future__ import annotations

import json
import sys
import time
from pathlib import Path
from typing import Optional

import typer

from volunteer.cli.console import EXIT_FAILED, EXIT_OK, domain_errors, fail
from volunteer.status.fmt import duration


def leave(
    home: Optional[Path] = typer.Option(None, "--home", envvar="VOLUNTEER_HOME", show_envvar=True,
                                        help="Node home of the daemon to stop."),
    timeout: Optional[float] = typer.Option(None, "--timeout", min=0.0, max=3600.0,
                                            help="Deadline in seconds (default: setting leave_timeout_s)."),
    as_json: bool = typer.Option(False, "--json", help="Print the leave report as JSON."),
) -> None:
    """Leave gracefully: refuse new work (trainers get a typed "draining" reply and retry elsewhere), finish in-flight requests, checkpoint every hosted expert, and exit.

    Exits 0 when everything finished in time, 1 (saying what was cut short) otherwise.
    """
    from volunteer.daemon.control_client import call
    from volunteer.daemon.home import NodeHome, resolve_home

    root = resolve_home(home)
    with domain_errors():
        # The reply comes once the daemon has drained and checkpointed; allow for the
        # checkpoint running past the drain deadline.
        report = call(root, "leave", wait_s=(timeout if timeout is not None else 3600.0) + 120.0, timeout=timeout)
    node = NodeHome(root)
    deadline = time.monotonic() + 30.0
    while node.is_locked() and time.monotonic() < deadline:  # the process exits right after replying
        time.sleep(0.05)
    if as_json:
        sys.stdout.write(json.dumps(report, indent=2, sort_keys=True) + "\n")
    else:
        ck = report.get("checkpoint") or {}
        n = len(ck.get("written", [])) + len(ck.get("unchanged", []))
        print(f"left in {duration(report.get('duration_s', 0))}: finished {report.get('completed', 0)} in-flight "
              f"request(s), cut short {report.get('cut_short', 0)}; checkpointed {n} expert(s) to "
              f"{ck.get('directory', root)}")
        for handoff in report.get("handoffs", []):  # per expert: who took it over, or why nobody
            print(handoff.get("line", ""))
        for problem in report.get("problems", []):
            print(f"cut short: {problem}")
    if not report.get("clean", False):
        raise fail("the leave was not clean: " + "; ".join(report.get("problems", [])), EXIT_FAILED)
    raise typer.Exit(EXIT_OK)
