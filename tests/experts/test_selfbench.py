"""Self-benchmark: a real (short) measurement, cached per device and expert spec."""

from __future__ import annotations

import json
import stat
from pathlib import Path

import pytest

from volunteer.experts.selfbench import cached_throughput


@pytest.mark.timeout(60)
def test_measures_once_then_reads_the_cache(tmp_path: Path) -> None:
    cache = tmp_path / "cache" / "selfbench.json"
    first = cached_throughput(cache, "cpu", "cpu (test)", "ffn", 16, {}, 8)
    assert first["cached"] is False
    assert first["train_samples_per_s"] > 0 and first["forward_samples_per_s"] > 0
    second = cached_throughput(cache, "cpu", "cpu (test)", "ffn", 16, {}, 8)
    assert second["cached"] is True and second["train_samples_per_s"] == first["train_samples_per_s"]
    other = cached_throughput(cache, "cpu", "cpu (test)", "nop", 16, {}, 8)  # another spec: measured anew
    assert other["cached"] is False
    assert len(json.loads(cache.read_text())) == 2
    assert sorted(p.name for p in cache.parent.iterdir()) == ["selfbench.json"]  # no temp files
    assert stat.S_IMODE(cache.stat().st_mode) == 0o600


def test_garbage_cache_is_ignored(tmp_path: Path) -> None:
    cache = tmp_path / "selfbench.json"
    cache.write_text("[not a mapping")
    assert cached_throughput(cache, "cpu", "cpu (test)", "nop", 4, {}, 4)["cached"] is False
