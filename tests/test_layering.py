"""The import direction the architecture promises, checked on the source (not by convention).

``volunteer.net`` never imports ``volunteer.client`` (the trainer's side builds on the
network layer, not the other way round), and ``volunteer.client`` never imports server code
(``daemon``, ``runtime``, ``experts``, ``cli``, ``status``): a trainer installs and runs the
client library without the daemon's machinery.
"""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

PACKAGE = Path(__file__).resolve().parents[1] / "volunteer"
SERVER_PACKAGES = ("daemon", "runtime", "experts", "cli", "status")


def _imports(path: Path) -> list[str]:
    """Every absolute module name ``path`` imports (top level, in functions, under TYPE_CHECKING)."""
    names: list[str] = []
    for node in ast.walk(ast.parse(path.read_text(), filename=str(path))):
        if isinstance(node, ast.Import):
            names.extend(alias.name for alias in node.names)
        elif isinstance(node, ast.ImportFrom) and node.level == 0 and node.module:
            names.append(node.module)
    return names


def _offenders(package: str, forbidden: tuple[str, ...]) -> list[str]:
    out = []
    for path in sorted((PACKAGE / package).rglob("*.py")):
        for name in _imports(path):
            if any(name == f"volunteer.{f}" or name.startswith(f"volunteer.{f}.") for f in forbidden):
                out.append(f"{path.relative_to(PACKAGE.parent)} imports {name}")
    return out


def test_net_never_imports_client() -> None:
    assert _offenders("net", ("client",)) == []


@pytest.mark.parametrize("package", ["client", "wire"])
def test_client_side_never_imports_server_code(package: str) -> None:
    assert _offenders(package, SERVER_PACKAGES) == []


def test_the_scan_sees_imports(tmp_path: Path) -> None:
    """The checker itself: a function-level import is found (a scan that sees nothing passes)."""
    sample = tmp_path / "m.py"
    sample.write_text("def f():\n    from volunteer.client.node import ClientNode\n")
    assert _imports(sample) == ["volunteer.client.node"]
