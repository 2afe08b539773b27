"""The dashboard's "hosted experts" table, laid out for the terminal's width.

Every header stays whole and no cell is cut: when the full table is wider than the terminal,
the traffic columns first lose their rates (``340.0 MiB`` instead of
``340.0 MiB (1.2 MiB/s)``), then the lowest-value columns go, one at a time, in the order of
``DROP_ORDER`` (batch size, p50, queue, traffic, samples/s, updates, p99). uid, req/s and
errors always stay (the errors column wraps if it must). A caption names what was left out;
``--json`` and the plain view carry everything. The table is never stretched: on a wide
terminal it is as wide as its content (``expand=False``).
"""

from __future__ import annotations

from rich.cells import cell_len
from rich.table import Table
from rich.text import Text

COLUMNS = ("uid", "req/s", "samples/s", "batch", "queue", "p50", "p99", "updates", "in", "out", "errors")
DROP_ORDER = (("batch",), ("p50",), ("queue",), ("in", "out"), ("samples/s",), ("updates",), ("p99",))
ERRORS_MIN_WIDTH = 16  # the errors column wraps below its natural width, down to this many cells


def experts_table(rows: list[dict[str, str]], width: int) -> tuple[Table, int]:
    """The table of ``rows`` (``plain.expert_rows``) that fits ``width`` cells if any does,
    and the cells it takes."""
    shown, short = _fit(rows, width)
    hidden = [c for c in COLUMNS if c not in shown]
    caption = None
    if hidden or short:
        caption = "narrow terminal: " + ", ".join(
            ([f"{', '.join(hidden)} hidden"] if hidden else []) + (["rates hidden"] if short and "in" in shown else []))
    table = Table(title="hosted experts", title_justify="left", expand=False, caption=caption,
                  caption_justify="left", caption_style="dim")
    for col in shown:
        if col == "errors":
            table.add_column(col, justify="left", overflow="fold", min_width=len(col))
        else:
            table.add_column(col, justify="left" if col == "uid" else "right", no_wrap=True, min_width=cell_len(col))
    for r in rows:
        cells = _cells(r, short)
        table.add_row(*(Text(cells[c], style="red") if c == "errors" and cells[c] != "0" else cells[c] for c in shown))
    if not rows:
        table.add_row("none hosted", *[""] * (len(shown) - 1))
    return table, min(width, table_width(rows, shown, short, wrap_errors=False))


def table_width(rows: list[dict[str, str]], columns: list[str], short: bool, wrap_errors: bool = True) -> int:
    """Cells the table takes with these columns: each column's widest cell (its header
    included) plus one space of padding each side, plus the box's vertical lines. With
    ``wrap_errors`` the errors column counts at most ``ERRORS_MIN_WIDTH`` (it may wrap)."""
    total = len(columns) + 1
    for col in columns:
        cells = [_cells(r, short)[col] for r in rows] or ["none hosted" if col == "uid" else ""]
        natural = max(cell_len(col), *(cell_len(v) for v in cells))
        if col == "errors" and wrap_errors:
            natural = min(natural, max(ERRORS_MIN_WIDTH, cell_len(col)))
        total += natural + 2
    return total


def _fit(rows: list[dict[str, str]], width: int) -> tuple[list[str], bool]:
    """The columns to show and whether the traffic columns lose their rates."""
    columns = list(COLUMNS)
    if table_width(rows, columns, short=False) <= width:
        return columns, False
    for group in ((), *DROP_ORDER):
        columns = [c for c in columns if c not in group]
        if table_width(rows, columns, short=True) <= width:
            break
    return columns, True


def _cells(row: dict[str, str], short: bool) -> dict[str, str]:
    """The row's display strings; ``short`` keeps only the bytes of the traffic cells."""
    if not short:
        return row
    return {k: (v.split(" (")[0] if k in ("in", "out") else v) for k, v in row.items()}

