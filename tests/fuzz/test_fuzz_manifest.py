"""Fuzzing the manifest loader (``volunteer.manifest.loader.parse_manifest``).

Inputs: random bytes, YAML-ish token soup (anchors, aliases, tags, flow and block
collections, odd scalars), and structure-aware mutations of the shipped manifests
(``configs/*.yaml``): one to three key paths replaced by hostile values or removed, unknown
keys added, then dumped back to YAML. Property: ``ManifestError`` or a ``Manifest``, never
another exception; and alias "bombs" (a few hundred bytes whose aliases expand
exponentially) are refused at once instead of being expanded (by ``repr`` in an error
message or by the validator).
"""

from __future__ import annotations

import copy
from pathlib import Path

import pytest
import yaml
from hypothesis import given
from hypothesis import strategies as st

from tests.fuzz.profile import fuzz_settings
from tests.fuzz.strategies import mutated
from volunteer.manifest import Manifest, ManifestError
from volunteer.manifest.loader import parse_manifest

pytestmark = pytest.mark.timeout(180)

CONFIGS = sorted((Path(__file__).resolve().parents[2] / "configs").glob("*.yaml"))
SHIPPED = {p.name: p.read_bytes() for p in CONFIGS}
DOCS = {name: yaml.safe_load(raw) for name, raw in SHIPPED.items()}
KNOWN_KINDS = ("ffn",)

TOKENS = ["experiment:", "expert:", "grid:", "serving:", "network:", "shards:", "optimizer:",
          "name:", "dims:", "prefix:", "kind:", "hidden_dim:", "bootstrap:", "public:", "\n", "\n  ",
          "\n    ", "- ", ": ", "[", "]", "{", "}", ", ", "&a ", "*a", "&b ", "*b", "!!str ",
          "!!python/object:os.system ", "!!binary ", "? ", "<<: *a", "---", "...", "#", "|", ">",
          "'", '"', "~", "null", "yes", "no", ".inf", "-.nan", "0x1F", "0o17", "1e400", "-1",
          "99999999999999999999999", "2001-12-14", "demo", "ffn", "/ip4/1.2.3.4/tcp/1", "\t", "%YAML 1.1\n"]

yamlish = st.lists(st.sampled_from(TOKENS), max_size=40).map(lambda ts: "".join(ts).encode())

hostile_values = st.one_of(
    st.none(), st.booleans(), st.integers(-(2**70), 2**70), st.floats(),
    st.text(max_size=30), st.binary(max_size=16),
    st.lists(st.integers(-3, 70000), max_size=6),
    st.dictionaries(st.text(max_size=6), st.integers(), max_size=3),
    st.sampled_from(["", "demo", "DEMO!", "1.0", "/ip4/1.2.3.4/tcp/1/p2p/QmNope", "/ip4/x",
                     "a" * 600, "yes", "auto"]),
)


def key_paths(doc: object, prefix: tuple = ()) -> list[tuple]:
    """Every key path of a nested mapping/list document."""
    out: list[tuple] = [prefix]
    if isinstance(doc, dict):
        for k, v in doc.items():
            out += key_paths(v, (*prefix, k))
    elif isinstance(doc, list):
        for i, v in enumerate(doc):
            out += key_paths(v, (*prefix, i))
    return out


@st.composite
def mutated_documents(draw: st.DrawFn) -> bytes:
    """A shipped manifest with 1-3 key paths replaced, removed or added, as YAML."""
    doc = copy.deepcopy(DOCS[draw(st.sampled_from(sorted(DOCS)))])
    for _ in range(draw(st.integers(1, 3))):
        path = draw(st.sampled_from(key_paths(doc)))
        if not path:
            continue
        parent = doc
        for k in path[:-1]:
            parent = parent[k]
        action = draw(st.integers(0, 5))
        if action == 0 and isinstance(parent, dict):
            del parent[path[-1]]
        elif action == 1 and isinstance(parent, dict):
            parent[draw(st.sampled_from(["junk", "name", "dims", "seed", "options"]))] = draw(hostile_values)
        else:
            parent[path[-1]] = draw(hostile_values)
    return yaml.safe_dump(doc, allow_unicode=True).encode()


def check(data: bytes) -> None:
    try:
        manifest = parse_manifest(data, "fuzz.yaml", KNOWN_KINDS)
    except ManifestError as exc:
        assert str(exc).startswith("fuzz.yaml: ")
        return
    assert isinstance(manifest, Manifest)
    assert manifest.grid.size >= 1 and manifest.expert.kind in KNOWN_KINDS


def test_shipped_manifests_load() -> None:
    assert SHIPPED
    for name, raw in SHIPPED.items():
        assert isinstance(parse_manifest(raw, name, KNOWN_KINDS), Manifest)


@fuzz_settings()
@given(st.binary(max_size=300))
def test_manifest_loader_on_random_bytes(data: bytes) -> None:
    check(data)


@fuzz_settings()
@given(yamlish)
def test_manifest_loader_on_yaml_token_soup(data: bytes) -> None:
    check(data)


@fuzz_settings(0.5)
@given(mutated_documents())
def test_manifest_loader_on_mutated_shipped_manifests(data: bytes) -> None:
    check(data)


@fuzz_settings(0.5)
@given(st.data())
def test_manifest_loader_on_byte_mutations_of_shipped_manifests(data: st.DataObject) -> None:
    check(data.draw(mutated(SHIPPED[data.draw(st.sampled_from(sorted(SHIPPED)))])))


def alias_bomb(levels: int, where: str) -> bytes:
    """``levels`` anchors, each a list of 9 aliases of the previous: 9**levels leaves."""
    items = ["&a0 [x, x, x, x, x, x, x, x, x]"]
    items += [f"&a{i} [" + ", ".join([f"*a{i - 1}"] * 9) + "]" for i in range(1, levels)]
    doc = yaml.safe_load(SHIPPED["demo.yaml"]) if "demo.yaml" in SHIPPED else {}
    text = yaml.safe_dump({k: v for k, v in doc.items() if k != where})
    return (text + f"{where}: [" + ", ".join(items) + "]\n").encode()


@pytest.mark.parametrize("where", ["experiment", "network", "grid"])
def test_alias_bombs_are_refused_without_expanding_them(where: str) -> None:
    # 12 levels: 9**12 (2.8e11) leaves in ~500 bytes; expanding them (e.g. repr() for the
    # error message) would take hours and all memory, so passing means it was not expanded.
    with pytest.raises(ManifestError, match="alias"):
        parse_manifest(alias_bomb(12, where), "bomb.yaml", KNOWN_KINDS)


def test_self_referencing_aliases_are_refused() -> None:
    with pytest.raises(ManifestError):
        parse_manifest(b"experiment: &a [*a, *a]\n", "loop.yaml", KNOWN_KINDS)
