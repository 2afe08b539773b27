"""What every experiment script shares: presets, the results folder, the JSON of figures,
plots, the printed table and the dataset.

Each script under ``scripts/experiments/`` is run as

    python scripts/experiments/<name>.py --preset smoke|default|full [--out DIR] [--json PATH]

and writes ``<out>/<name>.json`` (the figures, with the preset and the machine) and
``<out>/<name>.png`` (its plot); ``--json PATH`` also writes the JSON there. ``--out``
defaults to ``results/`` at the repository root (ignored by git). The printed table is
what a reader of the README sees.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import sys
import time
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[2]
RESULTS = ROOT / "results"


def parse_args(name: str, presets: Mapping[str, Mapping[str, Any]], doc: str | None = None,
               argv: Sequence[str] | None = None) -> tuple[argparse.Namespace, dict[str, Any]]:
    """``--preset`` (default ``default``), ``--out``, ``--json``, ``--seed``: the parsed
    arguments and a copy of the chosen preset's settings."""
    parser = argparse.ArgumentParser(prog=f"{name}.py", description=doc,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--preset", choices=sorted(presets), default="default",
                        help="size of the run: smoke (CI, seconds), default, full (the README's figures)")
    parser.add_argument("--out", type=Path, default=RESULTS, help="folder for the PNG and the JSON")
    parser.add_argument("--json", type=Path, default=None, help="also write the figures' JSON here")
    parser.add_argument("--seed", type=int, default=0, help="base random seed")
    args = parser.parse_args(argv)
    return args, dict(presets[args.preset])


def machine() -> dict[str, Any]:
    """Where the figures were taken (they mean little without it)."""
    import torch

    return {"python": platform.python_version(), "torch": torch.__version__,
            "cpus": os.cpu_count(), "platform": platform.platform(),
            "cuda": torch.cuda.get_device_name(0) if torch.cuda.is_available() else None}


def write_results(name: str, args: argparse.Namespace, settings: Mapping[str, Any],
                  figures: Mapping[str, Any]) -> Path:
    """Write ``<out>/<name>.json`` (+ ``--json``) and return its path."""
    args.out.mkdir(parents=True, exist_ok=True)
    doc = {"experiment": name, "preset": args.preset, "settings": dict(settings),
           "machine": machine(), "written": time.strftime("%Y-%m-%dT%H:%M:%S%z"), **figures}
    text = json.dumps(doc, indent=2, sort_keys=False, default=float) + "\n"
    path = args.out / f"{name}.json"
    path.write_text(text)
    if args.json is not None:
        args.json.parent.mkdir(parents=True, exist_ok=True)
        args.json.write_text(text)
    return path


def plot(name: str, args: argparse.Namespace, series: Mapping[str, tuple[Sequence[float], Sequence[float]]],
         *, xlabel: str, ylabel: str, title: str, logx: bool = False) -> Path:
    """One line per series (label -> (xs, ys)) in ``<out>/<name>.png``."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    args.out.mkdir(parents=True, exist_ok=True)
    fig, ax = plt.subplots(figsize=(6.4, 4.2), dpi=110)
    for label, (xs, ys) in series.items():
        ax.plot(list(xs), list(ys), marker="o", markersize=3, label=label)
    if logx:
        ax.set_xscale("symlog")
    ax.set_xlabel(xlabel)
    ax.set_ylabel(ylabel)
    ax.set_title(title)
    ax.grid(True, alpha=0.3)
    ax.legend(fontsize=8)
    fig.tight_layout()
    path = args.out / f"{name}.png"
    fig.savefig(path)
    plt.close(fig)
    return path


def print_table(headers: Sequence[str], rows: Sequence[Sequence[Any]]) -> None:
    """A plain fixed-width table on stdout (readable in CI logs and terminals alike)."""
    cells = [[_fmt(v) for v in row] for row in rows]
    widths = [max(len(h), *(len(r[i]) for r in cells)) if cells else len(h) for i, h in enumerate(headers)]
    print("  ".join(h.ljust(w) for h, w in zip(headers, widths, strict=True)))
    print("  ".join("-" * w for w in widths))
    for row in cells:
        print("  ".join(c.ljust(w) for c, w in zip(row, widths, strict=True)))
    sys.stdout.flush()


def _fmt(v: Any) -> str:
    if isinstance(v, float):
        return f"{v:.4g}"
    return str(v)


def digits(seed: int = 0, test_fraction: float = 0.25) -> tuple[Any, Any, Any, Any]:
    """scikit-learn's digits (1797 8x8 images, 10 classes), scaled to [0, 1], as float32/int64
    tensors ``(x_train, y_train, x_test, y_test)``, split by ``seed`` (stratified)."""
    import torch
    from sklearn.datasets import load_digits
    from sklearn.model_selection import train_test_split

    data = load_digits()
    x_train, x_test, y_train, y_test = train_test_split(
        data.data / 16.0, data.target, test_size=test_fraction, random_state=seed, stratify=data.target)
    as_x = lambda a: torch.tensor(a, dtype=torch.float32)  # noqa: E731
    as_y = lambda a: torch.tensor(a, dtype=torch.int64)  # noqa: E731
    return as_x(x_train), as_y(y_train), as_x(x_test), as_y(y_test)
