"""Every public trainer-side class and function says what it does, and every constructor
argument is explained (by introspection: each parameter's name appears in the class or
``__init__`` docstring; each public method has a docstring)."""

from __future__ import annotations

import importlib
import inspect
import re
from typing import Any

import pytest

import volunteer.client

MODULES = [
    "volunteer.client.moe", "volunteer.client.node", "volunteer.client.remote_expert",
    "volunteer.client.gating", "volunteer.client.beam_search",
    "volunteer.client.averaging.optimizer", "volunteer.client.averaging.swarm_group",
    "volunteer.client.averaging.averager", "volunteer.client.averaging.methods",
    "volunteer.client.averaging.group", "volunteer.client.averaging.local_group",
    "volunteer.client.averaging.membership", "volunteer.client.averaging.consensus",
]
# Exported by volunteer.client but documented in files this test's author does not own; listed
# so that the test still fails on any *new* gap there. Empty this set once they are documented.
PENDING_ELSEWHERE: set[str] = set()


def _named_params(fn: Any, skip_self: bool) -> list[str]:
    params = list(inspect.signature(fn).parameters.values())[1 if skip_self else 0:]
    return [p.name for p in params if p.kind not in (p.VAR_POSITIONAL, p.VAR_KEYWORD)]


def _mentions(text: str, name: str) -> bool:
    return re.search(rf"\b{re.escape(name)}\b", text) is not None


def problems(name: str, obj: Any) -> list[str]:
    """What is undocumented about the public class or function ``obj``."""
    out = []
    if not (obj.__doc__ or "").strip():
        out.append(f"{name}: no docstring")
    if inspect.isclass(obj):
        init = obj.__dict__.get("__init__")
        text = (obj.__doc__ or "") + ((init.__doc__ or "") if init is not None else "")
        if init is not None:
            out += [f"{name}: parameter {p}" for p in _named_params(init, True) if not _mentions(text, p)]
        for attr, member in obj.__dict__.items():
            if attr.startswith("_"):
                continue
            fn = member.fget if isinstance(member, property) else getattr(member, "__func__", member)
            if (inspect.isfunction(fn) or isinstance(member, property)) and not (fn.__doc__ or "").strip():
                out.append(f"{name}.{attr}: no docstring")
    elif inspect.isfunction(obj):
        text = obj.__doc__ or ""
        out += [f"{name}: parameter {p}" for p in _named_params(obj, False) if not _mentions(text, p)]
    return out


def _public(module: Any) -> list[tuple[str, Any]]:
    names = getattr(module, "__all__", None) or [n for n in vars(module) if not n.startswith("_")]
    out = []
    for n in names:
        obj = getattr(module, n)
        if (inspect.isclass(obj) or inspect.isfunction(obj)) and obj.__module__ == module.__name__:
            out.append((n, obj))
    return out


def test_the_package_exports_are_documented() -> None:
    found = []
    for n in volunteer.client.__all__:
        found += problems(n, getattr(volunteer.client, n))
    assert not set(found) - PENDING_ELSEWHERE
    assert len(volunteer.client.__all__) >= 9  # the lazy exports resolved (nothing silently skipped)


@pytest.mark.parametrize("module_name", MODULES)
def test_public_classes_and_functions_of_trainer_modules_are_documented(module_name: str) -> None:
    module = importlib.import_module(module_name)
    assert (module.__doc__ or "").strip()
    public = _public(module)
    assert public, module_name
    found = [p for n, obj in public for p in problems(n, obj)]
    assert found == []


def test_the_key_arguments_say_when_to_change_them() -> None:
    """The arguments a researcher tunes first are explained with advice, not just named."""
    from volunteer.client.moe import RemoteMixtureOfExperts
    from volunteer.client.node import ClientNode

    doc = RemoteMixtureOfExperts.__doc__ or ""
    for arg in ("k_best", "k_min", "timeout_after_k_min", "beam_size", "compression", "forward_timeout"):
        entry = re.search(rf"^\s+{arg}: (.+?)(?=^\s+\w+: |\Z)", doc, re.M | re.S)
        assert entry and len(entry.group(1)) > 80, arg
    assert "bootstrap" in (ClientNode.__doc__ or "") and "when" in (ClientNode.__doc__ or "").lower()


def test_the_checker_catches_a_gap() -> None:
    class Undocumented:
        def __init__(self, speed: int) -> None:
            self.speed = speed

        def run(self) -> None:
            pass

    assert problems("U", Undocumented) == ["U: no docstring", "U: parameter speed", "U.run: no docstring"]
