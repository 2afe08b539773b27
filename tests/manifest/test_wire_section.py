"""The manifest's ``wire`` section (trainers' default compression): default, every value of
the wire's one list, ``none``, and one-line errors naming the key path and the choices."""

from __future__ import annotations

import subprocess
import sys

import pytest
import yaml

from tests.manifest.broken_cases import VALID, mutate
from volunteer.manifest import load_manifest
from volunteer.manifest.errors import ManifestError
from volunteer.manifest.loader import parse_manifest
from volunteer.manifest.schema import WireSection
from volunteer.wire import COMPRESSIONS


def test_absent_means_no_compression() -> None:
    m = parse_manifest(yaml.safe_dump(VALID).encode(), "t.yaml")
    assert m.wire == WireSection(compression=None)
    assert load_manifest("demo").wire.compression is None
    assert m.summary()["wire"] == {"compression": None}


@pytest.mark.parametrize("value", [*COMPRESSIONS, "none"])
def test_every_wire_compression_is_accepted(value: str | None) -> None:
    m = parse_manifest(mutate("wire", {"compression": value}).encode(), "t.yaml")
    assert m.wire.compression == (None if value == "none" else value)
    # not part of what checkpoints depend on
    assert m.fingerprint() == parse_manifest(yaml.safe_dump(VALID).encode(), "t.yaml").fingerprint()


@pytest.mark.parametrize(("section", "key", "fragment"), [
    ({"compression": "int4"}, "wire.compression", "expected one of none, fp16, bf16, int8"),
    ({"compression": "FP16"}, "wire.compression", "got the string 'FP16'"),
    ({"compression": True}, "wire.compression", "one of none, fp16, bf16, int8"),
    ({"compression": ["fp16"]}, "wire.compression", "one of none"),
    ({"compresion": "fp16"}, "wire.compresion", "unknown key (expected one of: compression)"),
    ("bf16", "wire", "expected a mapping"),
])
def test_errors_name_the_key_path_and_the_choices(section: object, key: str, fragment: str) -> None:
    with pytest.raises(ManifestError) as err:
        parse_manifest(mutate("wire", section).encode(), "t.yaml")
    assert err.value.key_path == key and fragment in str(err.value) and "\n" not in str(err.value)


def test_validating_the_wire_section_does_not_import_torch() -> None:
    code = ("import sys, yaml; from volunteer.manifest.loader import parse_manifest; "
            f"parse_manifest(yaml.safe_dump({VALID!r} | {{'wire': {{'compression': 'int8'}}}})"
            ".encode(), 't'); print('torch' in sys.modules)")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=60)
    assert out.returncode == 0, out.stderr
    assert out.stdout.strip() == "False"
