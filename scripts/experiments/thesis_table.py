#!/usr/bin/env python
"""The Elastic Gossip thesis's table: test accuracy of W workers after the same number of
steps, by averaging method, on scikit-learn's digits.

    python scripts/experiments/thesis_table.py --preset smoke|default|full [--out DIR] [--json PATH]

Setting (the thesis's, scaled to digits): W = 4 and 8 workers, each a small MLP
(64-64-10, tanh) started from the same initial weights, trained with SGD + momentum on its
own shard (1/W of the training set, shuffled by the seed) with mini-batches drawn from its
shard; every method runs the same number of local steps. Workers are threads in one
process talking through ``LocalGroup`` (``torch.set_num_threads(1)``), and average with the
product's own ``CollaborativeOptimizer`` / ``Averager``. A barrier after every step keeps
them at the same speed, as the thesis's identical machines were: without it, on a loaded
machine the scheduler lets one thread run far ahead, and the gossip methods then pull
towards barely trained peers (a scheduling artefact, not the method):

- ``gradAllReduce``: gradients averaged over all W every step (synchronous data parallel);
- ``noComm``: no communication at all;
- ``elasticGossip`` twice, with alpha = 0.5: every ``period = 4`` steps (``p4``) and with
  probability ``prob = 0.25`` after each step (``q0.25``). Both cost the same expected
  communication (one exchange per 4 steps per worker), so the pair isolates the schedule:
  deterministic rounds against the thesis's random ones. 4 is also where the thesis's
  gossip methods stayed close to all-reduce while cutting communication 4-fold;
- ``gossipingSgd`` (push), every 4 steps: the same communication budget as the elastic
  settings, so the comparison is between the two update rules.

A ``local`` row (one worker, all the data, the same steps and batch) is the reference.
Accuracy after the run = the mean over workers of each worker's own model's test accuracy
(the thesis's measure: there is no master copy); mean and population std over seeds. The
verdict is computed from the numbers: it *agrees* with the thesis when, at every W, the
communicating methods are within ``close_tol`` of each other and noComm is below all of
them; otherwise it *differs*, and says where.
"""

from __future__ import annotations

import itertools
import statistics
import sys
import threading
import time
from typing import Any

import common

NAME = "thesis_table"
PRESETS: dict[str, dict[str, Any]] = {
    "smoke": dict(workers=[4, 8], seeds=1, steps=40, batch=16, lr=0.05, momentum=0.9,
                  hidden=64, local=False, close_tol=0.03),
    "default": dict(workers=[4, 8], seeds=3, steps=600, batch=16, lr=0.05, momentum=0.9,
                    hidden=64, local=True, close_tol=0.03),
    "full": dict(workers=[4, 8], seeds=3, steps=1500, batch=16, lr=0.05, momentum=0.9,
                 hidden=64, local=True, close_tol=0.03),
}
# label -> AveragingConfig keyword arguments
METHODS: dict[str, dict[str, Any]] = {
    "gradAllReduce": dict(method="gradAllReduce"),
    "noComm": dict(method="noComm"),
    "elasticGossip p4": dict(method="elasticGossip", period=4, alpha=0.5),
    "elasticGossip q0.25": dict(method="elasticGossip", prob=0.25, alpha=0.5),
    "gossipingSgd p4": dict(method="gossipingSgd", period=4, gossip="push"),
}
TIMEOUT_S = 30.0  # one averaging call's bound; in one process none should come near it
BARRIER_S = 300.0  # a worker that has not reached the step's end by then has failed


def make_model(hidden: int, seed: int) -> Any:
    import torch

    torch.manual_seed(seed)
    return torch.nn.Sequential(torch.nn.Linear(64, hidden), torch.nn.Tanh(),
                               torch.nn.Linear(hidden, 10))


def accuracy(model: Any, x: Any, y: Any) -> float:
    import torch

    with torch.no_grad():
        return float((model(x).argmax(dim=1) == y).float().mean())


def run_one(label: str, workers: int, seed: int, cfg: dict[str, Any],
            data: tuple[Any, Any, Any, Any]) -> dict[str, Any]:
    """Train ``workers`` workers by one method; their accuracies, divergence and counters."""
    import torch

    from volunteer.client.averaging.local_group import LocalGroup, LocalHub
    from volunteer.client.averaging.methods import AveragingConfig, divergence
    from volunteer.client.averaging.optimizer import CollaborativeOptimizer

    x_train, y_train, x_test, y_test = data
    config = AveragingConfig(**METHODS.get(label, {"method": "local"}), timeout=TIMEOUT_S)
    order = torch.randperm(len(x_train), generator=torch.Generator().manual_seed(seed))
    shards = [order[w::workers] for w in range(workers)]
    models = [make_model(cfg["hidden"], seed) for _ in range(workers)]  # one initial model
    hub = LocalHub()
    groups = [LocalGroup(hub, f"w{w}") if config.uses_group else None for w in range(workers)]
    opts = [CollaborativeOptimizer(
        torch.optim.SGD(m.parameters(), lr=cfg["lr"], momentum=cfg["momentum"]), g, config,
        seed=seed * 1000 + w) for w, (m, g) in enumerate(zip(models, groups, strict=True))]
    errors: list[BaseException] = []
    barrier = threading.Barrier(workers)

    def work(w: int) -> None:
        try:
            gen = torch.Generator().manual_seed(seed * 1000 + w)
            shard = shards[w]
            for _ in range(cfg["steps"]):
                idx = shard[torch.randint(len(shard), (cfg["batch"],), generator=gen)]
                opts[w].zero_grad()
                loss = torch.nn.functional.cross_entropy(models[w](x_train[idx]), y_train[idx])
                loss.backward()
                opts[w].step()
                barrier.wait(timeout=BARRIER_S)  # equal speed, as the thesis's equal machines
            if opts[w].averager is not None:  # peers' pulls after our last step (all done:
                opts[w].averager.apply_pending()  # every gossip ends before the barrier)
        except BaseException as exc:  # reported after the join, never swallowed
            errors.append(exc)
            barrier.abort()

    start = time.monotonic()
    threads = [threading.Thread(target=work, args=(w,), name=f"worker-{w}") for w in range(workers)]
    for th in threads:
        th.start()
    for th in threads:
        th.join()
    wall = time.monotonic() - start
    for opt in opts:
        opt.close()
    for g in groups:
        if g is not None:
            g.close()
    if errors:
        raise errors[0]
    accs = [accuracy(m, x_test, y_test) for m in models]
    params = [list(m.parameters()) for m in models]
    divs = [divergence(a, b) for a, b in itertools.combinations(params, 2)]
    failed: dict[str, int] = {}
    for opt in opts:
        for code, n in opt.stats().get("exchanges_failed", {}).items():
            failed[code] = failed.get(code, 0) + n
    return {"accs": accs, "divergence": statistics.fmean(divs) if divs else 0.0,
            "wall_s": wall, "failed": failed,
            "exchanges": sum(o.stats().get("exchanges_ok", 0) for o in opts)}


