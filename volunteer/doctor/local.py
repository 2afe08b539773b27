"""Checks of this machine alone: Python / torch / CUDA and the device, the expert kind the
manifest names, the home, free disk.

Each function returns ``Check`` objects (``volunteer.doctor.report``) and never raises for a
problem it was written to find: a device that does not exist, a home that is a file or not
writable, an identity key others can read or replace, a disk too full for the shard cache.
They touch nothing outside a probe file they remove again, so running the doctor next to a
live daemon is safe.
"""

from __future__ import annotations

import os
import shutil
import stat
import sys
import tempfile
from pathlib import Path
from typing import Any

from volunteer.doctor.report import Check, failed, ok, warn

MIN_PYTHON = (3, 10)
MIN_FREE_BYTES = 256 * 2**20  # checkpoints + one shard download need at least this much
IDENTITY_FILE = ("identity", "identity.key")  # volunteer.net.host: <home>/identity/identity.key


def check_software(device_setting: str) -> list[Check]:
    """Python version, torch (+ CUDA build) and the device(s) ``device_setting`` resolves to."""
    out: list[Check] = []
    py = ".".join(map(str, sys.version_info[:3]))
    if sys.version_info[:2] < MIN_PYTHON:
        out.append(failed("python", f"Python {py}", f"install Python {'.'.join(map(str, MIN_PYTHON))} or newer"))
    else:
        out.append(ok("python", f"Python {py}", version=py))
    try:
        from volunteer.daemon.hardware import (
            DeviceError,
            choose_devices,
            describe_device,
            detect_hardware,
        )

        hw = detect_hardware()
    except Exception as exc:  # torch missing or broken: nothing else here can run
        out.append(failed("torch", f"torch cannot be imported ({type(exc).__name__}: {exc})"[:300],
                          "install torch for this Python: pip install torch (see pytorch.org for CUDA builds)"))
        return out
    cuda = hw.cuda or "not built in"
    out.append(ok("torch", f"torch {hw.torch}, CUDA {cuda}, {len(hw.gpus)} GPU(s) visible",
                  torch=hw.torch, cuda=hw.cuda, gpus=[g.name for g in hw.gpus]))
    try:
        devices = choose_devices(device_setting, hw)
    except DeviceError as exc:
        out.append(failed("device", str(exc), "pick a device that exists: join --device auto (the "
                          "setting device; `volunteer settings` shows where it is set)"))
        return out
    text = " + ".join(describe_device(d, hw) for d in devices)
    data: dict[str, Any] = {"devices": devices, "setting": device_setting}
    if devices[0] == "cpu" and hw.cuda and not hw.gpus:
        out.append(warn("device", f"{text}: torch is built with CUDA {hw.cuda} but sees no GPU",
                        "check the NVIDIA driver (nvidia-smi) and CUDA_VISIBLE_DEVICES", **data))
    elif devices[0] == "cpu" and device_setting == "auto" and not hw.cuda and not hw.mps:
        out.append(ok("device", f"{text} (this torch has no CUDA; a CUDA build serves GPUs)", **data))
    else:
        out.append(ok("device", text, **data))
    return out


def check_expert_kind(kind: str, package: str | None, source: str) -> Check:
    """Can this machine host the manifest's ``expert.kind``? The check ``join`` runs
    (``experts.registry.require_expert_kind``, metadata only): its message's problem is the
    detail, its advice the fix, which is the install command for this interpreter when the
    manifest names the package (``expert.package``)."""
    from volunteer.experts.registry import available_experts, kind_provider, require_expert_kind
    from volunteer.manifest.errors import ManifestError

    try:
        require_expert_kind(kind, package, source)
    except ManifestError as exc:  # "<what is wrong>; <what to do> (installed kinds: ...)"
        problem, _, todo = exc.problem.partition("; ")
        command = f"{sys.executable} -m pip install {package}"
        fix = command if package and "not installed" in problem else todo or exc.problem
        return failed("expert kind", f"{problem} (manifest {source})", fix, kind=kind, package=package,
                      installed=available_experts())
    provider = kind_provider(kind)
    return ok("expert kind", f"{kind!r} is " + (f"installed (from {provider})" if provider else "built in"),
              kind=kind, package=provider)


def _nearest_existing(path: Path) -> Path:
    """``path`` or its closest ancestor that exists (what the daemon would create below)."""
    probe = path
    while not probe.exists() and probe != probe.parent:
        probe = probe.parent
    return probe


