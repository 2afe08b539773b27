"""The thesis table's verdict is computed from the numbers (never written in): agree when the
communicating methods are close together and noComm is behind all of them, at every W."""

from __future__ import annotations

import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[2] / "scripts" / "experiments"))

import thesis_table


def _rows(w: int, accs: dict[str, float]) -> list[dict]:
    return [{"method": label.split()[0], "label": label, "workers": w, "acc_mean": acc}
            for label, acc in accs.items()]


def test_close_methods_and_nocomm_behind_agree() -> None:
    rows = _rows(4, {"gradAllReduce": 0.97, "elasticGossip p4": 0.965, "gossipingSgd p4": 0.962,
                     "noComm": 0.94})
    rows.append({"method": "local", "label": "local", "workers": 1, "acc_mean": 0.99})
    out = thesis_table.verdict(rows, close_tol=0.03)
    assert out["verdict"] == "agrees" and out["reasons"] == []
    assert abs(out["per_workers"][4]["spread"] - 0.008) < 1e-9
    assert abs(out["per_workers"][4]["nocomm_gap"] - 0.022) < 1e-9


def test_a_spread_or_a_nocomm_that_keeps_up_differs() -> None:
    spread = _rows(8, {"gradAllReduce": 0.97, "elasticGossip p4": 0.90, "noComm": 0.80})
    assert thesis_table.verdict(spread, close_tol=0.03)["verdict"] == "differs"
    level = _rows(8, {"gradAllReduce": 0.97, "elasticGossip p4": 0.965, "noComm": 0.968})
    out = thesis_table.verdict(level, close_tol=0.03)
    assert out["verdict"] == "differs" and "noComm" in out["reasons"][0]
