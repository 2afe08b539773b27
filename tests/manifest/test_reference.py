"""The manifest reference (``volunteer manifest schema``) against the validator itself.

The keys the validator accepts are read from the validator's own refusals (an unknown key's
error lists the accepted ones), not from the table the reference prints, and compared with
the reference; every documented key is then fed to the validator with a valid value and must
be accepted and stored, every documented default must be what the validator fills in, and
an undocumented key must be refused.
"""

from __future__ import annotations

import copy
import json
import re
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest
import yaml

from tests.conftest import cli_env
from tests.manifest.broken_cases import PEER, VALID, VALID_BOOTSTRAP
from volunteer.manifest import ManifestError
from volunteer.manifest.loader import parse_manifest
from volunteer.manifest.reference import reference_data, render
from volunteer.manifest.validate import accepted_keys, validate_document

# A valid value for every key whose default cannot be fed back (required or null by default).
SAMPLES: dict[str, Any] = {
    "experiment.name": "sample-exp", "experiment.version": "2", "experiment.description": "a sample",
    "expert.kind": "transformer", "expert.hidden_dim": 32, "expert.options": {"num_heads": 4},
    "expert.package": "volunteer-experts-sample",
    "grid.prefix": "sample.layer0", "grid.dims": [3, 5],
    "optimizer.clip_grad_norm": 2.5,
    "serving.max_grad_norm": 10.0,
    "network.bootstrap": [VALID_BOOTSTRAP], "network.relays": [VALID_BOOTSTRAP],
    "network.announce_addrs": ["/ip4/203.0.113.7/tcp/31337"],
    "admission.owner": None,  # filled in below with a real key
    "admission.peers": [PEER],
    "wire.compression": "int8",
}


def _owner_key() -> str:
    from nacl.signing import SigningKey

    from volunteer.manifest.admission import format_owner_key

    return format_owner_key(SigningKey.generate().verify_key.encode())


def _documented() -> dict[str, list[dict[str, Any]]]:
    return {s["name"]: s["keys"] for s in reference_data()["sections"]}


def _refused_keys(doc: dict[str, Any], path: str) -> set[str]:
    """The validator's list of accepted keys at ``path``, read from its unknown-key error."""
    with pytest.raises(ManifestError) as err:
        validate_document(doc, "t.yaml")
    assert err.value.key_path == (f"{path}.no_such_key" if path else "no_such_key")
    listed = re.search(r"unknown key \(expected one of: (.*)\)$", err.value.problem)
    assert listed, err.value.problem
    return set(listed.group(1).split(", "))


def test_reference_names_every_key_the_validator_accepts() -> None:
    documented = _documented()
    top = copy.deepcopy(VALID)
    top["no_such_key"] = 1
    assert _refused_keys(top, "") == set(documented)
    for section, keys in documented.items():
        doc = copy.deepcopy(VALID)
        doc[section] = {**doc.get(section, {}), "no_such_key": 1}
        assert _refused_keys(doc, section) == {k["name"] for k in keys}, section
    assert {s: set(k) for s, k in accepted_keys().items()} == {
        s: {k["name"] for k in keys} for s, keys in documented.items()}


def _value_for(section: str, k: dict[str, Any]) -> Any:
    name = f"{section}.{k['name']}"
    if name == "admission.owner":
        return _owner_key()
    if name in SAMPLES:
        return SAMPLES[name]
    assert not k["required"] and k["default"] is not None, f"no sample value for {name}"
    return k["default"]


def _normal(value: Any) -> Any:
    if isinstance(value, tuple):
        return list(value)
    if isinstance(value, dict):
        return dict(value)
    return value


@pytest.mark.parametrize("section", [s["name"] for s in reference_data()["sections"]])
def test_every_documented_key_is_accepted_and_stored(section: str) -> None:
    for k in _documented()[section]:
        value = _value_for(section, k)
        doc = copy.deepcopy(VALID)
        doc[section] = {**doc.get(section, {}), k["name"]: value}
        manifest = validate_document(doc, "t.yaml")
        stored = getattr(getattr(manifest, section), k["name"])
        assert _normal(stored) == value, f"{section}.{k['name']}"


