"""Rules: how one manifest key's value is checked, and the words that describe the check.

Every manifest key is declared once, in ``schema.py``, as a dataclass field whose metadata
holds a ``Key``: its ``Rule`` and its help text. The validator (``validate.py``) applies the
rules; the reference (``reference.py``, printed by ``volunteer manifest schema``) prints them.
A rule is built by one factory call (``integer(1, 64)``), which makes both the check and the
text that describes it (``expected``: "an integer in [1, 64]") from the same numbers, so an
error message, the reference and the check cannot disagree.

Pure: no torch, no libp2p (the multiaddr parser is imported on first use).
"""

from __future__ import annotations

import math
import re
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from typing import Any

from volunteer.manifest.errors import describe

MAX_ADDRS = 64
MAX_MULTIADDR_CHARS = 512


class Problem(Exception):
    """A value a rule refuses: ``message`` is "expected ..., got ..."; ``suffix`` extends the
    key path to the offending item (``[1]`` for a list item, ``.name`` for a mapping key)."""

    def __init__(self, message: str, suffix: str = "") -> None:
        super().__init__(message)
        self.message = message
        self.suffix = suffix


@dataclass(frozen=True)
class Rule:
    """One key's check: ``type`` and ``expected`` describe it (reference and errors),
    ``check(value)`` returns the value to store or raises ``Problem``."""

    type: str
    expected: str
    check: Callable[[Any], Any]


@dataclass(frozen=True)
class Key:
    """A manifest key's declaration, kept in its dataclass field's metadata."""

    rule: Rule
    help: str


def key(rule: Rule, help: str, default: Any = ..., factory: Any = None) -> Any:
    """A dataclass field declaring a manifest key (required when no default is given)."""
    meta = {"key": Key(rule, help)}
    if factory is not None:
        return field(default_factory=factory, metadata=meta)
    if default is ...:
        return field(metadata=meta)
    return field(default=default, metadata=meta)


def _fail(expected: str, value: Any) -> Problem:
    return Problem(f"expected {expected}, got {describe(value)}")


def _is_int(value: Any) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


def _is_number(value: Any) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool)


def integer(lo: int, hi: int) -> Rule:
    """An integer in ``[lo, hi]`` (booleans refused: YAML reads ``yes`` as true)."""
    expected = f"an integer in [{lo}, {hi}]"

    def check(value: Any) -> int:
        if not _is_int(value) or not lo <= value <= hi:
            raise _fail(expected, value)
        return value

    return Rule("integer", expected, check)


def _range_text(lo: float, hi: float, lo_open: bool) -> str:
    return f"a number in {'(' if lo_open else '['}{lo:g}, {hi:g}]"


def number(lo: float, hi: float, lo_open: bool = False, nullable: bool = False) -> Rule:
    """A finite number in ``[lo, hi]`` (``(lo, hi]`` when ``lo_open``); ``nullable``: null
    (or leaving the key out) means off."""
    expected = _range_text(lo, hi, lo_open) + (" or null (off)" if nullable else "")

    def check(value: Any) -> float | None:
        if value is None and nullable:
            return None
        ok = _is_number(value) and math.isfinite(value)
        ok = ok and (value > lo if lo_open else value >= lo) and value <= hi
        if not ok:
            raise _fail(expected, value)
        return float(value)

    return Rule("number", expected, check)


def period_or_off(lo: float, hi: float) -> Rule:
    """0 (off) or a number of seconds in ``[lo, hi]``."""
    expected = f"0 (off) or a number in [{lo:g}, {hi:g}]"
    outer = number(0.0, hi)

    def check(value: Any) -> float:
        result = outer.check(value)
        if 0 < result < lo:
            raise _fail(expected, result)
        return result

    return Rule("number", expected, check)


def text(pattern: str, what: str) -> Rule:
    """A string matching ``pattern``; integers are read as their text (``version: 1``)."""
    compiled = re.compile(pattern)

    def check(value: Any) -> str:
        if _is_int(value):
            value = str(value)
        if not isinstance(value, str) or not compiled.match(value):
            raise _fail(what, value)
        return value

    return Rule("string", what, check)


def free_text(max_chars: int) -> Rule:
    """Any string of at most ``max_chars`` characters."""
    expected = f"a string of at most {max_chars} characters"

    def check(value: Any) -> str:
        if not isinstance(value, str) or len(value) > max_chars:
            raise _fail(expected, value)
        return value

    return Rule("string", expected, check)


