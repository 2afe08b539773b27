"""The settings layer rejects what ``join`` would: a bad schedule, announce address, public
word or shard cache size fails in ``resolve_settings`` (so ``volunteer settings`` says so)."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

from volunteer.daemon.rules import parse_schedule, schedule_problem
from volunteer.daemon.settings import SettingsError, parse_assignments, resolve_settings

REPO = Path(__file__).resolve().parents[2]


@pytest.mark.parametrize("text", ["mon 9-17", "funday 09:00-17:00", "25:00", "mon 25:00-26:00"])
def test_a_bad_schedule_is_refused_by_every_layer(tmp_path: Path, text: str) -> None:
    with pytest.raises(SettingsError, match=r"environment VOLUNTEER_SCHEDULE: schedule: .*expected clauses"):
        resolve_settings(None, {"VOLUNTEER_SCHEDULE": text}, {})
    with pytest.raises(SettingsError, match=r"command line: schedule: "):
        resolve_settings(None, {}, parse_assignments([f"schedule={text}"]))
    cfg = tmp_path / "config.yaml"
    cfg.write_text(f"schedule: '{text}'\n")
    with pytest.raises(SettingsError, match=r"config.yaml: schedule: "):
        resolve_settings(cfg, {}, {})
    assert schedule_problem(text) is not None


def test_a_good_schedule_passes_and_parses_the_same() -> None:
    text = "mon-fri 18:00-08:00, sat-sun all day"
    assert resolve_settings(None, {"VOLUNTEER_SCHEDULE": text}, {}).schedule == text
    assert schedule_problem(text) is None and parse_schedule(text) is not None
    assert schedule_problem("") is None


def test_announce_addrs_are_multiaddrs() -> None:
    with pytest.raises(SettingsError, match=r"VOLUNTEER_ANNOUNCE_ADDRS: announce_addrs 'notanaddr': not a multiaddr"):
        resolve_settings(None, {"VOLUNTEER_ANNOUNCE_ADDRS": "notanaddr"}, {})
    good = "/ip4/203.0.113.5/tcp/4001"
    assert resolve_settings(None, {"VOLUNTEER_ANNOUNCE_ADDRS": good}, {}).announce_addrs == good
    assert resolve_settings(None, {"VOLUNTEER_ANNOUNCE_ADDRS": "auto"}, {}).announce_addrs == "auto"
    assert resolve_settings(None, {"VOLUNTEER_ANNOUNCE_ADDRS": ""}, {}).announce_addrs == ""


def test_public_names_the_words_the_flag_takes() -> None:
    for env, flags in (({"VOLUNTEER_PUBLIC": "maybe"}, {}), ({}, {"public": "maybe"})):
        with pytest.raises(SettingsError, match=r"public: expected one of yes, no, auto, got 'maybe'"):
            resolve_settings(None, env, flags)
    assert resolve_settings(None, {"VOLUNTEER_PUBLIC": "yes"}, {}).public is True
    with pytest.raises(SettingsError, match="selfbench: expected true or false"):
        resolve_settings(None, {"VOLUNTEER_SELFBENCH": "maybe"}, {})


def test_shard_cache_bytes_takes_units_and_prints_its_range_in_bytes() -> None:
    assert resolve_settings(None, {"VOLUNTEER_SHARD_CACHE_BYTES": "4GB"}, {}).shard_cache_bytes == 4 * 10**9
    assert resolve_settings(None, {}, {"shard_cache_bytes": "500MiB"}).shard_cache_bytes == 500 * 2**20
    with pytest.raises(SettingsError) as info:
        resolve_settings(None, {"VOLUNTEER_SHARD_CACHE_BYTES": "1k"}, {})
    text = str(info.value)
    assert "from 67.1 MB to 1125.9 TB" in text and "e+" not in text and "unlimited" not in text


def test_volunteer_settings_exits_2_on_a_bad_schedule(tmp_path: Path) -> None:
    env = {k: v for k, v in os.environ.items() if not k.startswith("VOLUNTEER_")}
    env.update(VOLUNTEER_SCHEDULE="mon 9-17", PYTHONPATH=str(REPO))
    out = subprocess.run([sys.executable, "-m", "volunteer", "settings", "--home", str(tmp_path / "h")],
                         capture_output=True, text=True, env=env, timeout=60)
    assert out.returncode == 2, out.stdout + out.stderr
    assert "schedule: bad time range '9-17'" in out.stderr