def test_documented_defaults_are_what_the_validator_fills_in() -> None:
    minimal = {"experiment": VALID["experiment"], "expert": VALID["expert"], "grid": VALID["grid"]}
    manifest = validate_document(minimal, "t.yaml")
    for section, keys in _documented().items():
        for k in keys:
            if not k["required"]:
                stored = getattr(getattr(manifest, section), k["name"])
                assert _normal(stored) == k["default"], f"{section}.{k['name']}"
    required = {f"{s}.{k['name']}" for s, keys in _documented().items() for k in keys if k["required"]}
    assert required == {"experiment.name", "experiment.version", "expert.kind", "expert.hidden_dim",
                        "grid.prefix", "grid.dims"}


def test_every_key_has_a_meaning_type_and_range() -> None:
    for section in reference_data()["sections"]:
        assert section["help"]
        for k in section["keys"]:
            assert len(k["help"]) > 15 and k["type"] and k["accepts"], (section["name"], k["name"])


def test_package_hint_is_a_plain_distribution_name() -> None:
    for bad in ("rm -rf /", "pkg; curl x", "git+https://evil/x.git", "../x", "-e.", "a" * 101, 3.5):
        doc = copy.deepcopy(VALID)
        doc["expert"] = {**doc["expert"], "package": bad}
        with pytest.raises(ManifestError) as err:
            validate_document(doc, "t.yaml")
        assert err.value.key_path == "expert.package" and "distribution name" in str(err.value)


def _cli(*args: str, cwd: Path | None = None) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, "-m", "volunteer", *args], capture_output=True, text=True,
                          timeout=60, env=cli_env(), stdin=subprocess.DEVNULL, cwd=cwd)


def test_schema_command_prints_every_key_in_each_format() -> None:
    names = [f"{s}.{k['name']}" for s, keys in _documented().items() for k in keys]
    text = _cli("manifest", "schema")
    assert text.returncode == 0, text.stderr
    markdown = _cli("manifest", "schema", "--format", "markdown")
    for name in names:
        assert f"  {name}  " in text.stdout and f"| `{name}` |" in markdown.stdout, name
    as_json = json.loads(_cli("manifest", "schema", "--format", "json").stdout)
    assert as_json == json.loads(json.dumps(reference_data()))
    assert render("text") == text.stdout
    bad = _cli("manifest", "schema", "--format", "html")
    assert bad.returncode == 2 and bad.stderr.strip() == (
        "error: --format: expected one of text, markdown, json, got 'html'")


def test_check_command_ok_and_one_line_error(tmp_path: Path) -> None:
    ok = _cli("manifest", "check", "demo")
    assert ok.returncode == 0, ok.stderr
    assert ok.stdout.startswith("ok: demo") and "8 experts" in ok.stdout
    broken = tmp_path / "broken.yaml"
    doc = copy.deepcopy(VALID)
    doc["shards"] = {"replication": 0}
    broken.write_text(yaml.safe_dump(doc))
    out = _cli("manifest", "check", str(broken))
    assert out.returncode == 2 and out.stdout == ""
    assert out.stderr == f"error: {broken}: shards.replication: expected an integer in [1, 64], got int 0\n"
    summary = json.loads(_cli("manifest", "check", "demo", "--json").stdout)
    assert summary["ok"] and summary["grid"]["experts"] == 8 and summary["expert"]["installed_here"]


def test_parse_of_rendered_json_defaults_round_trips() -> None:
    """A manifest written from the reference's defaults (plus the required keys) validates."""
    doc: dict[str, Any] = copy.deepcopy({"experiment": VALID["experiment"], "expert": VALID["expert"],
                                         "grid": VALID["grid"]})
    for section, keys in _documented().items():
        if section == "admission":
            continue  # present means closed: at least an owner or peers (see test above)
        for k in keys:
            if not k["required"]:
                doc.setdefault(section, {})[k["name"]] = k["default"]
    parse_manifest(yaml.safe_dump(doc).encode(), "t.yaml")
