#!/usr/bin/env python
"""Learning@home's throughput experiment: DMoE training vs a sequential model-parallel
pipeline of the same blocks, as the network's one-way latency grows.

    python scripts/experiments/throughput_latency.py --preset smoke|default|full [--out DIR] [--json PATH]

Real volunteers: ``daemons`` ``volunteer join`` processes (offline, ZeroMQ direct, default
settings) serve a grid of ``layers x experts`` ``ffn`` experts (``configs/throughput.yaml``).
Two ways to train through them, each measured at every latency:

- **DMoE**: a model of ``layers`` ``RemoteMixtureOfExperts`` layers (``k_best`` experts per
  sample and layer, all calls of a layer in parallel, forward and backward), trained by
  ``trainers`` independent trainer threads at once, as Learning@home trains: asynchronous
  trainers, each with its own gates, sharing the volunteers' experts, which batch the
  requests of all trainers together. A single trainer is measured too (``dmoe_1``).
- **pipeline**: the same blocks as a model-parallel chain: ``layers x k_best`` experts called
  one after another with the whole batch, and their backward one after another: one batch
  in flight (no micro-batch overlap), as the paper's baseline.

Latency follows the paper's method: every request waits the one-way latency before it
leaves and its reply waits it again (``dmoe_lab.LatencyTransport``), so each expert call costs
two one-way latencies in forward and two in backward. Figure: training samples/s (forward +
backward through the swarm, plus the trainer's local optimizer step), counted over a time
window per point, the modes and latencies interleaved, ``rounds`` times over; each point is the
best of its rounds (a shared machine's other load only ever slows a round down; every round
is in the JSON). Each curve is also given relative to its own 0 ms figure, and each point
with the CPU it got (``<mode>_cpu_cores``: CPU seconds of the trainer and the volunteers per
second of wall time): on a shared machine a CPU-bound point is only as fast as its share.
"""

from __future__ import annotations

import os
import sys
import threading
import time
from typing import Any

os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")  # before torch: see scripts/bench_moe.py

import common
import dmoe_lab

NAME = "throughput_latency"
PRESETS: dict[str, dict[str, Any]] = {
    "smoke": dict(daemons=2, layers=2, experts=4, hidden=64, batch=32, k_best=2, trainers=4,
                  latencies_ms=[0, 50, 200], window_s=0.5, rounds=1, single_trainer=False),
    "default": dict(daemons=3, layers=3, experts=8, hidden=256, batch=384, k_best=2, trainers=16,
                    latencies_ms=[0, 10, 50, 100, 200], window_s=4.0, rounds=2, single_trainer=True),
    "full": dict(daemons=4, layers=4, experts=16, hidden=256, batch=384, k_best=2, trainers=32,
                 latencies_ms=[0, 10, 50, 100, 200], window_s=10.0, rounds=3, single_trainer=True),
}
PREFIX = "throughput.ffn"
TIMEOUT_S = 120.0


class Trainers:
    """The models of one measurement: step functions, and the expert calls they lost."""

    def __init__(self, transports: dict[str, Any], cfg: dict[str, Any], count: int, seed: int) -> None:
        import torch

        from volunteer.client.directory import StaticDirectory

        self.directory = StaticDirectory(transports)
        self.models: list[list[Any]] = []
        self.steps = []
        for t in range(count):
            torch.manual_seed(seed + t)
            layers = dmoe_lab.dmoe_layers(cfg["hidden"], PREFIX, cfg["layers"], cfg["experts"], self.directory,
                                          k_best=cfg["k_best"], timeout=TIMEOUT_S)
            self.models.append(layers)
            self.steps.append(self._dmoe_step(layers, torch.randn(cfg["batch"], cfg["hidden"])))
        self.failed_calls = 0
        self._lock = threading.Lock()

    def _dmoe_step(self, layers: list[Any], x: Any) -> Any:
        import torch

        opt = torch.optim.SGD([p for layer in layers for p in layer.parameters()], lr=1e-3)

        def step() -> int:
            y = x
            for layer in layers:
                y = layer(y)
            opt.zero_grad()
            y.pow(2).mean().backward()
            opt.step()
            failed = sum(len(layer.last_report.failed) + len(layer.last_report.backward_failed) for layer in layers)
            with self._lock:
                self.failed_calls += failed
            return int(x.shape[0])

        return step

    def close(self) -> None:
        for layers in self.models:
            for layer in layers:
                layer.close()


def pipeline_step(transports: dict[str, Any], cfg: dict[str, Any], seed: int) -> Any:
    """One trainer pushing its batch through ``layers x k_best`` remote blocks in sequence."""
    import torch

    from volunteer.client.remote_expert import RemoteExpert

    blocks = [RemoteExpert(f"{PREFIX}.{layer}.{e}", transports[f"{PREFIX}.{layer}.{e}"], timeout=TIMEOUT_S)
              for layer in range(cfg["layers"]) for e in range(cfg["k_best"])]
    torch.manual_seed(seed)
    x = torch.randn(cfg["batch"], cfg["hidden"])

    def step() -> int:
        y = x
        for block in blocks:
            y = block(y)
        y.pow(2).mean().backward()
        return int(x.shape[0])

    return step


