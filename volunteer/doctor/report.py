"""One doctor check's result, the whole report, its exit code and its two renderings.

A ``Check`` is one line of the preflight: a name, a verdict (``ok`` / ``warn`` / ``fail`` /
``skip``), what was found (``detail``) and, unless it is ok, what to do about it (``fix``).
``Report`` collects them in order; ``can_serve`` is False as soon as one check failed (that is
what the exit code of ``volunteer doctor`` says), warnings do not stop a node from serving.
``render_text`` lays the lines out for the terminal's width (the fix on its own indented
line, never cut: it is what the user copies); ``as_json`` is the machine-readable shape.
"""

from __future__ import annotations

import textwrap
from dataclasses import asdict, dataclass, field
from typing import Any

OK = "ok"
WARN = "warn"
FAIL = "fail"
SKIP = "skip"
VERDICTS = (OK, WARN, FAIL, SKIP)
JSON_VERSION = 1


@dataclass(frozen=True)
class Check:
    """One preflight line: ``verdict`` is one of ``VERDICTS``; ``fix`` is empty when ok."""

    name: str
    verdict: str
    detail: str
    fix: str = ""
    data: dict[str, Any] = field(default_factory=dict)

    def __post_init__(self) -> None:
        if self.verdict not in VERDICTS:
            raise ValueError(f"verdict must be one of {VERDICTS}, got {self.verdict!r}")


def ok(name: str, detail: str, **data: Any) -> Check:
    return Check(name, OK, detail, "", data)


def warn(name: str, detail: str, fix: str, **data: Any) -> Check:
    return Check(name, WARN, detail, fix, data)


def failed(name: str, detail: str, fix: str, **data: Any) -> Check:
    return Check(name, FAIL, detail, fix, data)


def skipped(name: str, detail: str, **data: Any) -> Check:
    return Check(name, SKIP, detail, "", data)


@dataclass
class Report:
    """The checks in the order they ran, plus what was checked (experiment, home)."""

    experiment: str
    home: str
    checks: list[Check] = field(default_factory=list)

    def add(self, *checks: Check) -> None:
        self.checks.extend(checks)

    @property
    def can_serve(self) -> bool:
        return not any(c.verdict == FAIL for c in self.checks)

    def counts(self) -> dict[str, int]:
        return {v: sum(1 for c in self.checks if c.verdict == v) for v in VERDICTS}

    def as_json(self) -> dict[str, Any]:
        """``{"version", "experiment", "home", "can_serve", "counts", "checks": [...]}``."""
        return {"version": JSON_VERSION, "experiment": self.experiment, "home": self.home,
                "can_serve": self.can_serve, "counts": self.counts(),
                "checks": [asdict(c) for c in self.checks]}


def summary(report: Report) -> str:
    """The last line: can this node serve, and how many warnings/failures."""
    n = report.counts()
    tail = f"{n[FAIL]} failed, {n[WARN]} warning(s), {n[OK]} ok, {n[SKIP]} skipped"
    if report.can_serve:
        return f"verdict: this node can serve ({tail})"
    return f"verdict: this node cannot serve until the failed checks are fixed ({tail})"


def render_text(report: Report, width: int = 80) -> str:
    """Plain lines: ``[ ok ] name  detail`` and, below a problem, ``       fix: ...``."""
    width = max(40, width)
    name_w = min(14, max((len(c.name) for c in report.checks), default=4))
    lead = 7 + name_w + 1
    lines = [f"doctor: experiment {report.experiment}, home {report.home}"]
    for c in report.checks:
        head = f"[{c.verdict:^4}] {c.name:<{name_w}} "
        body = textwrap.wrap(c.detail, max(20, width - lead), break_long_words=False,
                             break_on_hyphens=False) or [""]  # an address stays whole
        lines.append(head + body[0])
        lines.extend(" " * lead + more for more in body[1:])
        if c.fix:
            for i, part in enumerate(textwrap.wrap(c.fix, max(20, width - lead - 5),
                                                   break_long_words=False, break_on_hyphens=False)):
                lines.append(" " * lead + ("fix: " if i == 0 else "     ") + part)
    lines.append(summary(report))
    return "\n".join(lines)
