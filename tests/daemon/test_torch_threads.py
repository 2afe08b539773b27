"""The ``torch_threads`` setting: auto (measured choice, else the static rule), explicit integers,\nand the daemon applying it at startup."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

from tests.conftest import DaemonFactory, cli_env, run_cli
from volunteer.daemon.control_client import call
from volunteer.daemon.hardware import static_auto_threads, torch_threads_for, usable_cpus


def test_auto_without_a_measurement_uses_the_static_rule_and_an_integer_overrides() -> None:
    for cpus in (1, 2, 3, 16):
        assert torch_threads_for("auto", cpus=cpus) == static_auto_threads(cpus)
        assert 1 <= static_auto_threads(cpus) <= cpus
    assert torch_threads_for("auto") == static_auto_threads(usable_cpus())
    assert torch_threads_for(4, cpus=2) == 4
    with pytest.raises(ValueError, match="auto or >= 1"):
        torch_threads_for(0)


def test_auto_takes_the_measured_choice_among_the_candidates() -> None:
    seen: list[list[int]] = []

    def choose(candidates: list[int]) -> int:
        seen.append(candidates)
        return 2

    assert torch_threads_for("auto", cpus=3, choose=choose) == 2
    assert seen == [[1, 2, 3]]
    assert torch_threads_for("auto", cpus=1, choose=choose) == 1  # nothing to measure
    assert seen == [[1, 2, 3]]


def _boom(candidates: list[int]) -> int:
    raise RuntimeError("no memory for the benchmark")


@pytest.mark.parametrize("choose", [_boom, lambda c: 9, lambda c: 0, lambda c: True, lambda c: "2"])
def test_a_failed_or_absurd_measurement_falls_back_to_the_static_rule(choose) -> None:
    assert torch_threads_for("auto", cpus=4, choose=choose) == static_auto_threads(4)


def test_an_explicit_integer_is_never_measured() -> None:
    assert torch_threads_for(3, cpus=2, choose=_boom) == 3
    assert torch_threads_for("2", cpus=8, choose=_boom) == 2


@pytest.mark.timeout(60)
def test_applied_value_reaches_threads_started_later() -> None:
    code = (
        "import threading, torch\n"
        "from volunteer.daemon.hardware import apply_torch_threads\n"
        "before = torch.get_num_threads()\n"
        "applied = apply_torch_threads(3 if before != 3 else 2)\n"
        "seen = []\n"
        "t = threading.Thread(target=lambda: seen.append(torch.get_num_threads()))\n"
        "t.start(); t.join()\n"
        "print(before, applied, seen[0])\n"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=60, check=True)
    before, applied, seen = map(int, out.stdout.split())
    assert applied == seen == (3 if before != 3 else 2)


@pytest.mark.timeout(60)
def test_auto_applies_the_self_benchmark_choice_through_the_cache(tmp_path: Path) -> None:
    code = (
        "import sys, threading, torch\n"
        "from volunteer.experts import selfbench\n"
        "from volunteer.daemon.hardware import apply_torch_threads\n"
        "selfbench.time_threads = lambda step, cands, batch, **kw: {n: 100.0 * min(n, 2) for n in cands}\n"
        "choose = selfbench.thread_chooser(__import__('pathlib').Path(sys.argv[1]), 'cpu (t)', 'ffn', 16, {}, 8)\n"
        "applied = apply_torch_threads('auto', choose=lambda cands: choose([1, 2, 3]))\n"
        "seen = []\n"
        "t = threading.Thread(target=lambda: seen.append(torch.get_num_threads()))\n"
        "t.start(); t.join()\n"
        "print(applied, seen[0])\n"
    )
    cache = tmp_path / "selfbench.json"
    out = subprocess.run([sys.executable, "-c", code, str(cache)], capture_output=True, text=True,
                         timeout=60, check=True)
    if usable_cpus() == 1:  # nothing to choose: the static rule
        assert out.stdout.split() == ["1", "1"]
    else:
        assert out.stdout.split() == ["2", "2"]  # 3 threads are no faster than 2: the fewer win
        assert "threads|" in cache.read_text()


@pytest.mark.timeout(60)
def test_settings_command_lists_torch_threads(tmp_path: Path) -> None:
    home = str(tmp_path / "home")
    rows = {r["name"]: r for r in json.loads(run_cli("settings", "--json", "--home", home).stdout)["settings"]}
    assert (rows["torch_threads"]["value"], rows["torch_threads"]["source"]) == ("auto", "default")
    env = cli_env(VOLUNTEER_TORCH_THREADS="3")
    rows = {r["name"]: r for r in json.loads(run_cli("settings", "--json", "--home", home, env=env).stdout)["settings"]}
    assert (rows["torch_threads"]["value"], rows["torch_threads"]["source"]) == (3, "env")
    assert "max_threads" not in rows


@pytest.mark.timeout(90)
def test_daemon_applies_auto_at_startup_and_reports_it(tmp_path: Path, volunteer_daemon: DaemonFactory) -> None:
    home = tmp_path / "home"
    volunteer_daemon.start(home)
    snap = call(home, "status")
    expected = torch_threads_for("auto")
    assert snap["device"]["torch_threads"] == expected
    assert snap["settings"]["torch_threads"] == "auto"
    assert f"{expected} torch thread(s)" in volunteer_daemon.procs[0].output()


def test_auto_on_a_gpu_node_keeps_few_intra_op_threads() -> None:
    from volunteer.daemon.hardware import gpu_auto_threads, torch_threads_for

    def never(candidates: list[int]) -> int:
        raise AssertionError("a GPU node does not measure CPU thread counts")

    assert torch_threads_for("auto", cpus=16, choose=never, device="cuda:0") == 2
    assert torch_threads_for("auto", cpus=2, device="cuda:1") == 1
    assert [gpu_auto_threads(n) for n in (1, 2, 3, 64)] == [1, 1, 2, 2]
    assert torch_threads_for(6, cpus=16, device="cuda:0") == 6  # explicit counts as given
