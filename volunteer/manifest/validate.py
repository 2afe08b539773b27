"""Strict validation of a parsed manifest document into ``Manifest``.

The keys, their checks and defaults are declared once, in ``schema.py`` (read through
``schema.manifest_sections()``); this module walks a document against those declarations.
Every problem raises ``ManifestError`` naming the key path (``serving.max_batch_size``,
``network.bootstrap[1]``) and what was expected. Unknown keys are rejected so a typo never
silently falls back to a default. The ``serving`` section parses into
``volunteer.runtime.limits.ServingLimits`` (its fields' own defaults and ranges), and
``admission`` is checked by ``admission.parse_admission``.
"""

from __future__ import annotations

import re
from collections.abc import Collection, Mapping
from typing import Any

from volunteer.manifest.admission import parse_admission
from volunteer.manifest.errors import ManifestError, describe
from volunteer.manifest.rules import MAX_ADDRS, Problem, multiaddr_problem
from volunteer.manifest.schema import (
    MAX_GRID_DIMS,
    MAX_GRID_SIZE,
    MAX_OPTIONS,
    NAME_PATTERN,
    OPTIMIZERS,
    Manifest,
    SectionInfo,
    manifest_sections,
)

NAME_RE = re.compile(NAME_PATTERN)  # experiment names (also read by volunteer.net.admission)

__all__ = [
    "MAX_ADDRS", "MAX_GRID_DIMS", "MAX_GRID_SIZE", "MAX_OPTIONS", "NAME_RE", "OPTIMIZERS",
    "accepted_keys", "multiaddr_problem", "validate_document",
]


def _check_keys(data: Any, path: str, file: str, allowed: Collection[str]) -> Mapping[str, Any]:
    """``data`` as a mapping with only ``allowed`` keys, or ManifestError at ``path``."""
    if not isinstance(data, Mapping):
        raise ManifestError(file, path or "(top level)", f"expected a mapping, got {describe(data)}")
    for name in data:
        if not isinstance(name, str) or name not in allowed:
            where = f"{path}.{name}" if path else str(name)
            raise ManifestError(file, where, f"unknown key (expected one of: {', '.join(sorted(allowed))})")
    return data


def _section(info: SectionInfo, data: Any, file: str) -> Any:
    """One section parsed into its class: each present key through its rule, each absent one
    its declared default (a missing required key is an error)."""
    data = _check_keys(data, info.name, file, [k.name for k in info.keys])
    values: dict[str, Any] = {}
    for k in info.keys:
        path = f"{info.name}.{k.name}"
        if k.name not in data:
            if k.required:
                raise ManifestError(file, path, "missing required key")
            continue
        value = data[k.name]
        if value is None and k.default is None:
            continue  # an optional key written as null keeps its default (off)
        try:
            values[k.name] = k.rule.check(value)
        except Problem as exc:
            raise ManifestError(file, path + exc.suffix, exc.message) from None
    return info.cls(**values)


def validate_document(doc: Any, file: str, known_kinds: Collection[str] | None = None) -> Manifest:
    """Turn a parsed YAML document into a ``Manifest`` or raise ``ManifestError``.

    ``known_kinds``: when given, ``expert.kind`` must be one of them (callers that import the
    expert registry pass its kinds; the manifest package itself never imports torch).
    """
    sections = manifest_sections()
    doc = _check_keys(doc, "", file, [s.name for s in sections])
    values: dict[str, Any] = {}
    for info in sections:
        if info.name == "admission":
            values[info.name] = parse_admission(doc.get("admission"), file)
        elif info.name in doc:
            values[info.name] = _section(info, doc[info.name], file)
        elif info.required:
            raise ManifestError(file, info.name, "missing required key")
        else:
            values[info.name] = _section(info, {}, file)
        if info.name == "expert" and known_kinds is not None and values["expert"].kind not in known_kinds:
            kind = values["expert"].kind
            raise ManifestError(file, "expert.kind",
                                f"expected one of {', '.join(sorted(known_kinds))}, got {describe(kind)}")
    return Manifest(source=file, **values)


def accepted_keys() -> dict[str, tuple[str, ...]]:
    """Section name -> the keys ``validate_document`` accepts in it (for the reference's test
    and tools; derived from the same declarations the validator walks)."""
    return {s.name: tuple(k.name for k in s.keys) for s in manifest_sections()}
