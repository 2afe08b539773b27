"""Expert registry: kind name -> constructor. Built-in kinds, plus kinds that installed
plug-in packages register through the ``volunteer.experts`` entry point group.

Built-ins (``zoo.py``) are one line each in ``_BUILTIN``. A plug-in is an ordinary Python
distribution that declares, in its ``pyproject.toml``::

    [project.entry-points."volunteer.experts"]
    moe_glu = "volunteer_experts_glu:GluExpert"

The constructor is called as ``ctor(hidden_dim, **expert.options)`` and must return a
``torch.nn.Module`` with ``input_shapes`` (per-sample shapes of its inputs, batch dimension
excluded), like the zoo's classes. A manifest names the kind (``expert.kind``) and may name
the distribution that provides it (``expert.package``) so that a node without it can say what
to install (``require_expert_kind``).

What a manifest can and cannot make a machine run: only entry points of distributions the
machine's owner installed are ever loaded, found by the kind's name in the installed
metadata; a module path is never read from a manifest, and nothing is installed for it. A
plug-in cannot replace a built-in kind (the built-in wins and the plug-in is logged and
ignored), and a kind that two installed distributions register is refused by name rather
than picked by install order. Listing kinds (``available_experts``) reads metadata only;
a plug-in's code is imported when its kind is first built.
"""

from __future__ import annotations

import importlib.metadata
import logging
import re
from collections.abc import Callable
from typing import TYPE_CHECKING, Any

from volunteer.manifest.errors import ManifestError

if TYPE_CHECKING:
    from torch import nn

ENTRY_POINT_GROUP = "volunteer.experts"
_KIND_RE = re.compile(r"^[a-z_][a-z0-9_]{0,63}$")  # as the manifest's expert.kind
_BUILTIN = {"ffn": "FeedForwardExpert", "transformer": "TransformerExpert", "nop": "NopExpert"}

log = logging.getLogger(__name__)


def _dist_name(ep: importlib.metadata.EntryPoint) -> str:
    dist = getattr(ep, "dist", None)
    return str(dist.name) if dist is not None and dist.name else "an unknown distribution"


def plugin_entry_points() -> dict[str, list[importlib.metadata.EntryPoint]]:
    """Installed plug-in kinds: name -> the entry points registering it (metadata only,
    nothing imported). Names that are not valid kind names, or that shadow a built-in, are
    logged and left out."""
    found: dict[str, list[importlib.metadata.EntryPoint]] = {}
    for ep in importlib.metadata.entry_points(group=ENTRY_POINT_GROUP):
        if not _KIND_RE.match(ep.name):
            log.warning("ignoring expert kind %r from %s: not a valid kind name", ep.name, _dist_name(ep))
        elif ep.name in _BUILTIN:
            log.warning("ignoring expert kind %r from %s: a built-in kind has that name", ep.name,
                        _dist_name(ep))
        elif all(e.value != ep.value or _dist_name(e) != _dist_name(ep) for e in found.get(ep.name, [])):
            found.setdefault(ep.name, []).append(ep)  # one distribution seen twice on sys.path: once
    return found


def available_experts() -> list[str]:
    """The expert kinds this machine can host (built-in and installed plug-ins), sorted."""
    return sorted(set(_BUILTIN) | set(plugin_entry_points()))


def kind_provider(kind: str) -> str | None:
    """The distribution that provides an installed plug-in ``kind`` (None: built-in or absent)."""
    eps = plugin_entry_points().get(kind)
    return _dist_name(eps[0]) if eps else None


def require_expert_kind(kind: str, package_hint: str | None, source: str) -> None:
    """Check that this machine can host ``kind``, or raise ``ManifestError`` at
    ``expert.kind`` saying what to install (``package_hint``: the manifest's ``expert.package``).

    Cheap (metadata only): callers run it before importing torch or building anything.
    """
    if kind in _BUILTIN:
        return
    eps = plugin_entry_points().get(kind)
    if eps and len(eps) > 1:
        names = ", ".join(sorted(_dist_name(e) for e in eps))
        raise ManifestError(source, "expert.kind",
                            f"expert kind {kind!r} is registered by several installed packages ({names}); "
                            "uninstall all but one")
    if eps:
        return
    installed = ", ".join(available_experts())
    if package_hint:
        fix = (f"it is provided by the Python package {package_hint!r}: run `pip install {package_hint}` "
               "in this node's environment, then join again")
    else:
        fix = ("install the plug-in package that provides it (the experiment's manifest does not name "
               "one in expert.package; ask the experiment's owner)")
    raise ManifestError(source, "expert.kind",
                        f"expert kind {kind!r} is not installed on this machine; {fix} "
                        f"(installed kinds: {installed})")


def expert_constructor(kind: str) -> Callable[..., Any]:
    """The constructor of ``kind``; ValueError for an unknown kind or a plug-in that fails to load."""
    if kind in _BUILTIN:
        from volunteer.experts import zoo

        return getattr(zoo, _BUILTIN[kind])
    eps = plugin_entry_points().get(kind)
    if not eps:
        raise ValueError(f"unknown expert kind {kind!r}; known kinds: {', '.join(available_experts())}")
    if len(eps) > 1:
        raise ValueError(f"expert kind {kind!r} is registered by several installed packages: "
                         + ", ".join(sorted(_dist_name(e) for e in eps)))
    try:
        ctor = eps[0].load()
    except Exception as exc:  # a plug-in's import may fail any way: report it as its problem
        raise ValueError(f"expert kind {kind!r} from {_dist_name(eps[0])} failed to load "
                         f"({type(exc).__name__}: {exc}); reinstall or update that package") from None
    if not callable(ctor):
        raise ValueError(f"expert kind {kind!r} from {_dist_name(eps[0])} is not a constructor")
    return ctor


def build_expert(kind: str, hidden_dim: int, **options: object) -> nn.Module:
    """A fresh expert module; ValueError for unknown kinds, bad sizes or unknown options, or a
    plug-in whose constructor fails or returns no ``nn.Module`` with ``input_shapes``."""
    if not isinstance(hidden_dim, int) or isinstance(hidden_dim, bool) or hidden_dim <= 0:
        raise ValueError(f"hidden_dim must be a positive int, got {hidden_dim!r}")
    ctor = expert_constructor(kind)
    try:
        module = ctor(hidden_dim, **options)
    except TypeError as e:
        raise ValueError(f"bad options for expert kind {kind!r}: {e}") from None
    if kind not in _BUILTIN:
        from torch import nn

        shapes = getattr(module, "input_shapes", None)
        if not isinstance(module, nn.Module) or not isinstance(shapes, (list, tuple)) or not shapes:
            raise ValueError(f"expert kind {kind!r} from {kind_provider(kind)} built no torch.nn.Module "
                             "with input_shapes (a list of per-sample input shapes)")
    return module
