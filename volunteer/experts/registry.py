"""Explicit expert registry: kind name -> constructor. No import-order magic: adding a kind
means adding one line to ``_REGISTRY``.
"""

from __future__ import annotations

from collections.abc import Callable

from torch import nn

from volunteer.experts.zoo import FeedForwardExpert, NopExpert, TransformerExpert

_REGISTRY: dict[str, Callable[..., nn.Module]] = {
    "ffn": FeedForwardExpert,
    "transformer": TransformerExpert,
    "nop": NopExpert,
}


def available_experts() -> list[str]:
    """The expert kinds this build can host, sorted."""
    return sorted(_REGISTRY)


def build_expert(kind: str, hidden_dim: int, **options: object) -> nn.Module:
    """A fresh expert module; ValueError for unknown kinds, bad sizes or unknown options."""
    if kind not in _REGISTRY:
        raise ValueError(
            f"unknown expert kind {kind!r}; known kinds: {', '.join(available_experts())}"
        )
    if not isinstance(hidden_dim, int) or isinstance(hidden_dim, bool) or hidden_dim <= 0:
        raise ValueError(f"hidden_dim must be a positive int, got {hidden_dim!r}")
    try:
        return _REGISTRY[kind](hidden_dim, **options)
    except TypeError as e:
        raise ValueError(f"bad options for expert kind {kind!r}: {e}") from None
