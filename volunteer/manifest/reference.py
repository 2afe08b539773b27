"""The manifest reference, generated from the declarations the validator walks.

``volunteer manifest schema`` prints it: every section and key with its type, what it
accepts, its default and its meaning, read from ``schema.manifest_sections()`` (the same
table ``validate.validate_document`` checks documents against), so the reference cannot
drift from the validator. Three renderings: ``text`` (a terminal), ``markdown`` (a table per
section, for docs) and ``json`` (tools).
"""

from __future__ import annotations

import json
import textwrap
from dataclasses import MISSING
from typing import Any

from volunteer.manifest.schema import KeyInfo, SectionInfo, manifest_sections

FORMATS = ("text", "markdown", "json")
_WIDTH = 92

INTRO = (
    "An experiment manifest is a YAML file that every volunteer of one experiment shares: "
    "`volunteer join FILE` (or the name of a shipped manifest). Unknown keys are errors. "
    "Sections marked required must be present; every other key may be left out for its default."
)


def default_value(k: KeyInfo) -> Any:
    """The key's default as plain JSON data (None for a required key: see ``k.required``)."""
    if k.required:
        return None
    value = k.default
    if isinstance(value, tuple):
        return list(value)
    if isinstance(value, dict):
        return dict(value)
    return value


def default_text(k: KeyInfo) -> str:
    """The key's default as YAML would spell it; ``(required)`` for a required key."""
    if k.default is MISSING:
        return "(required)"
    return json.dumps(default_value(k))


def reference_data() -> dict[str, Any]:
    """The whole reference as JSON-serialisable data."""
    return {
        "intro": INTRO,
        "sections": [
            {
                "name": s.name,
                "help": s.help,
                "required": s.required,
                "keys": [
                    {"name": k.name, "type": k.rule.type, "accepts": k.rule.expected,
                     "required": k.required, "default": default_value(k), "help": k.help}
                    for k in s.keys
                ],
            }
            for s in manifest_sections()
        ],
    }


def _text_section(s: SectionInfo) -> list[str]:
    req = " (required section)" if s.required else ""
    lines = [f"{s.name}:{req}  {s.help}"]
    for k in s.keys:
        lines.append(f"  {s.name}.{k.name}  {k.rule.type}, default {default_text(k)}")
        for para in (f"accepts {k.rule.expected}", k.help):
            lines += textwrap.wrap(para, _WIDTH, initial_indent="      ", subsequent_indent="      ")
    return lines


def render_text() -> str:
    """The reference for a terminal: one block per section, one entry per key."""
    lines = [*textwrap.wrap(INTRO, _WIDTH), ""]
    for s in manifest_sections():
        lines += [*_text_section(s), ""]
    return "\n".join(lines).rstrip() + "\n"


def _cell(text: str) -> str:
    return text.replace("|", "\\|").replace("\n", " ")


def render_markdown() -> str:
    """The reference as Markdown: a heading and a table per section."""
    out = ["# Experiment manifest reference", "", INTRO, ""]
    for s in manifest_sections():
        req = " (required)" if s.required else ""
        out += [f"## `{s.name}`{req}", "", s.help, "",
                "| Key | Type | Accepts | Default | Meaning |", "|---|---|---|---|---|"]
        for k in s.keys:
            out.append(f"| `{s.name}.{k.name}` | {k.rule.type} | {_cell(k.rule.expected)} | "
                       f"`{_cell(default_text(k))}` | {_cell(k.help)} |")
        out.append("")
    return "\n".join(out)


def render(fmt: str) -> str:
    """The reference in ``fmt`` (one of ``FORMATS``); ValueError for another."""
    if fmt == "text":
        return render_text()
    if fmt == "markdown":
        return render_markdown()
    if fmt == "json":
        return json.dumps(reference_data(), indent=2) + "\n"
    raise ValueError(f"unknown format {fmt!r}; expected one of {', '.join(FORMATS)}")
