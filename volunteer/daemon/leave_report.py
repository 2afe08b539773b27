"""``LeaveReport``: what a graceful leave did, for the CLI summary and the exit code."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

from volunteer.status.fmt import duration


@dataclass
class LeaveReport:
    """Outcome of a leave: drain figures, checkpoint pass and whatever was cut short."""

    reason: str
    timeout_s: float
    duration_s: float = 0.0
    completed: int = 0
    cut_short: int = 0
    checkpoint: dict[str, Any] = field(default_factory=dict)
    problems: list[str] = field(default_factory=list)
    handoffs: list[dict[str, Any]] = field(default_factory=list)  # ``Handoff.as_dict()``, with its ``line``

    @property
    def clean(self) -> bool:
        return not self.problems

    def as_dict(self) -> dict[str, Any]:
        return {
            "reason": self.reason,
            "timeout_s": self.timeout_s,
            "duration_s": round(self.duration_s, 3),
            "completed": self.completed,
            "cut_short": self.cut_short,
            "checkpoint": self.checkpoint,
            "problems": self.problems,
            "handoffs": self.handoffs,
            "clean": self.clean,
        }

    def summary_lines(self) -> list[str]:
        """Human summary, one fact per line."""
        ck = self.checkpoint
        written = len(ck.get("written", [])) + len(ck.get("unchanged", []))
        lines = [
            f"left ({self.reason}) in {duration(self.duration_s)}: finished {self.completed} in-flight request(s), "
            f"cut short {self.cut_short}",
            f"checkpointed {written} expert(s) to {ck.get('directory', 'the home')}",
        ]
        lines += [str(h.get("line", "")) for h in self.handoffs]
        lines += [f"cut short: {p}" for p in self.problems]
        return lines