def verdict(rows: list[dict[str, Any]], close_tol: float) -> dict[str, Any]:
    """Whether our table agrees with the thesis, from the numbers."""
    reasons: list[str] = []
    per_w: dict[int, dict[str, Any]] = {}
    for w in sorted({r["workers"] for r in rows if r["method"] != "local"}):
        at = {r["label"]: r["acc_mean"] for r in rows if r["workers"] == w}
        talking = {k: v for k, v in at.items() if k != "noComm"}
        spread = max(talking.values()) - min(talking.values())
        gap = min(talking.values()) - at["noComm"]
        per_w[w] = {"spread": spread, "nocomm_gap": gap}
        if spread > close_tol:
            worst = min(talking, key=talking.__getitem__)
            reasons.append(f"W={w}: communicating methods spread {spread:.3f} > {close_tol} "
                           f"(lowest: {worst})")
        if gap <= 0:
            reasons.append(f"W={w}: noComm ({at['noComm']:.3f}) is not behind every "
                           f"communicating method (lowest {min(talking.values()):.3f})")
    return {"verdict": "differs" if reasons else "agrees", "reasons": reasons,
            "per_workers": per_w, "close_tol": close_tol}


def main(argv: list[str] | None = None) -> int:
    args, cfg = common.parse_args(NAME, PRESETS, __doc__, argv)
    import torch

    torch.set_num_threads(1)
    runs: list[tuple[str, int]] = [(m, w) for w in cfg["workers"] for m in METHODS]
    if cfg["local"]:
        runs.insert(0, ("local", 1))
    results: dict[tuple[str, int], list[dict[str, Any]]] = {r: [] for r in runs}
    start = time.monotonic()
    for s in range(cfg["seeds"]):
        seed = args.seed + s
        data = common.digits(seed=seed)
        for label, w in runs:
            results[(label, w)].append(run_one(label, w, seed, cfg, data))
            print(f"  seed {seed} {label:>20} W={w}: acc {statistics.fmean(results[(label, w)][-1]['accs']):.4f}",
                  file=sys.stderr, flush=True)
    rows = []
    for (label, w), outs in results.items():
        accs = [statistics.fmean(o["accs"]) for o in outs]
        failed: dict[str, int] = {}
        for o in outs:
            for code, n in o["failed"].items():
                failed[code] = failed.get(code, 0) + n
        rows.append({
            "method": METHODS.get(label, {"method": "local"})["method"], "label": label,
            "settings": METHODS.get(label, {}), "workers": w,
            "acc_mean": statistics.fmean(accs), "acc_std": statistics.pstdev(accs),
            "seeds": len(outs), "acc_per_seed": accs,
            "worker_acc_min": min(min(o["accs"]) for o in outs),
            "divergence": statistics.fmean(o["divergence"] for o in outs),
            "exchanges": sum(o["exchanges"] for o in outs), "exchanges_failed": failed,
            "steps": cfg["steps"], "batch": cfg["batch"],
            "wall_s": statistics.fmean(o["wall_s"] for o in outs)})
    judged = verdict(rows, cfg["close_tol"])
    figures = {"rows": rows, **judged, "total_s": time.monotonic() - start}
    path = common.write_results(NAME, args, cfg, figures)
    labels = [lab for lab in METHODS]
    series = {lab: (cfg["workers"], [next(r["acc_mean"] for r in rows
                                          if r["label"] == lab and r["workers"] == w)
                                     for w in cfg["workers"]]) for lab in labels}
    common.plot(NAME, args, series, xlabel="workers (W)", ylabel="test accuracy (mean of workers)",
                title=f"digits, {cfg['steps']} steps, {cfg['seeds']} seed(s)")
    common.print_table(
        ["method", "W", "acc mean", "acc std", "seeds", "worst worker", "divergence", "exchanges"],
        [[r["label"], r["workers"], r["acc_mean"], r["acc_std"], r["seeds"], r["worker_acc_min"],
          r["divergence"], r["exchanges"]] for r in rows])
    print(f"verdict: {judged['verdict']}" + "".join(f"\n  - {x}" for x in judged["reasons"]))
    print(f"wrote {path}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
