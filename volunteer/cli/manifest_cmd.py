"""``volunteer manifest``: the experiment manifest reference and a checker, for researchers.

``schema`` prints every key (type, accepted values, default, meaning) generated from the
declarations the validator itself walks (``volunteer.manifest.reference``), so it is never
out of date. ``check FILE`` validates a manifest without starting anything and summarises
what volunteers would run; it imports neither torch nor libp2p (under a second).
"""

from __future__ import annotations

import json
import sys
from typing import Any

import typer

from volunteer.cli.console import EXIT_BAD_INPUT, fail

HELP = """Write and check experiment manifests (the YAML file every volunteer of one experiment shares).

`volunteer manifest schema` prints the reference of every key; `volunteer manifest check FILE` validates a file and summarises it. Start from a fully commented example: `volunteer manifest example lm > my-experiment.yaml` (a language-model MoE layer), or look at the local demo with `volunteer manifest check demo`.
"""

manifest_app = typer.Typer(help=HELP, no_args_is_help=True, add_completion=False,
                           context_settings={"help_option_names": ["-h", "--help"]})


@manifest_app.command()
def schema(
    fmt: str = typer.Option("text", "--format", "-f", metavar="text|markdown|json",
                            help="text (a terminal), markdown (docs) or json (tools)."),
) -> None:
    """Print the manifest reference: every section and key, its type, accepted values, default and meaning."""
    from volunteer.manifest.reference import FORMATS, render

    if fmt not in FORMATS:
        raise fail(f"--format: expected one of {', '.join(FORMATS)}, got {fmt!r}", EXIT_BAD_INPUT)
    sys.stdout.write(render(fmt))


def _summary(m: Any) -> dict[str, Any]:
    from volunteer.experts.registry import available_experts, kind_provider

    installed = m.expert.kind in available_experts()
    return {
        "ok": True,
        "source": m.source,
        "experiment": {"name": m.experiment.name, "version": m.experiment.version},
        "fingerprint": m.fingerprint(),
        "expert": {"kind": m.expert.kind, "hidden_dim": m.expert.hidden_dim, "options": dict(m.expert.options),
                   "package": m.expert.package, "installed_here": installed,
                   "provided_by": kind_provider(m.expert.kind)},
        "grid": {"prefix": m.grid.prefix, "dims": list(m.grid.dims), "experts": m.grid.size},
        "replication": m.shards.replication,
        "bootstrap": len(m.network.bootstrap),
        "relays": len(m.network.relays),
        "admission": "open" if m.admission.open else "closed",
        "wire_compression": m.wire.compression or "none",
        "replica_averaging_s": m.averaging.replica_period_s,
    }


@manifest_app.command()
def check(
    experiment: str = typer.Argument(..., metavar="FILE|NAME", help="A manifest file, or the name of a shipped one."),
    as_json: bool = typer.Option(False, "--json", help="Print machine-readable JSON."),
) -> None:
    """Validate a manifest: `ok` and a summary, or one line naming the key and what it expects (exit 2)."""
    from volunteer.manifest import ManifestError, load_manifest

    try:
        m = load_manifest(experiment)
    except ManifestError as exc:
        raise fail(str(exc), EXIT_BAD_INPUT) from None
    s = _summary(m)
    if as_json:
        sys.stdout.write(json.dumps(s, indent=2, sort_keys=True) + "\n")
        return
    ex = s["expert"]
    kind_note = "installed here" if ex["installed_here"] else (
        f"not installed here: pip install {ex['package']}" if ex["package"] else "not installed here")
    boot = (f"{s['bootstrap']} bootstrap peer(s)" if s["bootstrap"]
            else "no bootstrap peers: the first node starts a new swarm")
    lines = [
        f"ok: {m.source}",
        f"experiment  {s['experiment']['name']} version {s['experiment']['version']} "
        f"(fingerprint {s['fingerprint']})",
        f"expert      {ex['kind']} hidden_dim={ex['hidden_dim']}"
        + (f" options={json.dumps(ex['options'], sort_keys=True)}" if ex["options"] else "") + f" ({kind_note})",
        f"grid        {m.grid.prefix}.{'.'.join('*' for _ in m.grid.dims)} dims={s['grid']['dims']}: "
        f"{s['grid']['experts']} experts, {s['replication']} replica(s) each wanted",
        f"network     {boot}, {s['relays']} relay(s), admission {s['admission']}",
        f"wire        compression {s['wire_compression']}; replica averaging "
        + (f"every {s['replica_averaging_s']:g} s" if s["replica_averaging_s"] else "off"),
    ]
    print("\n".join(lines))


@manifest_app.command()
def example(
    name: str = typer.Argument("lm", help="Which example (`lm`: a language-model MoE layer)."),
) -> None:
    """Print a bundled, fully commented example manifest to copy: `volunteer manifest example lm > my.yaml`."""
    from volunteer.manifest import ManifestError
    from volunteer.manifest.loader import example_text

    try:
        sys.stdout.write(example_text(name))
    except ManifestError as exc:
        raise fail(str(exc), EXIT_BAD_INPUT) from None