def measure(swarm: dmoe_lab.Swarm, cfg: dict[str, Any], seed: int) -> list[dict[str, Any]]:
    """Samples/s of each mode at each latency (one set of models, latency switched between)."""
    with swarm.transports() as transports:
        wrappers = {id(t): t for t in transports.values()}.values()
        many = Trainers(transports, cfg, cfg["trainers"], seed)
        one = Trainers(transports, cfg, 1, seed + 1000) if cfg["single_trainer"] else None
        pipe = pipeline_step(transports, cfg, seed)
        try:
            modes = {"dmoe": many.steps, "pipeline": [pipe]}
            if one is not None:
                modes["dmoe_1"] = one.steps
            for steps in modes.values():  # warm-up: connections, caches, first allocations
                dmoe_lab.run_concurrently(steps, 0.0, 1)
            rows = [{"latency_ms": latency} for latency in cfg["latencies_ms"]]
            for r in range(cfg["rounds"]):
                for row in rows:
                    for w in wrappers:
                        w.one_way_s = row["latency_ms"] / 1000.0
                    for mode, steps in modes.items():
                        cpu0 = time.process_time() + swarm.cpu_seconds()
                        samples, n, secs = dmoe_lab.run_concurrently(steps, cfg["window_s"], 1)
                        cores = (time.process_time() + swarm.cpu_seconds() - cpu0) / secs
                        row.setdefault(f"{mode}_rounds", []).append(samples / secs)
                        row.setdefault(f"{mode}_cpu_cores_rounds", []).append(cores)
                        row[f"{mode}_steps"] = row.get(f"{mode}_steps", 0) + n
                    print(f"  round {r + 1}, {row['latency_ms']:>4} ms: " + ", ".join(
                        f"{m} {row[f'{m}_rounds'][-1]:.1f}/s" for m in modes), flush=True)
            failed = many.failed_calls + (one.failed_calls if one is not None else 0)
        finally:
            many.close()
            if one is not None:
                one.close()
    for mode in modes:
        for row in rows:  # best of the rounds: other load on the machine only ever slows a round
            best = max(range(len(row[f"{mode}_rounds"])), key=row[f"{mode}_rounds"].__getitem__)
            row[f"{mode}_samples_per_s"] = row[f"{mode}_rounds"][best]
            row[f"{mode}_cpu_cores"] = row[f"{mode}_cpu_cores_rounds"][best]
        base = rows[0][f"{mode}_samples_per_s"]
        for row in rows:
            row[f"{mode}_relative"] = row[f"{mode}_samples_per_s"] / base if base else None
    for row in rows:
        row["dmoe_over_pipeline"] = row["dmoe_samples_per_s"] / row["pipeline_samples_per_s"]
    rows[0]["dmoe_failed_calls_total"] = failed
    return rows


def main(argv: list[str] | None = None) -> int:
    args, cfg = common.parse_args(NAME, PRESETS, __doc__, argv)
    import torch

    torch.set_num_threads(1)  # many trainer threads in one process: no intra-op teams on top
    load0 = os.getloadavg()[0]
    print(f"{NAME} ({args.preset}): {cfg['daemons']} volunteers, {cfg['layers']} DMoE layers x "
          f"{cfg['experts']} experts (h={cfg['hidden']}), k_best={cfg['k_best']}, batch {cfg['batch']}, "
          f"{cfg['trainers']} DMoE trainers; pipeline of {cfg['layers'] * cfg['k_best']} blocks", flush=True)
    with dmoe_lab.Swarm("throughput", [cfg["layers"], cfg["experts"]], cfg["daemons"], cfg["hidden"]) as swarm:
        print(f"  volunteers serving after {swarm.started_s:.1f}s: {', '.join(swarm.endpoints)}", flush=True)
        rows = measure(swarm, cfg, args.seed)
    failed = rows[0].pop("dmoe_failed_calls_total")
    modes = [m for m in ("dmoe", "pipeline", "dmoe_1") if f"{m}_samples_per_s" in rows[0]]
    labels = {"dmoe": f"DMoE, {cfg['trainers']} trainers", "pipeline": "pipeline, 1 batch in flight",
              "dmoe_1": "DMoE, 1 trainer"}
    headers = ["latency ms"] + [h for m in modes for h in (f"{labels[m]} samples/s", "vs 0 ms", "cores")]
    common.print_table(headers, [[r["latency_ms"]] + [v for m in modes for v in
                                                       (r[f"{m}_samples_per_s"], r[f"{m}_relative"],
                                                        round(r[f"{m}_cpu_cores"], 2))]
                                 for r in rows])
    print(f"expert calls dropped during the DMoE runs: {failed}")
    series = {labels[m]: ([r["latency_ms"] for r in rows], [r[f"{m}_samples_per_s"] for r in rows]) for m in modes}
    png = common.plot(NAME, args, series, xlabel="one-way latency (ms)", ylabel="training samples/s",
                      title="Throughput vs latency: DMoE vs sequential pipeline")
    path = common.write_results(NAME, args, cfg, {"rows": rows, "dmoe_failed_calls": failed,
                                                  "daemons_started_s": swarm.started_s,
                                                  "load_avg_1m": {"start": load0, "end": os.getloadavg()[0]}})
    print(f"wrote {path} and {png}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
