#!/usr/bin/env python
"""The bundled example trainer: a small DMoE classifier on scikit-learn's digits.

    python scripts/demo_trainer.py --bootstrap /ip4/127.0.0.1/tcp/PORT/p2p/ID [--bootstrap ...] \\
        [--manifest demo] [--steps 200] [--batch-size 64] [--k-best 2] [--seed 0]
    python scripts/demo_trainer.py --endpoint tcp://127.0.0.1:PORT [--endpoint ...] ...

Model: Linear(64 -> h) -> ReLU -> RemoteMixtureOfExperts(h) -> Linear(h -> 10), where the
experts are hosted by volunteer daemons (``volunteer join demo``). The expert grid
(prefix, dims) and width h come from the experiment manifest.

With ``--bootstrap`` (the product path) the trainer joins the experiment's swarm as a
client-mode peer (``volunteer.client.node.ClientNode``: queries the DHT, stores
nothing) and finds experts by beam search through the DHT (``DhtDirectory``): volunteers
that join or leave during training are picked up or dropped by themselves. With
``--endpoint`` (no DHT) each endpoint is asked which experts it hosts (the wire ``info``
op) and that static set is used. Prints one line per ``--log-every`` steps:
step, training loss, accuracy on a held-out split, and how many experts answered; then a
``final:`` summary line. With ``--average`` the trainer ends by agreeing on one copy with the
trainers still in the run (``finish:`` line, bounded by ``--finish-timeout``). Exit status: 0 on success, 1 with a one-line error when no expert
is reachable or too many steps in a row fail (all experts gone).
The digits data ships inside scikit-learn: nothing is downloaded.
"""

from __future__ import annotations

import argparse
import os
import sys
import time

import trainer_averaging

from volunteer.wire import COMPRESSIONS


def _parse(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--endpoint", action="append", default=[], metavar="tcp://HOST:PORT",
                        help="a volunteer's expert endpoint (repeatable)")
    parser.add_argument("--manifest", default="demo",
                        help="experiment manifest (name or path) giving grid and hidden_dim")
    parser.add_argument("--steps", type=int, default=200)
    parser.add_argument("--batch-size", type=int, default=64)
    parser.add_argument("--k-best", type=int, default=2)
    parser.add_argument("--k-min", type=int, default=1)
    parser.add_argument("--lr", type=float, default=3e-3, help="learning rate of local layers")
    parser.add_argument("--timeout", type=float, default=10.0,
                        help="forward/backward timeout per expert call, seconds")
    parser.add_argument("--compression", default=None, choices=[c or "none" for c in COMPRESSIONS],
                        help="wire compression of activations and gradients (default: the "
                        "manifest's wire.compression)")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--log-every", type=int, default=10)
    parser.add_argument("--max-failed-steps", type=int, default=5,
                        help="give up after this many consecutive steps without experts")
    parser.add_argument("--bootstrap", action="append", default=[], metavar="MULTIADDR",
                        help="a swarm peer to join through, /ip4/HOST/tcp/PORT/p2p/ID (repeatable; "
                             "`volunteer status` lists a volunteer's addresses)")
    parser.add_argument("--listen-host", default=None,
                        help="libp2p listen address with --bootstrap (default: 127.0.0.1 when every "
                             "bootstrap peer is on loopback, else 0.0.0.0)")
    parser.add_argument("--discover-timeout", type=float, default=30.0,
                        help="seconds to wait for the first experts to appear in the DHT")
    trainer_averaging.add_arguments(parser)
    args = parser.parse_args(argv)
    trainer_averaging.check(parser, args)
    if not args.endpoint and not args.bootstrap:
        parser.error("give --bootstrap MULTIADDR (join the swarm) or --endpoint tcp://HOST:PORT "
                     "(see `volunteer status`)")
    if args.endpoint and args.bootstrap:
        parser.error("give either --bootstrap or --endpoint, not both")
    for name in ("steps", "batch_size", "k_best", "log_every", "max_failed_steps"):
        if getattr(args, name) < 1:
            parser.error(f"--{name.replace('_', '-')} must be >= 1")
    return args


class DemoError(Exception):
    """A problem reported as one line with exit status 1."""


def _load_data(seed: int):
    import torch
    from sklearn.datasets import load_digits

    digits = load_digits()
    x = torch.tensor(digits.data, dtype=torch.float32) / 16.0
    y = torch.tensor(digits.target, dtype=torch.int64)
    order = torch.randperm(len(x), generator=torch.Generator().manual_seed(seed))
    test, train = order[:300], order[300:]
    return x[train], y[train], x[test], y[test]


