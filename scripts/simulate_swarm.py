"""Swarm simulator: the product's DHT, registry and assignment code at 100 to 10,000 peers.

Thousands of simulated volunteers in one process run the project's real routing tables
(py-libp2p's ``RoutingTable``) and lookups (``volunteer.net.dht_routing.table_lookup``
around ``dht_rpc.run_lookup``) over a simulated transport (``volunteer.sim``: lognormal RTT
per link, request loss, 91% of volunteers behind NAT and only public ones serving the DHT,
churn that kills peers without a goodbye) on a virtual clock, so an hour of swarm time runs
in seconds to minutes. For each swarm size N it reports (one JSON row per N):

- DHT (``volunteer.sim.dht_swarm``): lookup hops (rounds) and latency p50/p99, lookup success
  (the reader reaches a peer holding the record) and recall of the true closest set, without
  churn and with ``replace_per_hour`` of the peers replaced per hour; DHT requests per volunteer
  and per DHT server per minute from the product's upkeep constants (heartbeat, replication,
  closest-set cache);
- registry, assignment, beam search and relays (``volunteer.sim.grid_scale.measure_grid``,
  ``volunteer.sim.relays.relay_plan``) when that level is installed, "not measured" otherwise.

Every figure comes from ``--seed``: the same seed gives the same rows.

    python scripts/simulate_swarm.py --preset smoke|default|full [--json PATH] [--plots DIR]
        [--seed N] [--peers 100,1000] [--levels dht,grid]

Presets: smoke (N=100, seconds, for CI), default (N=100 and 1,000, about a minute),
full (N=100, 1,000 and 10,000, several minutes). Plots (PNG, matplotlib): hops, latency
and success under churn against N.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import sys
import time
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

from volunteer.sim.churn import ChurnModel  # noqa: E402
from volunteer.sim.dht_swarm import SwarmSpec, measure_dht  # noqa: E402
from volunteer.sim.transport import LinkModel  # noqa: E402
from volunteer.sim.upkeep import constants  # noqa: E402
from volunteer.sim.wire_sizes import message_bytes  # noqa: E402

PRESETS: dict[str, dict[str, Any]] = {
    "smoke": dict(peers=(100,), lookups=20, churn_lookups=20, churn_hours=0.25),
    "default": dict(peers=(100, 1000), lookups=100, churn_lookups=100, churn_hours=1.0),
    "full": dict(peers=(100, 1000, 10000), lookups=200, churn_lookups=200, churn_hours=1.0),
}
NOT_MEASURED = "not measured"


def _level_two() -> tuple[Any, Any, str]:
    """S2's registry/relay level: (measure_grid, relay_plan, status); None when absent."""
    try:
        from volunteer.sim.grid_scale import measure_grid
    except (ImportError, AttributeError) as e:
        return None, None, f"{NOT_MEASURED}: volunteer.sim.grid_scale ({e})"
    try:
        from volunteer.sim.relays import relay_plan
    except (ImportError, AttributeError) as e:
        return measure_grid, None, f"relays {NOT_MEASURED}: volunteer.sim.relays ({e})"
    return measure_grid, relay_plan, "measured"


def spec_for(preset: str, peers: int) -> SwarmSpec:
    """The DHT measurement of one swarm size under a preset."""
    p = PRESETS[preset]
    return SwarmSpec(peers=peers, lookups=p["lookups"], churn_lookups=p["churn_lookups"],
                     churn_hours=p["churn_hours"])


def assumptions(preset: str) -> dict[str, Any]:
    """What the figures rest on: link model, churn, swarm parameters, product constants."""
    spec = spec_for(preset, 0)
    return {
        "links": dataclasses.asdict(LinkModel()),
        "churn": dataclasses.asdict(ChurnModel()),
        "churn_hours": spec.churn_hours,
        "bootstrap_peers": spec.bootstrap,
        "join_gap_s": spec.join_gap_s,
        "experts_per_volunteer": spec.experts_per_volunteer,
        "grid": list(spec.grid),
        "lookups": spec.lookups,
        "churn_lookups": spec.churn_lookups,
        "product_constants": constants(),
        "message_bytes": message_bytes(),
        "peer_ids": "Ed25519-shaped identity multihashes without keys (ids serve only distance)",
        "dht_servers": "public peers only (NATed volunteers are DHT clients)",
    }


