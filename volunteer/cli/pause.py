"""``volunteer pause [--for DURATION]`` and ``volunteer resume``: stop and restart taking work.

Both are clients of the running daemon (control ops ``pause`` / ``resume``,
``volunteer.daemon.control_ops``). Pausing keeps the experts loaded and lets in-flight
requests finish; trainers get a typed "paused" reply and use other volunteers meanwhile,
and the DHT records say "paused". Resuming is instant. A pause lasts until ``resume``, the
end of ``--for``, or the daemon's exit (a restart starts unpaused unless a resource rule
applies). To stop for good, `volunteer leave` (BOINC's "finish" is a leave: in-flight work
finishes, experts are checkpointed and handed over).
"""

from __future__ import annotations

import json
import sys
import time
from pathlib import Path
from typing import Any, Optional

import typer

from volunteer.cli.console import EXIT_BAD_INPUT, domain_errors, fail
from volunteer.status.fmt import clock, duration

HOME_OPTION = typer.Option(None, "--home", envvar="VOLUNTEER_HOME", show_envvar=True,
                           help="Node home of the daemon.")


def pause(
    home: Optional[Path] = HOME_OPTION,
    for_: Optional[str] = typer.Option(None, "--for", metavar="DURATION",
                                       help="Resume by itself after this long: 90s, 15m, 2h, 1h30m, 1d (at most "
                                            "30d). Default: until `volunteer resume`."),
    as_json: bool = typer.Option(False, "--json", help="Print the pause state as JSON."),
) -> None:
    """Pause the running node: take no new work, keep the experts loaded, finish in-flight requests.

    Trainers get a typed "paused" reply and use other volunteers; the DHT records say "paused". `volunteer resume` takes work again at once. Resource rules (settings schedule, pause_on_battery, idle_minutes, other_cpu_limit_pct) pause and resume the node by themselves; a pause by hand wins over them. To stop for good use `volunteer leave` (it finishes in-flight work, checkpoints and hands the experts over: what BOINC calls "finish").
    """
    from volunteer.daemon.control_client import call
    from volunteer.daemon.home import resolve_home
    from volunteer.daemon.rules import RuleError, parse_duration

    for_s = None
    if for_ is not None:
        try:
            for_s = parse_duration(for_)
        except RuleError as exc:
            raise fail(f"--for: {exc}", EXIT_BAD_INPUT) from None
    root = resolve_home(home)
    with domain_errors():
        state = call(root, "pause", for_s=for_s)
    _print(state, as_json)


def resume(
    home: Optional[Path] = HOME_OPTION,
    as_json: bool = typer.Option(False, "--json", help="Print the pause state as JSON."),
) -> None:
    """Resume a paused node: take new work again, at once.

    Clears a pause made with `volunteer pause`. When a resource rule still applies (a schedule window, battery, the machine in use, busy CPU) the node stays paused and this says which rule; change that setting to run anyway.
    """
    from volunteer.daemon.control_client import call
    from volunteer.daemon.home import resolve_home

    root = resolve_home(home)
    with domain_errors():
        state = call(root, "resume")
    _print(state, as_json)


def _print(state: dict[str, Any], as_json: bool) -> None:
    if as_json:
        sys.stdout.write(json.dumps(state, indent=2, sort_keys=True) + "\n")
        return
    print(describe(state))


def describe(state: dict[str, Any], now: float | None = None) -> str:
    """One line: "paused by you until Mon 14:05 (resumes in 1d 23h)", "paused: low battery
    (resumes in 5m 00s, at 14:05)", "paused: on battery; set by the setting pause_on_battery
    (...)", "running: taking new work". The time of the resume is said once: added only when
    the reason does not already say it (with the weekday when it is not today)."""
    if not state.get("paused"):
        return "running: taking new work"
    from volunteer.daemon.rules import pause_text

    text = pause_text(state)
    until = state.get("until")
    if isinstance(until, (int, float)) and not isinstance(until, bool):
        now = time.time() if now is None else now
        at = clock(until, now)
        text += f" (resumes in {duration(max(0, int(until - now)))}"
        text += ")" if at in text else f", at {at})"
    setting = RULE_SETTINGS.get(str(state.get("rule")))
    if setting:
        text += f"; set by the setting {setting} (see `volunteer settings`)"
    return text


RULE_SETTINGS = {"schedule": "schedule", "battery": "pause_on_battery", "idle": "idle_minutes",
                 "cpu": "other_cpu_limit_pct", "transfer_cap": "daily_transfer_cap"}
