"""The experiment line names the manifest without nested parentheses (plain and dashboard)."""

from __future__ import annotations

import io

from rich.console import Console

from volunteer.status.dashboard import render_dashboard
from volunteer.status.fmt import source_text
from volunteer.status.plain import render_plain

SHIPPED = "demo (shipped: volunteer/configs/demo.yaml)"


def test_source_text() -> None:
    assert source_text(SHIPPED) == "shipped manifest demo (volunteer/configs/demo.yaml)"
    assert source_text("/tmp/my exp.yaml") == "manifest /tmp/my exp.yaml"
    assert source_text(None) == "n/a" and source_text(7) == "n/a"


def test_experiment_line_has_no_nested_parentheses() -> None:
    snap = {"experiment": {"name": "demo", "version": "1", "source": SHIPPED}}
    line = next(x for x in render_plain(snap).splitlines() if x.startswith("experiment"))
    assert line == "experiment  demo v1 from shipped manifest demo (volunteer/configs/demo.yaml)"
    out = io.StringIO()
    Console(file=out, width=120, no_color=True).print(render_dashboard(snap))
    assert "demo v1 from shipped manifest demo (volunteer/configs/demo.yaml)" in out.getvalue()
    assert "(shipped:" not in out.getvalue()
