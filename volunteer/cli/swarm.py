"""``volunteer swarm [EXPERIMENT]``: the swarm as the DHT shows it, from a throwaway client peer."""

from __future__ import annotations

import json
import os
import sys
from pathlib import Path
from typing import Optional

import typer

from volunteer.cli.console import EXIT_BAD_INPUT, EXIT_FAILED, domain_errors, fail, stdout_console


def swarm(
    experiment: Optional[str] = typer.Argument(None, help="Manifest path or shipped name (e.g. demo); default: "
                                               "the experiment of the daemon running on --home."),
    home: Optional[Path] = typer.Option(None, "--home", envvar="VOLUNTEER_HOME", show_envvar=True,
                                        help="A home whose running daemon is asked for its swarm addresses."),
    bootstrap: list[str] = typer.Option([], "--bootstrap", metavar="MULTIADDR",
                                        help="A peer of the swarm to join through (/ip4/../tcp/../p2p/ID); "
                                             "repeatable."),
    as_json: bool = typer.Option(False, "--json", help="Print machine-readable JSON."),
    timeout: float = typer.Option(8.0, "--timeout", min=0.5, max=120.0, help="Deadline of each DHT lookup (s)."),
) -> None:
    """Show the swarm as the DHT shows it: volunteers and their reachability mix (public / relayed / private / unknown), each expert uid's replicas with version and load, the uids nobody serves, totals.

    Works from any machine: it joins the DHT as a throwaway client peer (no identity kept, nothing announced) through --bootstrap, the daemon running on --home, or the manifest's bootstrap peers. Exit code 1 when no peer answers, 2 for bad input.
    """
    from volunteer.daemon.home import resolve_home
    from volunteer.daemon.network import check_bootstrap_addrs
    from volunteer.daemon.settings import resolve_settings
    from volunteer.doctor.swarm_client import (
        NoBootstrapError,
        SwarmUnreachableError,
        daemon_addrs,
        daemon_view,
        read_swarm,
        swarm_targets,
    )
    from volunteer.manifest import load_manifest

    root = resolve_home(home)
    with domain_errors():
        flags = check_bootstrap_addrs(bootstrap)
        snap = daemon_view(root)
        if experiment is None:
            source = _daemon_manifest(snap)
            if source is None:
                raise fail("name the experiment (e.g. `volunteer swarm demo`): no daemon runs on "
                           f"{root} to ask", EXIT_BAD_INPUT)
            experiment = source
        manifest = load_manifest(experiment)
        settings = resolve_settings(root / "config.yaml" if root.is_dir() else None, os.environ, {})
        mine = daemon_addrs(snap) if _same_experiment(snap, manifest.experiment.name) else []
        targets = swarm_targets(flags, mine, manifest.network.bootstrap)
        try:
            summary = read_swarm(manifest.experiment.name, manifest.grid.prefix, manifest.grid.dims, targets,
                                 settings.listen_host, lookup_timeout=timeout)
        except NoBootstrapError as exc:
            raise fail(str(exc), EXIT_BAD_INPUT) from None
        except SwarmUnreachableError as exc:
            raise fail(str(exc), EXIT_FAILED) from None
    if as_json:
        sys.stdout.write(json.dumps(summary, indent=2, sort_keys=True) + "\n")
        return
    from volunteer.status.swarm_table import render_swarm

    console = stdout_console()
    if not sys.stdout.isatty():
        console.width = 80
    console.print(render_swarm(summary))


def _daemon_manifest(snap: object) -> str | None:
    """What the running daemon joined: its manifest's path, or the shipped name
    (the loader shows shipped ones as ``demo (shipped: volunteer/configs/demo.yaml)``)."""
    exp = snap.get("experiment") if isinstance(snap, dict) else None
    source = exp.get("source") if isinstance(exp, dict) else None
    if not isinstance(source, str) or not source:
        return None
    return source.split(" (shipped: ", 1)[0]


def _same_experiment(snap: object, name: str) -> bool:
    exp = snap.get("experiment") if isinstance(snap, dict) else None
    return isinstance(exp, dict) and exp.get("name") == name
