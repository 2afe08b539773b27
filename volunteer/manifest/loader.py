"""Find and read an experiment manifest: a file path or the name of a shipped manifest.

``volunteer join demo`` must work after a plain ``pip install``, so bare names are looked up
in the ``volunteer.configs`` package with ``importlib.resources``. Files named
``example-*.yaml`` there are templates for researchers (placeholder bootstrap addresses),
not experiments to join: they are left out of ``shipped_manifests()`` (the list ``join``
offers), a bare name refers to them only to say how to copy one, and ``example_text``
returns one for ``volunteer manifest example``. Files are read with a
size bound and parsed with PyYAML's safe loader only (no arbitrary object construction).

A size bound alone does not bound the document: YAML aliases let 500 bytes describe 9**12
list items ("billion laughs"), and anything that walks or prints the result (the
validator, ``repr`` in an error message) would run for hours. ``_BoundedSafeLoader``
counts the nodes of the composed document with every alias expanded and refuses it past
``MAX_YAML_NODES`` before a single Python object is built; self-referencing aliases never
end and are refused the same way.
"""

from __future__ import annotations

import re
from collections.abc import Collection
from importlib import resources
from pathlib import Path

import yaml

from volunteer.manifest.errors import ManifestError
from volunteer.manifest.schema import Manifest
from volunteer.manifest.validate import validate_document

MAX_MANIFEST_BYTES = 256 * 1024
MAX_YAML_NODES = 100_000  # the shipped demo manifest has ~60
_NAME_RE = re.compile(r"^[a-z0-9][a-z0-9_-]{0,63}$")
EXAMPLE_PREFIX = "example-"


class _TooManyNodesError(yaml.YAMLError):
    """The document expands (aliases included) to more than ``MAX_YAML_NODES`` nodes."""


class _BoundedSafeLoader(yaml.SafeLoader):
    """``yaml.SafeLoader`` that refuses documents expanding past ``MAX_YAML_NODES`` nodes."""

    def compose_document(self) -> yaml.Node:
        node = super().compose_document()
        _check_expanded_size(node)
        return node


def _check_expanded_size(root: yaml.Node) -> None:
    """Count nodes as the constructor would visit them (an alias counts as its whole target)."""
    count = 0
    stack = [root]
    while stack:
        node = stack.pop()
        count += 1
        if count > MAX_YAML_NODES:
            raise _TooManyNodesError(
                f"the document expands to more than {MAX_YAML_NODES} values "
                "(aliases that repeat or refer to themselves?)"
            )
        if isinstance(node, yaml.SequenceNode):
            stack.extend(node.value)
        elif isinstance(node, yaml.MappingNode):
            for key, value in node.value:
                stack.append(key)
                stack.append(value)


def _bundled() -> list[str]:
    root = resources.files("volunteer.configs")
    return sorted(p.name[:-5] for p in root.iterdir() if p.name.endswith(".yaml"))


def shipped_manifests() -> list[str]:
    """Names of the experiments bundled in ``volunteer.configs`` (without ``.yaml``); the
    ``example-*`` templates are not experiments and are not listed."""
    return [n for n in _bundled() if not n.startswith(EXAMPLE_PREFIX)]


def example_manifests() -> list[str]:
    """Names of the bundled example manifests (``lm`` for ``example-lm.yaml``)."""
    return [n[len(EXAMPLE_PREFIX):] for n in _bundled() if n.startswith(EXAMPLE_PREFIX)]


def example_text(name: str) -> str:
    """The text of the bundled example ``name`` (``lm`` or ``example-lm``); ManifestError if
    there is none."""
    short = name[len(EXAMPLE_PREFIX):] if name.startswith(EXAMPLE_PREFIX) else name
    if short not in example_manifests():
        known = ", ".join(example_manifests()) or "none"
        raise ManifestError(name, "", f"no such example manifest (examples: {known})")
    ref = resources.files("volunteer.configs").joinpath(f"{EXAMPLE_PREFIX}{short}.yaml")
    return ref.read_text(encoding="utf-8")


def resolve_manifest_path(experiment: str) -> tuple[str, bytes]:
    """Return ``(display name, raw bytes)`` for a manifest path or shipped manifest name.

    A value naming an existing file wins; otherwise a bare name is looked up among the
    shipped manifests. Raises ``ManifestError`` when neither exists or the file is too big.
    """
    path = Path(experiment).expanduser()
    if path.is_file():
        return str(path), _read_bounded(path, str(path))
    if _NAME_RE.match(experiment) and experiment.startswith(EXAMPLE_PREFIX) and experiment in _bundled():
        short = experiment[len(EXAMPLE_PREFIX):]
        raise ManifestError(experiment, "", "an example to copy, not an experiment to join: run `volunteer "
                            f"manifest example {short} > my-experiment.yaml`, edit it (name, bootstrap "
                            "addresses), then `volunteer join my-experiment.yaml`")
    if _NAME_RE.match(experiment):
        ref = resources.files("volunteer.configs").joinpath(experiment + ".yaml")
        if ref.is_file():
            display = f"{experiment} (shipped: volunteer/configs/{experiment}.yaml)"
            with ref.open("rb") as fh:
                data = fh.read(MAX_MANIFEST_BYTES + 1)
            if len(data) > MAX_MANIFEST_BYTES:
                raise ManifestError(display, "", f"file larger than {MAX_MANIFEST_BYTES} bytes")
            return display, data
    if path.exists():
        raise ManifestError(str(path), "", "not a regular file")
    shipped = ", ".join(shipped_manifests()) or "none"
    raise ManifestError(
        experiment, "", f"no such manifest file, and not a shipped manifest name (shipped: {shipped})"
    )


def _read_bounded(path: Path, display: str) -> bytes:
    try:
        with path.open("rb") as fh:
            data = fh.read(MAX_MANIFEST_BYTES + 1)
    except OSError as exc:
        raise ManifestError(display, "", f"cannot read: {exc.strerror or exc}") from exc
    if len(data) > MAX_MANIFEST_BYTES:
        raise ManifestError(display, "", f"file larger than {MAX_MANIFEST_BYTES} bytes")
    return data


def parse_manifest(data: bytes, display: str, known_kinds: Collection[str] | None = None) -> Manifest:
    """Parse and validate manifest bytes; ``display`` names the file in errors."""
    try:
        text = data.decode("utf-8")
    except UnicodeDecodeError as exc:
        raise ManifestError(display, "", f"not UTF-8 text (byte {exc.start})") from exc
    try:
        doc = yaml.load(text, Loader=_BoundedSafeLoader)
    except _TooManyNodesError as exc:
        raise ManifestError(display, "", f"invalid YAML: {exc}") from None
    except yaml.YAMLError as exc:
        mark = getattr(exc, "problem_mark", None)
        where = f"line {mark.line + 1}, column {mark.column + 1}: " if mark is not None else ""
        problem = getattr(exc, "problem", None) or str(exc).splitlines()[0]
        raise ManifestError(display, "", f"invalid YAML: {where}{problem}") from exc
    except RecursionError as exc:
        raise ManifestError(display, "", "invalid YAML: nested too deeply") from exc
    if doc is None:
        raise ManifestError(display, "", "empty manifest (expected a mapping with experiment, expert, grid)")
    return validate_document(doc, display, known_kinds)


def load_manifest(experiment: str, known_kinds: Collection[str] | None = None) -> Manifest:
    """Load a manifest by path or shipped name; raises ``ManifestError`` on any problem."""
    display, data = resolve_manifest_path(experiment)
    return parse_manifest(data, display, known_kinds)