def run(preset: str, seed: int, peers: tuple[int, ...],
        levels: tuple[str, ...] = ("dht", "grid")) -> dict[str, Any]:
    """All rows of a preset (see module docstring); ``levels`` picks the levels to run."""
    measure_grid, relay_plan, level_two = _level_two()
    if "grid" not in levels:
        measure_grid, relay_plan, level_two = None, None, f"{NOT_MEASURED} (--levels)"
    rows = []
    for n in peers:
        t0 = time.perf_counter()
        row = measure_dht(spec_for(preset, n), seed) if "dht" in levels else {"peers": n}
        row["dht_wall_s"] = round(time.perf_counter() - t0, 1)
        extra: dict[str, Any] = {}
        if measure_grid is not None:
            extra.update(measure_grid(n, seed, preset))
        else:
            extra["discoverable_servers_fraction"] = None
        if relay_plan is not None:
            extra.update({k if k.startswith("relay") else f"relay_{k}": v
                          for k, v in relay_plan(n, seed).items()})
        row.update({k: v for k, v in extra.items() if k not in row})
        rows.append(row)
        print(_line(row), flush=True)
    report = {"preset": preset, "seed": seed, "level_two": level_two,
              "assumptions": assumptions(preset), "rows": rows}
    if measure_grid is not None:  # beam search vs grid size, at the preset's largest N up to 1,000
        from volunteer.sim.grid_scale import beam_by_grid

        n = min(max(peers), 1000)
        report["beam_by_grid"] = beam_by_grid(n, seed, preset)
        for b in report["beam_by_grid"]:
            print("  ".join(f"{k}={_fmt(v)}" for k, v in b.items()), flush=True)
    return report


def _fmt(v: Any) -> str:
    if v is None:
        return "-"
    return f"{v:.3g}" if isinstance(v, float) else str(v)


def _line(row: dict[str, Any]) -> str:
    keys = ("peers", "dht_servers", "lookup_hops_p50", "lookup_hops_p99", "lookup_ms_p50",
            "lookup_ms_p99", "lookup_ms_p50_warm", "lookup_success", "lookup_success_churn",
            "lookup_ms_p50_churn",
            "dht_msgs_per_volunteer_per_min", "dht_msgs_per_server_per_min",
            "discoverable_servers_fraction", "dht_wall_s")
    return "  ".join(f"{k}={_fmt(row.get(k))}" for k in keys)