def choice(options: tuple[str, ...], aliases: Mapping[Any, Any] | None = None,
           none_as: str | None = None) -> Rule:
    """One of ``options``. ``aliases`` map other spellings to an option (YAML 1.1 reads a bare
    ``yes`` as true); ``none_as``: the option text that stands for null (stored as None)."""
    shown = [none_as if o is None else o for o in options]
    expected = "one of " + ", ".join(str(o) for o in shown)
    aliases = dict(aliases or {})

    def check(value: Any) -> Any:
        for alias, target in aliases.items():
            if value is alias or (type(value) is type(alias) and value == alias):
                value = target
        if none_as is not None and (value is None or value == none_as):
            return None
        if not isinstance(value, str) or value not in options:
            raise _fail(expected, value)
        return value

    return Rule("choice", expected, check)


def multiaddr_problem(value: Any, need_peer_id: bool) -> str | None:
    """None when ``value`` parses as a multiaddr (ending in ``/p2p/<id>`` when required)."""
    if not isinstance(value, str) or not value.startswith("/") or len(value) > MAX_MULTIADDR_CHARS:
        return ("expected a multiaddr string such as /ip4/1.2.3.4/tcp/4001/p2p/Qm..., "
                f"got {describe(value)}")
    try:
        from multiaddr import Multiaddr

        protocols = [p.name for p in Multiaddr(value).protocols()]
    except Exception as exc:  # the multiaddr parser raises several unrelated types
        return f"expected a valid multiaddr, got {value!r} ({exc})"
    if need_peer_id and "p2p" not in protocols:
        return f"expected a multiaddr ending in /p2p/<peer id>, got {value!r}"
    return None


def multiaddrs(need_peer_id: bool) -> Rule:
    """A list of at most ``MAX_ADDRS`` multiaddrs (null or absent: empty)."""
    expected = f"a list of at most {MAX_ADDRS} multiaddr strings" + (
        " ending in /p2p/<peer id>" if need_peer_id else "")

    def check(value: Any) -> tuple[str, ...]:
        if value is None:
            return ()
        if not isinstance(value, list) or len(value) > MAX_ADDRS:
            raise _fail(expected, value)
        for i, item in enumerate(value):
            problem = multiaddr_problem(item, need_peer_id)
            if problem:
                raise Problem(problem, f"[{i}]")
        return tuple(value)

    return Rule("list", expected, check)


def grid_dims(max_dims: int, max_each: int, max_total: int) -> Rule:
    """A list of 1 to ``max_dims`` positive integers whose product is at most ``max_total``."""
    expected = (f"a list of 1 to {max_dims} positive integers (each at most {max_each}, "
                f"at most {max_total} experts in total)")

    def check(value: Any) -> tuple[int, ...]:
        if (not isinstance(value, list) or not 1 <= len(value) <= max_dims
                or not all(_is_int(d) and 1 <= d <= max_each for d in value)):
            raise _fail(f"a list of 1 to {max_dims} positive integers", value)
        if math.prod(value) > max_total:
            raise _fail(f"at most {max_total} experts in total", value)
        return tuple(value)

    return Rule("list", expected, check)


def dotted_prefix(max_chars: int) -> Rule:
    """Dot-separated names that do not start with a digit (``demo.ffn``)."""
    segment = re.compile(r"^[A-Za-z_][A-Za-z0-9_-]{0,63}$")
    expected = "dot-separated names that do not start with a digit, e.g. demo.ffn"

    def check(value: Any) -> str:
        parts = value.split(".") if isinstance(value, str) else []
        if not parts or len(value) > max_chars or not all(segment.match(s) for s in parts):
            raise _fail(expected, value)
        return value

    return Rule("string", expected, check)


def scalar_options(max_options: int, max_chars: int) -> Rule:
    """A mapping of lowercase names to numbers, booleans or short strings."""
    name_re = re.compile(r"^[a-z_][a-z0-9_]{0,63}$")
    expected = (f"a mapping of at most {max_options} lowercase names to numbers, booleans or "
                f"strings of at most {max_chars} characters")

    def check(value: Any) -> dict[str, Any]:
        if value is None:
            return {}
        if not isinstance(value, Mapping) or len(value) > max_options:
            raise _fail(f"a mapping of at most {max_options} options", value)
        for name, item in value.items():
            if not isinstance(name, str) or not name_re.match(name):
                raise Problem("expected a lowercase option name", f".{name}")
            if not isinstance(item, (int, float, str, bool)) or (isinstance(item, str) and len(item) > max_chars):
                raise Problem(f"expected a number, boolean or short string, got {describe(item)}", f".{name}")
        return dict(value)

    return Rule("mapping", expected, check)


def from_limit(expected: str, problem: Callable[[Any], str | None], integer_valued: bool) -> Rule:
    """A rule over a check defined elsewhere (the serving limits of ``volunteer.runtime.limits``)."""

    def check(value: Any) -> Any:
        if problem(value) is not None:
            raise _fail(expected, value)
        return value if value is None or integer_valued else float(value)

    return Rule("integer" if integer_valued else "number", expected, check)
