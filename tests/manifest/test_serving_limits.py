"""The manifest's ``serving`` section is ``ServingLimits``: one definition of every limit."""

from __future__ import annotations

import dataclasses
import math
from pathlib import Path

import pytest
import yaml

from tests.manifest.broken_cases import VALID, mutate
from volunteer.manifest import ManifestError, load_manifest
from volunteer.runtime.limits import LIMIT_FIELDS, ServingLimits, limit_range
from volunteer.wire.limits import DEFAULT_LIMITS, MESSAGE_FIELDS, WireLimits


def load(tmp_path: Path, text: str):  # type: ignore[no-untyped-def]
    path = tmp_path / "m.yaml"
    path.write_text(text)
    return load_manifest(str(path))


def test_serving_section_parses_into_serving_limits_with_its_defaults(tmp_path: Path) -> None:
    m = load(tmp_path, yaml.safe_dump(VALID))
    assert type(m.serving) is ServingLimits
    assert m.serving == dataclasses.replace(ServingLimits(), max_batch_size=64)
    assert m.serving.max_grad_norm is None  # the gradient-norm bound is off by default


def test_every_serving_limit_is_a_manifest_key(tmp_path: Path) -> None:
    doc = dict(VALID, serving={"max_queued_bytes": 4096, "activation_cache_ttl_s": 5, "max_grad_norm": 2.5,
                               "activation_cache_size": 0, "default_ttl_s": 30.0})
    s = load(tmp_path, yaml.safe_dump(doc)).serving
    assert (s.max_queued_bytes, s.activation_cache_ttl_s, s.max_grad_norm) == (4096, 5.0, 2.5)
    assert s.activation_cache_size == 0 and isinstance(s.activation_cache_ttl_s, float)
    assert s.default_ttl_s == 30.0


@pytest.mark.parametrize("key, bad", [
    ("max_grad_norm", 0), ("max_grad_norm", -1.0), ("max_grad_norm", "big"), ("max_grad_norm", float("inf")),
    ("max_queued_bytes", 0), ("max_tensors", 10**6), ("max_bytes", 1.5), ("default_ttl_s", True),
])
def test_out_of_range_serving_limit_names_key_and_range(tmp_path: Path, key: str, bad: object) -> None:
    with pytest.raises(ManifestError) as err:
        load(tmp_path, mutate(f"serving.{key}", bad))
    assert f"serving.{key}" in str(err.value) and "expected" in str(err.value)
    lo, _ = limit_range(key)
    assert f"{lo:g}" in str(err.value) or str(int(lo)) in str(err.value)


def test_wire_limits_are_a_view_of_the_one_definition() -> None:
    # The message bounds are typed once (WireLimits); ServingLimits' defaults are those.
    assert ServingLimits().wire() == DEFAULT_LIMITS == WireLimits()
    assert set(MESSAGE_FIELDS) <= set(LIMIT_FIELDS)
    custom = ServingLimits(max_bytes=4096, max_tensors=2)
    assert (custom.wire().max_bytes, custom.wire().max_tensors) == (4096, 2)


def test_every_limit_has_a_range_that_holds_its_default() -> None:
    for name, f in LIMIT_FIELDS.items():
        lo, hi = limit_range(name)
        assert lo <= hi, name
        if f.default is not None:
            assert lo <= f.default <= hi and math.isfinite(f.default), name
    with pytest.raises(ValueError, match="max_queue_size"):
        ServingLimits(max_queue_size=0)
