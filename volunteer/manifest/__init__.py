"""Experiment manifest: YAML schema, strict loading, errors naming file and key path.

Files:

- ``errors.py``: ``ManifestError`` (file, key path, what was expected) -> one-line message.
- ``schema.py``: frozen dataclasses (``Manifest``, ``ExperimentInfo``, ``ExpertSpec``,
  ``GridSpec``, ``OptimizerConfig``, ``ServingConfig``, ``NetworkConfig``, ``WireSection``) and the
  architecture fingerprint that guards checkpoints.
- ``validate.py``: the strict field checks (types, ranges, unknown keys) with key paths.
- ``loader.py``: ``load_manifest(path_or_name)``: a path or the name of a manifest shipped in
  ``volunteer.configs``; bounded read, ``yaml.safe_load`` only.

This package imports neither torch nor the runtime, so a broken manifest is reported in a
fraction of a second; the expert kind is checked against the registry by the caller
(``load_manifest(..., known_kinds=...)``).
"""

from volunteer.manifest.errors import ManifestError
from volunteer.manifest.loader import load_manifest, resolve_manifest_path, shipped_manifests
from volunteer.manifest.schema import Manifest

__all__ = ["Manifest", "ManifestError", "load_manifest", "resolve_manifest_path", "shipped_manifests"]
