#!/usr/bin/env python
"""Learning@home's convergence experiment: a DMoE classifier trained through real volunteers
while experts fail, against the same training without failures.

    python scripts/experiments/convergence_failures.py --preset smoke|default|full [--out DIR] [--json PATH]

Real volunteers: ``daemons`` ``volunteer join`` processes (offline, ZeroMQ direct, default
settings) serve ``configs/convergence.yaml``'s ``ffn`` experts; each run (expert count x
failure rate) trains its own fresh set (uids ``convergence.ffn.<run>.<layer>.<expert>``), so
no run starts from experts another run trained. The experts learn on the volunteers
(their optimizer step on every backward), the trainer learns the rest.

Model (scikit-learn's digits, ``common.digits``): Linear(64, h) -> ReLU -> ``layers``
``RemoteMixtureOfExperts`` layers (``experts`` experts each, ``k_best`` per sample,
``k_min=1``) -> Linear(h, 10); Adam on the local parameters.

Failures follow the paper: every expert call of a layer fails with probability
``failure_rate``, drawn on the trainer from a seeded rng (``dmoe_lab.FailureInjector``); the
failed call never reaches the volunteer, the layer drops that expert for the call and
renormalises its softmax over the experts that answered (the same path a vanished or late
volunteer takes). A step in which some sample has no answering expert left raises
``NotEnoughExpertsError`` and is skipped (counted); updates count the steps taken. Test
accuracy is measured every ``eval_every`` updates with injection paused (the model, not the
network, is what is measured).
"""

from __future__ import annotations

import os
import sys
import time
from typing import Any

os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")  # before torch: see scripts/bench_moe.py

import common
import dmoe_lab

NAME = "convergence_failures"
PRESETS: dict[str, dict[str, Any]] = {
    "smoke": dict(daemons=2, expert_counts=[4], failure_rates=[0.0, 0.1], layers=1, hidden=32, k_best=2,
                  batch=32, updates=20, eval_every=10, lr=3e-3),
    "default": dict(daemons=2, expert_counts=[4, 16], failure_rates=[0.0, 0.1], layers=2, hidden=64, k_best=4,
                    batch=64, updates=150, eval_every=15, lr=3e-3),
    "full": dict(daemons=3, expert_counts=[4, 16, 64], failure_rates=[0.0, 0.1], layers=2, hidden=64, k_best=4,
                 batch=64, updates=400, eval_every=20, lr=3e-3),
}
PREFIX = "convergence.ffn"
TIMEOUT_S = 30.0


def build(run: int, experts: int, cfg: dict[str, Any], directory: Any, injector: dmoe_lab.FailureInjector,
          seed: int) -> tuple[Any, list[Any]]:
    """The classifier of run ``run`` and its DMoE layers."""
    import torch
    from torch import nn

    torch.manual_seed(seed)
    factory = injector.factory(dmoe_lab.remote_expert_factory(TIMEOUT_S))
    moes = dmoe_lab.dmoe_layers(cfg["hidden"], f"{PREFIX}.{run}", cfg["layers"], experts, directory,
                                k_best=min(cfg["k_best"], experts), k_min=1, timeout=TIMEOUT_S,
                                expert_factory=factory)
    model = nn.Sequential(nn.Linear(64, cfg["hidden"]), nn.ReLU(), *moes, nn.Linear(cfg["hidden"], 10))
    return model, moes


def accuracy(model: Any, injector: dmoe_lab.FailureInjector, x: Any, y: Any) -> float:
    import torch

    injector.active = False
    try:
        with torch.no_grad():
            return float((model(x).argmax(1) == y).float().mean())
    finally:
        injector.active = True


