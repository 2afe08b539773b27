"""``volunteer doctor [EXPERIMENT]``: preflight of this machine and its way into the swarm.

Prints one line per check with a verdict (ok / warn / fail / skip) and, under a problem, the
fix; ``--json`` prints the ``volunteer.doctor.report.Report`` as JSON. Exit code: 0 the node
can serve (warnings allowed), 1 it cannot (a check failed), 2 bad input (manifest, settings,
flags). The checks live in ``volunteer.doctor``.
"""

from __future__ import annotations

import json
import shutil
import sys
from pathlib import Path
from typing import Optional

import typer

from volunteer.cli.console import EXIT_FAILED, EXIT_OK, domain_errors


def doctor(
    experiment: Optional[str] = typer.Argument(None, help="Manifest path or shipped name (e.g. demo): its "
                                               "bootstrap peers, relays, listen port and grid are checked. "
                                               "Without it only --bootstrap is probed."),
    home: Optional[Path] = typer.Option(None, "--home", envvar="VOLUNTEER_HOME", show_envvar=True,
                                        help="Node home to check (permissions, free disk, settings)."),
    bootstrap: list[str] = typer.Option([], "--bootstrap", metavar="MULTIADDR",
                                        help="A peer to probe (/ip4/../tcp/../p2p/ID), before the manifest's; "
                                             "repeatable."),
    offline: bool = typer.Option(False, "--offline", help="Local checks and one dial of each bootstrap peer only (no reachability, "
                                                            "relay, clock or hole-punch probe)."),
    as_json: bool = typer.Option(False, "--json", help="Print machine-readable JSON."),
) -> None:
    """Check that this machine can serve: Python/torch/CUDA and the device, the home (writable, private identity key) and free disk, free ports, the bootstrap peers (each dialled: TCP, then the libp2p handshake), reachability by dial-back, a relay, clock skew against peers, and a hole punch when a peer offers one.

    Each line says what was found and, when it is not ok, what to do. Exit code 0: the node can serve (warnings allowed); 1: a check failed; 2: bad manifest, settings or flags. Offline it takes seconds; with reachable peers usually 10-30 s, at most about 90 s (every step has its own deadline).
    """
    from volunteer.daemon.home import resolve_home
    from volunteer.doctor.report import render_text
    from volunteer.doctor.runner import run_doctor

    with domain_errors():
        report = run_doctor(experiment, resolve_home(home), bootstrap, network=not offline)
    if as_json:
        sys.stdout.write(json.dumps(report.as_json(), indent=2, sort_keys=True) + "\n")
    else:
        width = shutil.get_terminal_size((80, 24)).columns if sys.stdout.isatty() else 80
        sys.stdout.write(render_text(report, width) + "\n")
    raise typer.Exit(EXIT_OK if report.can_serve else EXIT_FAILED)
