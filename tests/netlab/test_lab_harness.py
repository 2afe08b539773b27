"""The NAT lab harness's own checks that need no root: skip reasons and input bounds."""

from __future__ import annotations

from pathlib import Path

import pytest

from tests.netlab import lab as lab_mod


def test_lab_says_why_it_cannot_run_without_root(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(lab_mod.os, "geteuid", lambda: 1000)
    assert "root" in lab_mod.unavailable_reason()


def test_lab_says_which_tool_is_missing(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(lab_mod.os, "geteuid", lambda: 0)
    monkeypatch.setattr(lab_mod.shutil, "which", lambda name: None if name == "ip" else "/x")
    assert "iproute2" in lab_mod.unavailable_reason()
    monkeypatch.setattr(lab_mod.shutil, "which", lambda name: None if "iptables" in name else "/x")
    assert "iptables" in lab_mod.unavailable_reason()


def test_lab_rejects_absurd_sizes() -> None:
    with pytest.raises(ValueError):
        lab_mod.NatLab(n_lans=0)
    with pytest.raises(ValueError):
        lab_mod.NatLab(n_lans=2, n_public=10)


@pytest.mark.netlab
@pytest.mark.timeout(30)
def test_namespaces_of_a_dead_lab_are_reaped() -> None:
    reason = lab_mod.unavailable_reason()
    if reason:
        pytest.skip(reason)
    dead = int(Path("/proc/sys/kernel/pid_max").read_text()) + 1  # never a live pid
    name = f"vl{dead}x1-stale"
    lab_mod._run(["ip", "netns", "add", name])
    try:
        assert name in lab_mod.reap_stale_labs()
        assert name not in lab_mod._run(["ip", "netns", "list"]).stdout
    finally:
        lab_mod._run(["ip", "netns", "del", name], check=False)