class _Swarm:
    """The DHT path: a client-mode peer and its directory, closed together."""

    def __init__(self, args: argparse.Namespace, experiment: str) -> None:
        from volunteer.client.node import ClientNode

        host = args.listen_host or ("127.0.0.1" if all(a.startswith("/ip4/127.") for a in args.bootstrap)
                                    else "0.0.0.0")
        try:
            self.node = ClientNode(experiment, args.bootstrap, listen_addrs=(f"/ip4/{host}/tcp/0",)).start()
        except Exception as exc:
            raise DemoError(f"cannot join the swarm through {', '.join(args.bootstrap)}: "
                            f"{type(exc).__name__}: {exc}") from exc
        self.directory = self.node.directory()

    def count_experts(self, prefix: str, dims: list[int], timeout: float) -> int:
        """Poll the DHT (beam-search style, one grid level at a time) until experts appear."""
        deadline = time.monotonic() + timeout
        while True:
            level = [prefix + "."]
            for _ in dims:
                found = self.directory.children(level)
                level = [f"{p}{c}." for p in level for c in found.get(p, [])]
            if level or time.monotonic() >= deadline:
                return len(level)
            time.sleep(0.5)

    def close(self) -> None:
        self.directory.close()
        self.node.stop()


def _dht_directory(args: argparse.Namespace, experiment: str, prefix: str, dims: list[int]):
    swarm = _Swarm(args, experiment)
    try:
        n = swarm.count_experts(prefix, dims, args.discover_timeout)
    except BaseException:
        swarm.close()
        raise
    if n == 0:
        swarm.close()
        raise DemoError(
            f"no serving expert of grid {prefix!r} announced in the DHT of experiment {experiment!r} within "
            f"{args.discover_timeout:g}s (bootstrap peers: {', '.join(args.bootstrap)}); is `volunteer join "
            f"{experiment}` running? `volunteer status` shows its addresses"
        )
    return swarm.directory, swarm, n


def _build(args: argparse.Namespace):
    import torch
    from torch import nn

    from volunteer.client.moe import RemoteMixtureOfExperts
    from volunteer.manifest import ManifestError, load_manifest

    try:
        manifest = load_manifest(args.manifest)
    except ManifestError as exc:
        raise DemoError(str(exc)) from exc
    hidden, prefix, dims = manifest.expert.hidden_dim, manifest.grid.prefix, manifest.grid.dims
    if args.bootstrap:
        directory, closer, n_experts = _dht_directory(args, manifest.experiment.name, prefix, list(dims))
    else:
        directory, n_experts = _static_directory(args, prefix, hidden)
        closer = directory
    torch.manual_seed(args.seed if args.init_seed is None else args.init_seed)
    compression = manifest.wire.compression if args.compression is None else (
        None if args.compression == "none" else args.compression)
    moe = RemoteMixtureOfExperts(
        hidden, dims, prefix, directory, k_best=args.k_best, k_min=min(args.k_min, args.k_best),
        forward_timeout=args.timeout, backward_timeout=args.timeout, timeout_after_k_min=1.0,
        compression=compression,
    )
    model = nn.Sequential(nn.Linear(64, hidden), nn.ReLU(), moe, nn.Linear(hidden, 10))
    return model, moe, closer, n_experts


def _static_directory(args: argparse.Namespace, prefix: str, hidden: int):
    from volunteer.client.directory import StaticDirectory

    directory = StaticDirectory.from_endpoints(args.endpoint, timeout=args.timeout)
    ours = [u for u in directory.uids if u.startswith(prefix + ".")]
    if not ours:
        reasons = "; ".join(f"{e}: {r}" for e, r in directory.failed_endpoints.items())
        directory.close()
        raise DemoError(
            f"no expert of grid {prefix!r} reachable at {', '.join(args.endpoint)}"
            + (f" ({reasons})" if reasons else "")
            + "; is `volunteer join demo` running? `volunteer status` shows its endpoint"
        )
    for uid in ours:
        shapes = directory.expert_info[uid].get("input_shapes")
        if shapes != [[hidden]]:
            directory.close()
            raise DemoError(
                f"expert {uid} takes inputs {shapes}, the manifest says [[{hidden}]]: "
                "the daemon serves a different experiment version"
            )
    return directory, len(ours)


