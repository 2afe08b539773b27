"""Fitting the plain status to a terminal's width (``volunteer status | cat`` in a terminal).

``render_plain(snapshot, width)`` builds its lines as if the width were unlimited, then:

- ``table_lines(rows, width)`` lays out the experts table, leaving out its low-value columns
  first (``DROP_ORDER``: traffic in/out, batch size, samples/s, p50, queue; all of them are
  in ``--json`` and the dashboard) until the table fits;
- ``fit_lines(lines, width, keep)`` wraps every other long line under its own value column:
  fields separated by three spaces (``util 0%   mem 1.0 GiB``) move to the next line whole,
  long prose ("why", advice, errors) wraps between words. Words are never cut, so a
  multiaddr, a path or a peer id stays whole and copyable even when it is wider than the
  width; the lines in ``keep`` (the addresses to copy) are never touched.

``width=None`` (output to a file, a pipe with no terminal behind it) leaves the lines as built.
"""

from __future__ import annotations

import re
import textwrap
from collections.abc import Iterable

MIN_WIDTH = 40
FIELD_SEP = "   "
DROP_ORDER = ("in", "out", "batch", "samples/s", "p50", "queue")
_LABEL = re.compile(r"^(\s*\S(?:.*?\S)?\s{2,})(?=\S)")  # "label   value": the value's column


def table_lines(rows: list[dict[str, str]], width: int | None) -> list[str]:
    """Header + one line per row, columns two spaces apart, fitted to ``width`` by leaving out
    the columns of ``DROP_ORDER`` (in that order) while the table is too wide."""
    if not rows:
        return []
    cols = list(rows[0])
    widths = {c: max(len(c), *(len(r[c]) for r in rows)) for c in cols}

    def total() -> int:
        return sum(widths[c] for c in cols) + 2 * (len(cols) - 1)

    for name in DROP_ORDER:
        if width is None or total() <= width:
            break
        if name in cols:
            cols.remove(name)
    out = ["  ".join(c.ljust(widths[c]) for c in cols).rstrip()]
    out += ["  ".join(r[c].ljust(widths[c]) for c in cols).rstrip() for r in rows]
    return out


def fit_lines(lines: Iterable[str], width: int | None, keep: Iterable[str] = ()) -> list[str]:
    """Each line wrapped to ``width`` under its value column (see the module docstring)."""
    kept = set(keep)
    out: list[str] = []
    for line in lines:
        if width is None or len(line) <= width or line in kept:
            out.append(line)
        else:
            out += _wrap(line, max(MIN_WIDTH, width))
    return out


def _wrap(line: str, width: int) -> list[str]:
    match = _LABEL.match(line)
    indent = len(match.group(1)) if match and len(match.group(1)) <= width // 2 else 0
    if not indent:
        indent = len(line) - len(line.lstrip())
    head, value = line[:indent], line[indent:]
    room = max(MIN_WIDTH // 2, width - indent)
    pad = " " * indent if 0 < indent <= width // 2 else "    "
    out: list[str] = []
    current = ""
    for field in value.split(FIELD_SEP):
        field = field.strip()
        if not field:
            continue
        if current and len(current) + len(FIELD_SEP) + len(field) <= room:
            current += FIELD_SEP + field
            continue
        if current:
            out.append(current)
        pieces = textwrap.wrap(field, room, break_long_words=False, break_on_hyphens=False) or [field]
        out += pieces[:-1]
        current = pieces[-1]
    if current:
        out.append(current)
    return [(head if i == 0 else pad) + text for i, text in enumerate(out)] or [line]
