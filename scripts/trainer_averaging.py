"""The demo trainer's averaging options: many trainers, one model (``demo_trainer.py``).

Several ``demo_trainer.py --bootstrap ... --average METHOD --run-id RUN`` processes train
one model together: each joins run ``RUN``'s averaging group through the swarm
(``ClientNode.averaging_group``) and wraps its optimizer in ``CollaborativeOptimizer``, so
the dense parts (input layer, gating, head) of every trainer's copy agree while the experts
are shared on the volunteers. ``--data-shard I/W`` gives each trainer its own slice of the
training set (the thesis's setting); ``--wait-members N`` holds the first step until N
other trainers are listed (gradient all-reduce matches rounds by step number, so members
should start together); ``--dump PATH`` writes the final dense parameters (torch.save of
the state dict, the trainer's own file) and a JSON summary next to it for the experiment
that compares trainers (``scripts/experiments/many_trainers.py``).
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path
from typing import Any

METHOD_CHOICES = ("local", "noComm", "gradAllReduce", "elasticGossip", "gossipingSgd")


def add_arguments(parser: argparse.ArgumentParser) -> None:
    """The averaging flags (all optional: without ``--average`` the trainer trains alone)."""
    group = parser.add_argument_group("averaging (many trainers, one model; needs --bootstrap)")
    group.add_argument("--average", choices=METHOD_CHOICES, default=None,
                       help="how this trainer's dense parameters agree with the others' "
                            "(the Elastic Gossip thesis's methods)")
    group.add_argument("--run-id", default="demo",
                       help="the averaging group: trainers with the same run id average together")
    group.add_argument("--average-period", type=int, default=None,
                       help="gossip methods: average every N steps (default: every step)")
    group.add_argument("--average-prob", type=float, default=None,
                       help="gossip methods: average after a step with this probability")
    group.add_argument("--average-alpha", type=float, default=0.5, help="elastic moving rate in (0, 1]")
    group.add_argument("--average-timeout", type=float, default=5.0,
                       help="the longest one averaging call may hold a step, seconds")
    group.add_argument("--wait-members", type=int, default=0,
                       help="wait until this many other trainers are in the group before training")
    group.add_argument("--members-timeout", type=float, default=120.0,
                       help="seconds --wait-members may wait")
    group.add_argument("--finish-timeout", type=float, default=60.0,
                       help="at the end, agree on one copy with the trainers still in the run for "
                            "at most this many seconds (0: leave without agreeing)")
    group.add_argument("--data-shard", default=None, metavar="I/W",
                       help="train on slice I of W of the training set (0 <= I < W)")
    group.add_argument("--init-seed", type=int, default=None,
                       help="seed of the model's initial weights (default: --seed); trainers of one "
                            "run share it so that their copies start equal")
    group.add_argument("--dump", type=Path, default=None,
                       help="write the final dense parameters here (torch.save) and a JSON summary "
                            "next to it (PATH with .json)")


def check(parser: argparse.ArgumentParser, args: argparse.Namespace) -> None:
    """One-line errors for averaging flags that cannot work."""
    if args.average not in (None, "local", "noComm") and not args.bootstrap:
        parser.error("--average needs --bootstrap: trainers find each other through the swarm")
    if args.data_shard is not None:
        try:
            i, w = (int(v) for v in args.data_shard.split("/"))
        except ValueError:
            parser.error(f"--data-shard {args.data_shard!r}: give I/W, e.g. 0/4")
        if not 0 <= i < w:
            parser.error(f"--data-shard {args.data_shard!r}: need 0 <= I < W")
        args.data_shard = (i, w)
    if args.wait_members < 0:
        parser.error("--wait-members must be >= 0")
    if not 0 <= args.finish_timeout <= 3600:
        parser.error("--finish-timeout must be between 0 and 3600 seconds")
    try:
        config(args)
    except ValueError as exc:
        parser.error(f"--average: {exc}")


def config(args: argparse.Namespace) -> Any:
    from volunteer.client.averaging.methods import AveragingConfig

    return AveragingConfig(args.average or "local", period=args.average_period, prob=args.average_prob,
                           alpha=args.average_alpha, timeout=args.average_timeout)


def shard(x: Any, y: Any, args: argparse.Namespace) -> tuple[Any, Any]:
    """This trainer's slice of the training set (all of it without --data-shard)."""
    if args.data_shard is None:
        return x, y
    i, w = args.data_shard
    return x[i::w], y[i::w]


def wrap(optimizer: Any, node: Any, args: argparse.Namespace) -> tuple[Any, Any]:
    """``(CollaborativeOptimizer, group or None)``; joins the run's group and waits for
    ``--wait-members`` when the method averages."""
    from volunteer.client.averaging.optimizer import CollaborativeOptimizer

    cfg = config(args)
    group = None
    if cfg.uses_group:
        group = node.averaging_group(args.run_id)
        deadline = time.monotonic() + args.members_timeout
        while len(group.members()) < args.wait_members:
            if time.monotonic() > deadline:
                group.close()
                raise RuntimeError(f"only {len(group.members())} of {args.wait_members} other trainers "
                                   f"joined run {args.run_id!r} within {args.members_timeout:g}s")
            time.sleep(0.2)
    return CollaborativeOptimizer(optimizer, group, cfg, seed=args.seed), group


def dump(model: Any, path: Path, summary: dict[str, Any]) -> None:
    """The final dense parameters (``path``) and a JSON summary (``path`` + ``.json``)."""
    import torch

    path.parent.mkdir(parents=True, exist_ok=True)
    torch.save({k: v.detach().cpu() for k, v in model.state_dict().items()}, path)
    Path(str(path) + ".json").write_text(json.dumps(summary, indent=2, default=float) + "\n")
