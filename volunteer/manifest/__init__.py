"""Experiment manifest: YAML schema, strict loading, errors naming file and key path.

Files:

- ``errors.py``: ``ManifestError`` (file, key path, what was expected) -> one-line message.
- ``schema.py``: frozen dataclasses (``Manifest``, ``ExperimentInfo``, ``ExpertSpec``,
  ``GridSpec``, ``OptimizerConfig``, ``ServingConfig``, ``NetworkConfig``, ``WireSection``) and the
  architecture fingerprint that guards checkpoints.
- ``rules.py``: how one key is checked and described (``Rule``/``Key``): each builder makes the
  check and the reference text from the same numbers.
- ``validate.py``: the strict field checks (types, ranges, unknown keys) with key paths, walking
  the schema's one table of keys.
- ``reference.py``: the reference printed by ``volunteer manifest schema`` (text, markdown,
  json), generated from that same table so it cannot drift.
- ``loader.py``: ``load_manifest(path_or_name)``: a path or the name of a manifest shipped in
  ``volunteer.configs``; bounded read, ``yaml.safe_load`` only; ``example-*.yaml`` are templates
  (``example_manifests``, ``example_text``), never offered as experiments.

This package imports neither torch nor the runtime, so a broken manifest is reported in a
fraction of a second; the expert kind is checked against the registry by the caller
(``load_manifest(..., known_kinds=...)``).
"""

from volunteer.manifest.errors import ManifestError
from volunteer.manifest.loader import load_manifest, resolve_manifest_path, shipped_manifests
from volunteer.manifest.schema import Manifest

__all__ = ["Manifest", "ManifestError", "load_manifest", "resolve_manifest_path", "shipped_manifests"]
