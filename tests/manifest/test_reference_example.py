"""The fully commented example manifest (configs/example-lm.yaml): it validates, it explains
every key of the reference, it is a template (not offered or joined as an experiment), and
``volunteer manifest example lm`` prints it after a plain install."""

from __future__ import annotations

import re
import subprocess
import sys
from pathlib import Path

import pytest

from tests.conftest import cli_env
from volunteer.manifest import ManifestError, load_manifest, shipped_manifests
from volunteer.manifest.loader import example_manifests, example_text, parse_manifest
from volunteer.manifest.reference import reference_data

EXAMPLE = Path(__file__).resolve().parents[2] / "configs" / "example-lm.yaml"


def test_example_validates_and_is_realistic() -> None:
    m = load_manifest(str(EXAMPLE))
    assert m.expert.hidden_dim >= 512 and m.grid.size >= 256 and m.shards.replication >= 2
    assert m.network.bootstrap and m.wire.compression == "fp16" and m.admission.open
    assert m.serving.max_elements >= m.serving.max_batch_size * m.expert.hidden_dim
    from volunteer.experts.registry import build_expert

    build_expert(m.expert.kind, m.expert.hidden_dim, **m.expert.options)  # the options are real


def test_example_explains_every_key_of_the_reference() -> None:
    text = EXAMPLE.read_text()
    lines = text.splitlines()
    for section in reference_data()["sections"]:
        assert re.search(rf"^#? ?{section['name']}:", text, re.M), section["name"]
        for k in section["keys"]:
            hits = [ln for ln in lines if re.match(rf"^\s*#?\s+{k['name']}:", ln)]
            assert hits, f"{section['name']}.{k['name']} is not in the example"
            assert any("#" in ln.lstrip("# ") or ln.lstrip().startswith("#") for ln in hits), k["name"]


def test_example_is_a_template_not_a_shipped_experiment() -> None:
    assert "example-lm" not in shipped_manifests() and "demo" in shipped_manifests()
    assert example_manifests() == ["lm"]
    assert example_text("lm") == EXAMPLE.read_text() == example_text("example-lm")
    assert parse_manifest(example_text("lm").encode(), "example").experiment.name == "example-lm"
    with pytest.raises(ManifestError, match=r"manifest example lm > my-experiment\.yaml"):
        load_manifest("example-lm")
    with pytest.raises(ManifestError, match=r"no such example manifest \(examples: lm\)"):
        example_text("gpt")


def test_example_command_prints_it() -> None:
    out = subprocess.run([sys.executable, "-m", "volunteer", "manifest", "example", "lm"], capture_output=True,
                         text=True, timeout=60, env=cli_env(), stdin=subprocess.DEVNULL)
    assert out.returncode == 0 and out.stdout == EXAMPLE.read_text()