def _write_probe(directory: Path) -> str | None:
    """None when a file can be created (and removed) in ``directory``, else the reason."""
    try:
        fd, name = tempfile.mkstemp(prefix=".doctor-", dir=directory)
    except OSError as exc:
        return exc.strerror or str(exc)
    os.close(fd)
    try:
        os.unlink(name)
    except OSError:
        pass
    return None


def check_home(home: Path) -> list[Check]:
    """The home exists (or can be created), is a writable directory owned by this user, is
    not open to others, and its identity key (if any) is readable by its owner only."""
    out: list[Check] = []
    if home.exists() and not home.is_dir():
        return [failed("home", f"{home} is not a directory", "remove that file or pick another --home")]
    base = _nearest_existing(home)
    if not base.is_dir():
        return [failed("home", f"{home} cannot be created: {base} is a file, not a directory",
                       "pick another --home (or set VOLUNTEER_HOME)")]
    reason = _write_probe(base)
    if reason is not None:
        where = home if base == home else f"{base} (where {home} would be created)"
        return [failed("home", f"{where} is not writable: {reason}",
                       f"make it writable for this user (chown/chmod u+rwx {base}) or pick another --home")]
    if base != home:
        out.append(ok("home", f"{home} will be created (0700)", exists=False))
        return out
    st = home.stat()
    mine = getattr(os, "getuid", lambda: st.st_uid)()
    if st.st_uid != mine:
        out.append(failed("home", f"{home} is owned by uid {st.st_uid}, not by this user (uid {mine})",
                          f"run as its owner, or `chown -R $(id -u) {home}`, or pick another --home"))
    elif st.st_mode & 0o077:
        out.append(warn("home", f"{home} is writable by you, but open to others ({oct(st.st_mode & 0o777)})",
                        f"chmod 700 {home}", mode=oct(st.st_mode & 0o777)))
    else:
        out.append(ok("home", f"{home} is writable and private", mode=oct(st.st_mode & 0o777)))
    out.append(_check_identity(home.joinpath(*IDENTITY_FILE), mine))
    return out


def _check_identity(path: Path, uid: int) -> Check:
    try:
        st = path.stat()
    except FileNotFoundError:
        return ok("identity", "no identity key yet: the first join creates one (0600)")
    except OSError as exc:
        return failed("identity", f"{path}: {exc.strerror or exc}", f"fix the permissions of {path.parent}")
    mode = stat.S_IMODE(st.st_mode)
    if not stat.S_ISREG(st.st_mode):
        return failed("identity", f"{path} is not a regular file", "remove it: the next join creates a key")
    if mode & 0o022 or st.st_uid != uid:
        who = "others can replace it" if mode & 0o022 else f"it is owned by uid {st.st_uid}"
        return failed("identity", f"{path} ({oct(mode)}): {who}",
                      f"chown $(id -u) {path} && chmod 600 {path} (or delete it for a new identity)")
    if mode & 0o077:
        return failed("identity", f"{path} is readable by others ({oct(mode)}); the daemon refuses it",
                      f"chmod 600 {path}")
    return ok("identity", f"{path} is private (0600)")


def check_disk(home: Path, shard_cache_bytes: int) -> Check:
    """Free space where the home lives against the shard cache's cap (``shard_cache_bytes``)."""
    base = _nearest_existing(home)
    try:
        free = shutil.disk_usage(base).free
    except OSError as exc:
        return warn("disk", f"cannot tell the free space at {base}: {exc.strerror or exc}",
                    "check that the home's file system is mounted")
    data = {"free_bytes": free, "shard_cache_bytes": shard_cache_bytes}
    text = f"{_gib(free)} free at {base}; shard cache cap {_gib(shard_cache_bytes)}"
    if free < MIN_FREE_BYTES:
        return failed("disk", text, f"free at least {_gib(MIN_FREE_BYTES)} there or pick a --home on another disk",
                      **data)
    if free < shard_cache_bytes:
        return warn("disk", text, f"free space, or lower the cap: --set shard_cache_bytes={free // 2}", **data)
    return ok("disk", text, **data)


def _gib(n: int) -> str:
    return f"{n / 2**30:.1f} GiB" if n >= 2**30 else f"{n / 2**20:.0f} MiB"
