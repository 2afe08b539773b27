"""Hypothesis strategies shared by the fuzz targets: msgpack-able values and byte mutations.

``msgpack_values`` draws what a hostile peer can put in any msgpack field (nested lists and
maps, huge and negative ints, NaN and infinities, bytes, strings); ``mutated`` derives
near-valid byte strings from a valid one (bit flips, truncation, splices, insertions), the
inputs that reach a decoder's deeper checks instead of failing at the first byte.
"""

from __future__ import annotations

from collections.abc import Callable, Coroutine
from typing import Any

from hypothesis import strategies as st

scalars = st.one_of(
    st.none(),
    st.booleans(),
    st.integers(min_value=-(2**63), max_value=2**64 - 1),
    st.floats(allow_nan=True, allow_infinity=True),
    st.text(max_size=24),
    st.binary(max_size=64),
)

msgpack_values = st.recursive(
    scalars,
    lambda inner: st.one_of(
        st.lists(inner, max_size=6),
        st.dictionaries(st.one_of(st.text(max_size=8), st.integers(-5, 5)), inner, max_size=6),
    ),
    max_leaves=8,
)
"""Any value msgpack can pack (map keys: strings or small ints)."""


@st.composite
def mutated(draw: st.DrawFn, valid: bytes) -> bytes:
    """``valid`` with a few random byte-level edits (or, rarely, unchanged)."""
    data = bytearray(valid)
    for _ in range(draw(st.integers(0, 4))):
        op = draw(st.sampled_from(("flip", "set", "truncate", "insert", "delete", "splice")))
        if op in ("flip", "set", "delete") and not data:
            continue
        if op == "flip":
            i = draw(st.integers(0, len(data) - 1))
            data[i] ^= 1 << draw(st.integers(0, 7))
        elif op == "set":
            i = draw(st.integers(0, len(data) - 1))
            data[i] = draw(st.sampled_from((0x00, 0x7F, 0x80, 0xC0, 0xC1, 0xCF, 0xDC, 0xDD, 0xDE,
                                             0xDF, 0xFF)))
        elif op == "truncate":
            del data[draw(st.integers(0, len(data))):]
        elif op == "insert":
            i = draw(st.integers(0, len(data)))
            data[i:i] = draw(st.binary(min_size=1, max_size=16))
        elif op == "delete":
            i = draw(st.integers(0, len(data) - 1))
            del data[i : i + draw(st.integers(1, 8))]
        else:  # splice: repeat a slice of itself (duplicated fields, repeated entries)
            i = draw(st.integers(0, len(data)))
            j = draw(st.integers(i, len(data)))
            data[j:j] = data[i:j]
    return bytes(data)


def run_sync(coro: Coroutine[Any, Any, Any]) -> Any:
    """Run a coroutine that never really suspends (its awaitables complete at once)."""
    try:
        coro.send(None)
    except StopIteration as stop:
        return stop.value
    coro.close()
    raise AssertionError("the coroutine suspended; expected it to run to completion")


def reader(data: bytes, eof: type[Exception], asked: list[int] | None = None
           ) -> Callable[[int], Coroutine[Any, Any, bytes]]:
    """An async ``read_exactly(n)`` over ``data``: raises ``eof`` when too few bytes remain;
    records each ``n`` asked for in ``asked`` (to check what a decoder would allocate)."""
    pos = 0

    async def read_exactly(n: int) -> bytes:
        nonlocal pos
        if asked is not None:
            asked.append(n)
        if pos + n > len(data):
            raise eof(f"stream ended: wanted {n} bytes, {len(data) - pos} left")
        chunk = data[pos : pos + n]
        pos += n
        return chunk

    return read_exactly
