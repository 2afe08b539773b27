"""Plug-in expert kinds: a real distribution (tests/fixtures/volunteer_experts_scaled, built and
installed with pip into a temporary folder) registers the kind ``scaled`` in the
``volunteer.experts`` entry point group; a real daemon serves it to the real client; a node
without it names the package to install; a manifest never makes a machine import anything."""

from __future__ import annotations

import shutil
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import pytest
import torch
import yaml

from tests.conftest import DaemonFactory, cli_env
from volunteer.daemon.control_client import call
from volunteer.experts.registry import (
    available_experts,
    build_expert,
    kind_provider,
    require_expert_kind,
)
from volunteer.manifest import ManifestError

FIXTURE = Path(__file__).resolve().parents[1] / "fixtures" / "volunteer_experts_scaled"
DIST = "volunteer-experts-scaled"


@pytest.fixture(scope="module")
def plugin_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The fixture distribution installed with pip (from a copy: pip builds in the source tree)."""
    root = tmp_path_factory.mktemp("plugin")
    src = root / "src"
    shutil.copytree(FIXTURE, src)
    target = root / "site"
    subprocess.run([sys.executable, "-m", "pip", "install", "--quiet", "--no-deps", "--no-build-isolation",
                    "--no-index", "--target", str(target), str(src)], check=True, timeout=120,
                   capture_output=True)
    assert (target / "volunteer_experts_scaled" / "__init__.py").is_file()
    return target


@pytest.fixture
def installed(plugin_dir: Path, monkeypatch: pytest.MonkeyPatch) -> Iterator[Path]:
    monkeypatch.syspath_prepend(str(plugin_dir))
    yield plugin_dir
    sys.modules.pop("volunteer_experts_scaled", None)


def test_installed_plugin_kind_is_listed_and_built(installed: Path) -> None:
    assert "scaled" in available_experts() and {"ffn", "nop", "transformer"} <= set(available_experts())
    assert kind_provider("scaled") == DIST and kind_provider("ffn") is None
    require_expert_kind("scaled", None, "m.yaml")  # installed: no error
    module = build_expert("scaled", 4, factor=2.0)
    assert module.input_shapes == [(4,)]
    assert torch.equal(module(torch.ones(2, 4)), torch.full((2, 4), 2.0))
    with pytest.raises(ValueError, match="bad options for expert kind 'scaled'"):
        build_expert("scaled", 4, colour="blue")


def test_missing_kind_names_the_package_in_one_line() -> None:
    assert "scaled" not in available_experts()  # not on sys.path here
    with pytest.raises(ManifestError) as err:
        require_expert_kind("scaled", DIST, "lm.yaml")
    msg = str(err.value)
    assert err.value.key_path == "expert.kind" and "\n" not in msg
    assert msg.startswith("lm.yaml: expert.kind: expert kind 'scaled' is not installed on this machine; ")
    assert f"`pip install {DIST}`" in msg and "installed kinds: ffn, nop, transformer" in msg
    with pytest.raises(ManifestError, match=r"does not name one in expert\.package"):
        require_expert_kind("scaled", None, "lm.yaml")
    with pytest.raises(ValueError, match="unknown expert kind 'scaled'"):
        build_expert("scaled", 4)


def test_a_manifest_never_imports_a_module_by_its_kind(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """An importable module whose name is a valid kind is not an entry point: never imported."""
    marker = tmp_path / "imported"
    (tmp_path / "volunteer_sneaky_kind.py").write_text(f"open({str(marker)!r}, 'w').close()\n")
    monkeypatch.syspath_prepend(str(tmp_path))
    with pytest.raises(ManifestError, match="not installed on this machine"):
        require_expert_kind("volunteer_sneaky_kind", "volunteer-sneaky", "m.yaml")
    with pytest.raises(ValueError, match="unknown expert kind"):
        build_expert("volunteer_sneaky_kind", 4)
    assert not marker.exists() and "volunteer_sneaky_kind" not in sys.modules


def test_plugin_cannot_shadow_a_builtin_kind(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """A distribution that registers ``ffn`` is ignored (and never imported)."""
    marker = tmp_path / "imported"
    (tmp_path / "evil_ffn.py").write_text(f"open({str(marker)!r}, 'w').close()\nclass E: pass\n")
    info = tmp_path / "evil_ffn-1.0.dist-info"
    info.mkdir()
    (info / "METADATA").write_text("Metadata-Version: 2.1\nName: evil-ffn\nVersion: 1.0\n")
    (info / "entry_points.txt").write_text("[volunteer.experts]\nffn = evil_ffn:E\n")
    monkeypatch.syspath_prepend(str(tmp_path))
    assert type(build_expert("ffn", 4)).__name__ == "FeedForwardExpert"
    assert kind_provider("ffn") is None and not marker.exists()


def _manifest(tmp_path: Path) -> Path:
    path = tmp_path / "scaled.yaml"
    path.write_text(yaml.safe_dump({
        "experiment": {"name": "plugin-exp", "version": "1"},
        "expert": {"kind": "scaled", "hidden_dim": 8, "options": {"factor": 3.0}, "package": DIST},
        "grid": {"prefix": "plug.scaled", "dims": [2]},
    }))
    return path


@pytest.mark.integration
@pytest.mark.timeout(120)
def test_daemon_serves_a_plugin_kind_to_the_real_client(
        tmp_path: Path, plugin_dir: Path, volunteer_daemon: DaemonFactory) -> None:
    from volunteer.client.remote_expert import RemoteExpert

    manifest = _manifest(tmp_path)
    env = cli_env(PYTHONPATH=str(plugin_dir))
    home = tmp_path / "home"
    daemon = volunteer_daemon.start(home, "--num-experts", "1", experiment=str(manifest), env=env)
    uids = sorted(call(home, "status")["experts"])
    assert len(uids) == 1 and uids[0].startswith("plug.scaled.")
    expert = RemoteExpert(uids[0], daemon.endpoint, timeout=20)
    try:
        x = torch.ones(5, 8)
        assert torch.equal(expert(x).detach(), torch.full((5, 8), 3.0))  # the plug-in's code answered
    finally:
        expert.transport.close()


def test_manifest_check_says_whether_the_kind_is_installed(tmp_path: Path, plugin_dir: Path) -> None:
    manifest = str(_manifest(tmp_path))

    def check(env: dict[str, str]) -> str:
        out = subprocess.run([sys.executable, "-m", "volunteer", "manifest", "check", manifest], env=env,
                             capture_output=True, text=True, timeout=60, stdin=subprocess.DEVNULL)
        assert out.returncode == 0, out.stderr
        return out.stdout

    assert f"scaled hidden_dim=8 options={{\"factor\": 3.0}} (not installed here: pip install {DIST})" in check(
        cli_env())
    assert "(installed here)" in check(cli_env(PYTHONPATH=str(plugin_dir)))


def test_join_without_the_kind_exits_2_naming_the_package(tmp_path: Path) -> None:
    """A real `volunteer join` of a manifest whose kind is not installed: one line, exit 2, no daemon."""
    out = subprocess.run([sys.executable, "-m", "volunteer", "join", str(_manifest(tmp_path)),
                          "--home", str(tmp_path / "home"), "--set", "network_enabled=false"],
                         env=cli_env(), capture_output=True, text=True, timeout=60, stdin=subprocess.DEVNULL)
    assert out.returncode == 2, out.stderr
    lines = [ln for ln in out.stderr.splitlines() if ln.strip()]
    assert len(lines) == 1 and f"pip install {DIST}" in lines[0], out.stderr
    assert not (tmp_path / "home" / "run").exists() or not any((tmp_path / "home" / "run").iterdir())
