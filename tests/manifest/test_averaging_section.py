"""The manifest's ``averaging`` section (replica averaging): defaults, the shipped demo's
values, and one-line errors naming the key path."""

from __future__ import annotations

import pytest
import yaml

from tests.manifest.broken_cases import VALID, mutate
from volunteer.manifest import load_manifest
from volunteer.manifest.errors import ManifestError
from volunteer.manifest.loader import parse_manifest
from volunteer.manifest.schema import AveragingSection


def test_defaults_when_absent_and_the_demo_documents_them() -> None:
    m = parse_manifest(yaml.safe_dump(VALID).encode(), "t.yaml")
    assert m.averaging == AveragingSection(replica_period_s=30.0, replica_alpha=0.5)
    assert m.averaging.replicas_enabled
    demo = load_manifest("demo")
    assert demo.averaging == AveragingSection()


def test_values_and_off() -> None:
    m = parse_manifest(mutate("averaging", {"replica_period_s": 2, "replica_alpha": 1}).encode(), "t.yaml")
    assert m.averaging == AveragingSection(replica_period_s=2.0, replica_alpha=1.0)
    off = parse_manifest(mutate("averaging", {"replica_period_s": 0}).encode(), "t.yaml")
    assert not off.averaging.replicas_enabled
    # Not part of what checkpoints depend on.
    assert m.fingerprint() == off.fingerprint()


@pytest.mark.parametrize(("section", "key", "fragment"), [
    ({"replica_period_s": -1}, "averaging.replica_period_s", "a number in [0, 86400]"),
    ({"replica_period_s": 0.1}, "averaging.replica_period_s", "0 (off) or a number in [0.5, 86400]"),
    ({"replica_period_s": "often"}, "averaging.replica_period_s", "got the string"),
    ({"replica_alpha": 0}, "averaging.replica_alpha", "a number in (0, 1]"),
    ({"replica_alpha": 1.5}, "averaging.replica_alpha", "a number in (0, 1]"),
    ({"replica_alpha": float("nan")}, "averaging.replica_alpha", "a number in (0, 1]"),
    ({"period": 3}, "averaging.period", "unknown key"),
    ([1, 2], "averaging", "expected a mapping"),
])
def test_errors_name_the_key_path(section: object, key: str, fragment: str) -> None:
    with pytest.raises(ManifestError) as err:
        parse_manifest(mutate("averaging", section).encode(), "t.yaml")
    assert err.value.key_path == key and fragment in str(err.value) and "\n" not in str(err.value)