def plot(report: dict[str, Any], out: Path) -> list[Path]:
    """PNG plots of hops, latency and success under churn against N; the files written."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    rows = report["rows"]
    n = [r["peers"] for r in rows]
    churn = report["assumptions"]["churn"]["replace_per_hour"]
    out.mkdir(parents=True, exist_ok=True)
    figures = {
        "lookup_hops.png": ("lookup hops (rounds of requests)",
                            ["lookup_hops_p50", "lookup_hops_p99", "lookup_hops_p50_churn"]),
        "lookup_latency.png": ("lookup latency, ms (cold, warm, churn)",
                               ["lookup_ms_p50", "lookup_ms_p99", "lookup_ms_p50_warm",
                                "lookup_ms_p50_churn", "lookup_ms_p99_churn"]),
        "lookup_success.png": (f"lookup success and recall (churn: {churn:.0%}/h replaced)",
                               ["lookup_success", "lookup_success_churn", "lookup_recall",
                                "lookup_recall_churn"]),
    }
    for r in rows:  # the registry level's old layout, side by side with the current one
        old = r.get("old_layout") or {}
        r["discoverable_old_layout"] = old.get("discoverable_servers_fraction")
        r["hot_uid_listed_old_layout"] = old.get("hot_uid_servers_listed_fraction")
    figures["registry_discoverable.png"] = (
        "fraction of servers listed (current vs old layout)",
        ["discoverable_servers_fraction", "discoverable_old_layout",
         "hot_uid_servers_listed_fraction", "hot_uid_listed_old_layout"])
    written = []
    for name, (ylabel, keys) in figures.items():
        if not any(r.get(k) is not None for r in rows for k in keys):
            continue  # a level that did not run (--levels): no empty plot
        fig, ax = plt.subplots(figsize=(6, 4))
        for k in keys:
            ys = [r.get(k) for r in rows]
            if any(y is not None for y in ys):
                ax.plot(n, [float("nan") if y is None else y for y in ys], marker="o", label=k)
        ax.set_xscale("log")
        ax.set_xlabel("peers (N)")
        ax.set_ylabel(ylabel)
        ax.set_title(f"{ylabel} vs N\n(seed {report['seed']}, preset {report['preset']})",
                     fontsize=10)
        ax.grid(True, alpha=0.3)
        ax.legend(fontsize=8)
        fig.tight_layout()
        fig.savefig(out / name, dpi=100)
        plt.close(fig)
        written.append(out / name)
    beams = report.get("beam_by_grid") or []
    if beams:
        fig, ax = plt.subplots(figsize=(6, 4))
        xs = [b["grid_uids"] for b in beams]
        ax.plot(xs, [b.get("beam_lookups_per_step") for b in beams], marker="o", label="lookups per step")
        ax2 = ax.twinx()
        ax2.plot(xs, [b.get("beam_ms_per_step") for b in beams], marker="s", color="tab:red",
                 label="ms per step")
        ax.set_xscale("log")
        ax.set_xlabel(f"grid size (uids), {beams[0]['peers']} volunteers")
        ax.set_ylabel("DHT lookups per cold beam-search step")
        ax2.set_ylabel("ms per cold step")
        ax.set_title(f"beam search vs grid size (seed {report['seed']}, preset {report['preset']})",
                     fontsize=10)
        ax.grid(True, alpha=0.3)
        lines = ax.get_lines() + ax2.get_lines()
        ax.legend(lines, [ln.get_label() for ln in lines], fontsize=8, loc="best")
        fig.tight_layout()
        fig.savefig(out / "beam_by_grid.png", dpi=100)
        plt.close(fig)
        written.append(out / "beam_by_grid.png")
    return written


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--preset", choices=list(PRESETS), default="smoke",
                    help="smoke: N=100 (CI); default: 100, 1000; full: 100, 1000, 10000")
    ap.add_argument("--json", type=Path, default=None, help="write the figures here (JSON)")
    ap.add_argument("--plots", type=Path, default=None, help="write PNG plots into this folder")
    ap.add_argument("--seed", type=int, default=0, help="the seed of every random choice")
    ap.add_argument("--peers", default=None,
                    help="comma-separated swarm sizes instead of the preset's, e.g. 100,300")
    ap.add_argument("--levels", default="dht,grid",
                    help="comma-separated levels to run: dht (lookups, churn, DHT traffic), "
                         "grid (registry, assignment, beam search, relays)")
    args = ap.parse_args(argv)
    levels = tuple(x.strip() for x in args.levels.split(",") if x.strip())
    if not levels or set(levels) - {"dht", "grid"}:
        ap.error("--levels: a comma-separated subset of dht,grid")
    peers = (tuple(int(x) for x in args.peers.split(",")) if args.peers
             else PRESETS[args.preset]["peers"])
    if any(n < 2 for n in peers):
        ap.error("--peers: each size must be at least 2")
    t0 = time.perf_counter()
    report = run(args.preset, args.seed, peers, levels)
    report["wall_s"] = round(time.perf_counter() - t0, 1)
    if report["level_two"] != "measured":
        print(f"registry/relay level: {report['level_two']}")
    if args.json is not None:
        args.json.write_text(json.dumps(report, indent=2))
    if args.plots is not None:
        try:
            for path in plot(report, args.plots):
                print(f"plot: {path}")
        except ImportError:
            print("plots skipped: matplotlib is not installed (pip install -e '.[dev]')")
    return 0


if __name__ == "__main__":
    sys.exit(main())
