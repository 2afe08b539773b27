"""``volunteer settings``: every local setting, its value and the layer it came from."""

from __future__ import annotations

import json
import os
import sys
from pathlib import Path
from typing import Optional

import typer

from volunteer.cli.console import domain_errors


def settings(
    home: Optional[Path] = typer.Option(None, "--home", envvar="VOLUNTEER_HOME", show_envvar=True,
                                        help="Node home whose config.yaml is read."),
    as_json: bool = typer.Option(False, "--json", help="Print machine-readable JSON."),
) -> None:
    """List the settings: default < <home>/config.yaml < VOLUNTEER_* environment < flags."""
    from volunteer.daemon.home import NodeHome, resolve_home
    from volunteer.daemon.settings import resolve_settings

    with domain_errors():
        node = NodeHome(resolve_home(home))
        resolved = resolve_settings(node.config_file, os.environ, {})
    rows = resolved.describe()
    if as_json:
        sys.stdout.write(json.dumps({"config_file": str(node.config_file), "settings": rows}, indent=2) + "\n")
        return
    width = max(len(r["name"]) for r in rows)
    print(f"config file: {node.config_file}")
    for r in rows:
        print(f"{r['name']:<{width}}  {r['value']!s:<12} ({r['source']}, env {r['env']})  {r['help']}")