def run(args: argparse.Namespace) -> None:
    import torch
    import torch.nn.functional as F

    from volunteer.client.moe import NotEnoughExpertsError

    x_train, y_train, x_test, y_test = _load_data(args.init_seed if args.init_seed is not None else args.seed)
    x_train, y_train = trainer_averaging.shard(x_train, y_train, args)
    model, moe, closer, n_experts = _build(args)
    where = (f"in the DHT (joined through {len(args.bootstrap)} peer(s))" if args.bootstrap
             else f"at {len(args.endpoint)} endpoint(s)")
    print(f"found {n_experts} experts {where}; training {args.steps} steps", flush=True)
    try:
        opt, group = trainer_averaging.wrap(torch.optim.Adam(model.parameters(), lr=args.lr),
                                            getattr(closer, "node", None), args)
    except RuntimeError as exc:
        moe.close()
        closer.close()
        raise DemoError(str(exc)) from exc
    if group is not None:
        print(f"averaging with {len(group.members())} other trainer(s) of run {args.run_id!r} "
              f"({args.average})", flush=True)
    gen = torch.Generator().manual_seed(args.seed)
    losses: list[float] = []
    last_loss = float("nan")
    accuracy = float("nan")
    failed_in_row = 0
    finished = None
    started = time.monotonic()
    try:
        for step in range(1, args.steps + 1):
            idx = torch.randint(0, len(x_train), (args.batch_size,), generator=gen)
            try:
                loss = F.cross_entropy(model(x_train[idx]), y_train[idx])
                opt.zero_grad()
                loss.backward()
            except NotEnoughExpertsError as exc:
                failed_in_row += 1
                print(f"step {step}: skipped ({exc})", flush=True)
                if failed_in_row >= args.max_failed_steps:
                    raise DemoError(f"{failed_in_row} steps in a row without enough experts: {exc}") from exc
                continue
            failed_in_row = 0
            opt.step()
            last_loss = loss.item()
            losses.append(last_loss)
            report = moe.last_report
            if step % args.log_every == 0 or step == args.steps:
                answered = sorted(set(report.answered)) if report else []
                with torch.no_grad():
                    try:
                        accuracy = float((model(x_test).argmax(1) == y_test).float().mean())
                    except NotEnoughExpertsError:
                        accuracy = float("nan")
                dropped = f" dropped={','.join(sorted(report.failed))}" if report and report.failed else ""
                print(f"step {step} loss {last_loss:.4f} test_acc {accuracy:.3f} "
                      f"experts_answered {len(answered)}/{n_experts}{dropped}", flush=True)
        finished = opt.finish(args.finish_timeout) if group is not None and args.finish_timeout > 0 else None
        if finished is not None:
            with torch.no_grad():
                try:  # the agreed copy is the model this run leaves behind
                    accuracy = float((model(x_test).argmax(1) == y_test).float().mean())
                except NotEnoughExpertsError:
                    accuracy = float("nan")
            print(f"finish: {finished.ended} after {finished.sweeps} sweep(s) in {finished.duration_s:.1f}s "
                  f"(last divergence {finished.last_divergence}); test_acc {accuracy:.3f}", flush=True)
    finally:
        opt.close()
        if group is not None:
            group.close()
        moe.close()
        closer.close()
    if not losses:
        raise DemoError("no training step succeeded")
    window = max(1, min(10, len(losses) // 2))
    first_loss = sum(losses[:window]) / window
    last_loss = sum(losses[-window:]) / window
    seconds = time.monotonic() - started
    print(f"final: steps={len(losses)} first_loss={first_loss:.4f} last_loss={last_loss:.4f} "
          f"test_acc={accuracy:.3f} seconds={seconds:.1f}", flush=True)
    if args.dump is not None:
        trainer_averaging.dump(model, args.dump, {
            "steps": len(losses), "samples": len(losses) * args.batch_size, "test_acc": accuracy,
            "last_loss": last_loss, "seconds": seconds, "averaging": opt.stats(),
            "finish": finished.to_dict() if finished is not None else None})


def main(argv: list[str] | None = None) -> int:
    # Before torch is imported: busy-waiting OpenMP threads starve the network threads on
    # small machines (measured on 2 cores: 381 ms per MoE step instead of 104 ms).
    os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")
    args = _parse(argv)
    try:
        run(args)
    except DemoError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        print("interrupted", file=sys.stderr)
        return 130
    return 0


if __name__ == "__main__":
    sys.exit(main())
