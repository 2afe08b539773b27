"""``ManifestError``: what is wrong with a manifest, where, and what was expected.

Every problem is reported as one line ``<file>: <key.path>: expected <what>, got <what>`` so
the volunteer can fix it without reading the schema; the CLI turns it into exit code 2.
"""

from __future__ import annotations


class ManifestError(Exception):
    """A manifest that cannot be used. ``str(err)`` is the one-line message."""

    def __init__(self, file: str, key_path: str, problem: str) -> None:
        self.file = file
        self.key_path = key_path
        self.problem = problem
        where = f"{file}: {key_path}: " if key_path else f"{file}: "
        super().__init__(where + problem)


def describe(value: object) -> str:
    """A short, bounded description of an offending value for error messages."""
    if value is None:
        return "null"
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, (dict, list)):
        kind = "a mapping" if isinstance(value, dict) else "a list"
        return f"{kind} {_short(repr(value))}"
    if isinstance(value, str):
        return f"the string {_short(repr(value))}"
    return f"{type(value).__name__} {_short(repr(value))}"


def _short(text: str, limit: int = 60) -> str:
    return text if len(text) <= limit else text[: limit - 3] + "..."
