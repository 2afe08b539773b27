"""Manifest loading: shipped manifests, strict validation with key paths, fingerprints."""

from __future__ import annotations

from pathlib import Path

import pytest
import yaml

from tests.manifest.broken_cases import CASES, PEER, VALID, VALID_BOOTSTRAP, mutate
from volunteer.manifest import ManifestError, load_manifest, shipped_manifests
from volunteer.manifest.loader import MAX_MANIFEST_BYTES


def write(tmp_path: Path, text: str, name: str = "m.yaml") -> Path:
    path = tmp_path / name
    path.write_text(text)
    return path


def test_shipped_demo_loads_by_name() -> None:
    assert "demo" in shipped_manifests()
    m = load_manifest("demo")
    assert m.experiment.name == "demo"
    assert m.grid.size == len(list(m.grid.uids())) >= 4
    assert all(uid.startswith(m.grid.prefix + ".") for uid in m.grid.uids())
    assert m.network.bootstrap == ()  # the demo needs no outside peer


def test_valid_manifest_with_network(tmp_path: Path) -> None:
    doc = dict(VALID, network={"bootstrap": [VALID_BOOTSTRAP], "relays": [VALID_BOOTSTRAP], "listen_port": 4001,
                               "announce_addrs": ["/ip4/10.0.0.1/tcp/4001"], "public": "no"})
    m = load_manifest(str(write(tmp_path, yaml.safe_dump(doc))))
    assert m.network.bootstrap == (VALID_BOOTSTRAP,)
    assert m.network.listen_port == 4001
    assert m.network.public == "no"
    assert list(m.grid.uids()) == ["test.ffn.0.0", "test.ffn.0.1", "test.ffn.1.0", "test.ffn.1.1"]


def test_admission_section_is_parsed_and_absent_means_open(tmp_path: Path) -> None:
    from volunteer.manifest.admission import format_owner_key

    assert load_manifest(str(write(tmp_path, yaml.safe_dump(VALID)))).admission.open
    owner = format_owner_key(_owner_public_key())
    doc = dict(VALID, admission={"owner": owner, "peers": [PEER]})
    m = load_manifest(str(write(tmp_path, yaml.safe_dump(doc))))
    assert m.admission.owner == owner and m.admission.peers == (PEER,)
    assert not m.admission.open


def _owner_public_key() -> bytes:
    from nacl.signing import SigningKey

    return bytes(SigningKey(bytes(32)).verify_key)


def test_yaml_boolean_yes_is_accepted_for_public(tmp_path: Path) -> None:
    text = mutate("network.public", "auto").replace("public: auto", "public: yes")
    assert load_manifest(str(write(tmp_path, text))).network.public == "yes"


@pytest.mark.parametrize(("case_id", "text", "key_path", "fragment"), CASES, ids=[c[0] for c in CASES])
def test_broken_manifest_names_file_key_and_expectation(
    tmp_path: Path, case_id: str, text: str, key_path: str, fragment: str
) -> None:
    path = write(tmp_path, text)
    with pytest.raises(ManifestError) as info:
        load_manifest(str(path))
    err = info.value
    assert err.file == str(path)
    assert err.key_path == key_path
    assert fragment in str(err)
    assert "\n" not in str(err)
    assert str(err).startswith(f"{path}: ")


def test_unknown_kind_rejected_when_known_kinds_given(tmp_path: Path) -> None:
    path = write(tmp_path, mutate("expert.kind", "moe9000"))
    load_manifest(str(path))  # the kind is only checked against a registry when one is given
    with pytest.raises(ManifestError, match=r"expert\.kind: expected one of ffn, nop"):
        load_manifest(str(path), known_kinds=["ffn", "nop"])


def test_missing_file_and_unknown_name() -> None:
    with pytest.raises(ManifestError, match=r"no such manifest file.*shipped: .*demo"):
        load_manifest("/nonexistent/x.yaml")
    with pytest.raises(ManifestError, match="not a shipped manifest name"):
        load_manifest("no-such-experiment")


def test_directory_is_not_a_manifest(tmp_path: Path) -> None:
    with pytest.raises(ManifestError, match="not a regular file"):
        load_manifest(str(tmp_path))


def test_oversized_file_rejected_before_parsing(tmp_path: Path) -> None:
    path = write(tmp_path, "# " + "x" * MAX_MANIFEST_BYTES + "\n")
    with pytest.raises(ManifestError, match="larger than"):
        load_manifest(str(path))


def test_non_utf8_and_unsafe_yaml_rejected(tmp_path: Path) -> None:
    with pytest.raises(ManifestError, match="not UTF-8"):
        load_manifest(_bytes_file(tmp_path, b"\xff\xfe\x00bad"))
    unsafe = "!!python/object/apply:os.system ['echo pwned']\n"
    with pytest.raises(ManifestError, match="invalid YAML"):
        load_manifest(str(write(tmp_path, unsafe, "unsafe.yaml")))


def _bytes_file(tmp_path: Path, data: bytes) -> str:
    path = tmp_path / "bin.yaml"
    path.write_bytes(data)
    return str(path)


def test_fingerprint_tracks_architecture_not_learning_rate(tmp_path: Path) -> None:
    base = load_manifest(str(write(tmp_path, yaml.safe_dump(VALID), "a.yaml")))
    new_lr = load_manifest(str(write(tmp_path, mutate("optimizer.lr", 0.01), "b.yaml")))
    wider = load_manifest(str(write(tmp_path, mutate("expert.hidden_dim", 32), "c.yaml")))
    other_opt = load_manifest(str(write(tmp_path, mutate("optimizer.name", "sgd"), "d.yaml")))
    assert base.fingerprint() == new_lr.fingerprint()
    assert base.fingerprint() != wider.fingerprint()
    assert base.fingerprint() != other_opt.fingerprint()