def train(run: int, experts: int, rate: float, cfg: dict[str, Any], directory: Any, data: tuple,
          seed: int) -> dict[str, Any]:
    """One run: ``updates`` steps through the swarm; test accuracy every ``eval_every``."""
    import torch
    import torch.nn.functional as F

    from volunteer.client.moe import NotEnoughExpertsError

    x_train, y_train, x_test, y_test = data
    injector = dmoe_lab.FailureInjector(rate, seed=seed * 1000 + run)
    model, moes = build(run, experts, cfg, directory, injector, seed)
    opt = torch.optim.Adam(model.parameters(), lr=cfg["lr"])
    gen = torch.Generator().manual_seed(seed)
    curve_x, curve_y = [0], [accuracy(model, injector, x_test, y_test)]
    updates = skipped = 0
    started = time.monotonic()
    try:
        while updates < cfg["updates"]:
            idx = torch.randint(0, len(x_train), (cfg["batch"],), generator=gen)
            try:
                loss = F.cross_entropy(model(x_train[idx]), y_train[idx])
                opt.zero_grad()
                loss.backward()
            except NotEnoughExpertsError:
                skipped += 1
                if skipped > cfg["updates"]:
                    raise
                continue
            opt.step()
            updates += 1
            if updates % cfg["eval_every"] == 0 or updates == cfg["updates"]:
                curve_x.append(updates)
                curve_y.append(accuracy(model, injector, x_test, y_test))
    finally:
        for moe in moes:
            moe.close()
    return {"experts": experts, "failure_rate": rate, "updates": curve_x, "accuracy": curve_y,
            "final_accuracy": curve_y[-1], "best_accuracy": max(curve_y), "skipped_steps": skipped,
            "expert_calls": injector.calls if rate else None, "dropped_calls": injector.dropped,
            "seconds": time.monotonic() - started}


def main(argv: list[str] | None = None) -> int:
    args, cfg = common.parse_args(NAME, PRESETS, __doc__, argv)
    import torch

    from volunteer.client.directory import StaticDirectory

    torch.set_num_threads(1)
    load0 = os.getloadavg()[0]
    plan = [(e, p) for e in cfg["expert_counts"] for p in cfg["failure_rates"]]
    dims = [len(plan), cfg["layers"], max(cfg["expert_counts"])]
    print(f"{NAME} ({args.preset}): {cfg['daemons']} volunteers, {len(plan)} runs of {cfg['updates']} updates "
          f"(experts {cfg['expert_counts']} x failure rates {cfg['failure_rates']}), {cfg['layers']} DMoE "
          f"layer(s), k_best {cfg['k_best']}, h={cfg['hidden']}, batch {cfg['batch']}", flush=True)
    data = common.digits(args.seed)
    runs = []
    with dmoe_lab.Swarm("convergence", dims, cfg["daemons"], cfg["hidden"]) as swarm:
        print(f"  volunteers serving after {swarm.started_s:.1f}s: {', '.join(swarm.endpoints)}", flush=True)
        with swarm.transports() as transports:
            directory = StaticDirectory(transports)
            for run, (experts, rate) in enumerate(plan):
                result = train(run, experts, rate, cfg, directory, data, args.seed)
                runs.append(result)
                print(f"  {experts} experts, failure rate {rate}: accuracy "
                      + " ".join(f"{a:.2f}" for a in result["accuracy"])
                      + f" ({result['dropped_calls']} calls dropped, {result['skipped_steps']} steps skipped, "
                        f"{result['seconds']:.0f}s)", flush=True)
    common.print_table(
        ["experts", "failure rate", "final test acc", "best", "calls dropped", "steps skipped", "seconds"],
        [[r["experts"], r["failure_rate"], r["final_accuracy"], r["best_accuracy"],
          f"{r['dropped_calls']}/{r['expert_calls']}" if r["expert_calls"] else "0", r["skipped_steps"],
          round(r["seconds"], 1)] for r in runs])
    series = {f"{r['experts']} experts, failure rate {r['failure_rate']:g}": (r["updates"], r["accuracy"])
              for r in runs}
    png = common.plot(NAME, args, series, xlabel="updates", ylabel="test accuracy",
                      title="Convergence under expert failures (digits)")
    final = [{"experts": r["experts"], "failure_rate": r["failure_rate"], "final_accuracy": r["final_accuracy"]}
             for r in runs]
    path = common.write_results(NAME, args, cfg, {"runs": runs, "final": final,
                                                  "daemons_started_s": swarm.started_s,
                                                  "load_avg_1m": {"start": load0, "end": os.getloadavg()[0]}})
    print(f"wrote {path} and {png}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
