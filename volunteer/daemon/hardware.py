"""Hardware detection and device choice.

GPUs (name, memory, compute capability) come from torch, CPU and RAM from psutil.
``choose_devices`` turns the ``device`` setting into the node's torch devices (``auto``: every
GPU; ``choose_device`` for one) with a one-line error when a requested device does not exist. ``live_usage`` samples the numbers
the status dashboard shows (CPU/RAM of the machine and this process, GPU memory/utilisation).
"""

from __future__ import annotations

import logging
import os
import platform
import re
from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from typing import Any

import psutil

log = logging.getLogger(__name__)


class DeviceError(Exception):
    """The requested device is not available; ``str(err)`` says what is."""


@dataclass(frozen=True)
class GpuInfo:
    index: int
    name: str
    memory_bytes: int
    compute_capability: str
    multiprocessors: int


@dataclass(frozen=True)
class HardwareInfo:
    cpu_model: str
    cpu_logical: int
    cpu_physical: int | None
    ram_bytes: int
    platform: str
    python: str
    torch: str
    cuda: str | None
    gpus: list[GpuInfo] = field(default_factory=list)
    mps: bool = False

    def as_dict(self) -> dict[str, Any]:
        return asdict(self)


def _cpu_model() -> str:
    try:
        with open("/proc/cpuinfo", encoding="utf-8", errors="replace") as fh:
            for line in fh:
                if line.startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def detect_hardware() -> HardwareInfo:
    """Probe CPUs, RAM and GPUs (imports torch)."""
    import torch

    gpus = []
    if torch.cuda.is_available():
        for i in range(torch.cuda.device_count()):
            p = torch.cuda.get_device_properties(i)
            gpus.append(GpuInfo(i, p.name, int(p.total_memory), f"{p.major}.{p.minor}", int(p.multi_processor_count)))
    mps = bool(getattr(torch.backends, "mps", None) and torch.backends.mps.is_available())
    return HardwareInfo(
        cpu_model=_cpu_model(),
        cpu_logical=psutil.cpu_count(logical=True) or os.cpu_count() or 1,
        cpu_physical=psutil.cpu_count(logical=False),
        ram_bytes=int(psutil.virtual_memory().total),
        platform=platform.platform(),
        python=platform.python_version(),
        torch=torch.__version__,
        cuda=torch.version.cuda,
        gpus=gpus,
        mps=mps,
    )


_CUDA_RE = re.compile(r"^cuda(?::(\d+))?$")


def choose_device(requested: str, hw: HardwareInfo) -> str:
    """Map the ``device`` setting to a torch device string, or raise ``DeviceError``."""
    req = requested.strip().lower()
    if req == "auto":
        if hw.gpus:
            return f"cuda:{max(hw.gpus, key=lambda g: g.memory_bytes).index}"
        return "mps" if hw.mps else "cpu"
    if req == "cpu":
        return "cpu"
    if req == "mps":
        if not hw.mps:
            raise DeviceError("device mps requested but Apple MPS is not available; use --device cpu")
        return "mps"
    m = _CUDA_RE.match(req)
    if m:
        if not hw.gpus:
            raise DeviceError(
                f"device {requested} requested but torch sees no CUDA GPU (torch {hw.torch}, "
                f"cuda {hw.cuda or 'not built in'}); use --device cpu"
            )
        index = int(m.group(1) or 0)
        if index >= len(hw.gpus):
            raise DeviceError(f"device {requested} requested but only cuda:0..cuda:{len(hw.gpus) - 1} exist")
        return f"cuda:{index}"
    raise DeviceError(f"unknown device {requested!r}: expected auto, cpu, cuda, cuda:N, "
                      "a list cuda:N,cuda:M or mps")


def choose_devices(requested: str, hw: HardwareInfo) -> list[str]:
    """The ``device`` setting as the list of torch devices the node computes on.

    ``auto`` takes every CUDA GPU torch sees (experts are placed across them), else MPS, else
    the CPU; a comma-separated list (``cuda:0,cuda:2``) names GPUs explicitly (each checked
    like a single one, duplicates refused, no mixing with ``cpu``/``mps``/``auto``); any other
    value is one device (``choose_device``).
    """
    req = requested.strip().lower()
    if req == "auto":
        return [f"cuda:{g.index}" for g in sorted(hw.gpus, key=lambda g: g.index)] or [
            choose_device("auto", hw)]
    if "," not in req:
        return [choose_device(req, hw)]
    parts = [p.strip() for p in req.split(",")]
    if not all(_CUDA_RE.match(p) for p in parts):
        raise DeviceError(f"device list {requested!r} may only name GPUs (cuda:N,cuda:M); "
                          "use auto for every GPU, or one device")
    devices = [choose_device(p, hw) for p in parts]
    if len(set(devices)) != len(devices):
        raise DeviceError(f"device list {requested!r} names a GPU twice")
    return devices


def describe_device(device: str, hw: HardwareInfo) -> str:
    """Human description such as ``cuda:0 (NVIDIA H100, 80.0 GiB, sm 9.0)``."""
    if device.startswith("cuda"):
        g = hw.gpus[int(device.split(":")[1])]
        return f"{device} ({g.name}, {g.memory_bytes / 2**30:.1f} GiB, compute capability {g.compute_capability})"
    if device == "mps":
        return "mps (Apple GPU)"
    return f"cpu ({hw.cpu_model}, {hw.cpu_logical} threads, {hw.ram_bytes / 2**30:.1f} GiB RAM)"


def usable_cpus() -> int:
    """Logical CPUs this process may run on (its affinity mask: honours taskset/cpusets)."""
    try:
        return max(1, len(os.sched_getaffinity(0)))
    except (AttributeError, OSError):  # no sched_getaffinity (macOS, Windows)
        return max(1, os.cpu_count() or 1)


def static_auto_threads(cpus: int) -> int:
    """``torch_threads = auto`` without a measurement: one logical CPU left to the IO threads
    (``max(1, cpus - 1)``).

    Never far off, where all CPUs can be: tiny experts (h=64) on a 2-core machine ran 4-20x
    slower at 2 threads than at 1 (intra-op workers meeting at a barrier stall whenever one
    shares a core with the IO threads, the clients or anything else the volunteer runs); at
    h=1024, 2 threads served about 1.2x faster on an idle 2-core machine (issue 11) and no
    faster on a busy one (scripts/bench_defaults.py). The measured choice (``choose``) takes
    that gain where the machine gives it.
    """
    return max(1, cpus - 1)


def gpu_auto_threads(cpus: int) -> int:
    """``torch_threads = auto`` on a GPU node: at most 2 intra-op threads.

    A GPU node's host work is per request (finiteness checks, casts, copies) and runs on
    several threads at once (frontend, serving loop, completer, autograd's device thread);
    every one of them that runs a parallel torch op gets its own pool of intra-op workers,
    and with torch's default (one per core) those pools spin against each other. On an H100
    node with 16 cores at torch's default, the frontend thread spent 43% of its time in a
    reduction that takes 30 us on one core, and the GPU was busy 11% of the time.
    """
    return max(1, min(2, cpus - 1))


def torch_threads_for(setting: int | str, cpus: int | None = None,
                      choose: Callable[[list[int]], int] | None = None,
                      device: str = "cpu") -> int:
    """The intra-op thread count for the ``torch_threads`` setting.

    An integer is used as given. ``"auto"`` with ``choose`` (the self-benchmark's
    ``cached_thread_choice`` behind a closure: it times one batch of serving work at each
    candidate count and returns the fewest threads within 5% of the fastest) takes its pick
    among ``candidate_threads(cpus)``; without it, or when it fails or answers out of range,
    the static rule ``static_auto_threads``. One usable CPU needs no measurement. On a GPU
    ``device`` auto is ``gpu_auto_threads`` (the device computes; nothing to measure).
    """
    if setting == "auto":
        from volunteer.experts.selfbench import candidate_threads

        n = usable_cpus() if cpus is None else max(1, int(cpus))
        if not device.startswith("cpu"):  # the device computes: see gpu_auto_threads
            return gpu_auto_threads(n)
        fallback = static_auto_threads(n)
        if choose is None or n == 1:
            return fallback
        try:
            picked = choose(candidate_threads(n))
        except Exception as exc:  # a failed measurement must not keep the node from serving
            log.warning("measuring torch threads failed (%s); using %d", exc, fallback)
            return fallback
        if isinstance(picked, bool) or not isinstance(picked, int) or not 1 <= picked <= n:
            log.warning("torch thread measurement answered %r; using %d", picked, fallback)
            return fallback
        return picked
    threads = int(setting)
    if threads < 1:
        raise ValueError(f"torch_threads must be auto or >= 1, got {setting!r}")
    return threads


def apply_torch_threads(setting: int | str, choose: Callable[[list[int]], int] | None = None,
                        device: str = "cpu") -> int:
    """Set torch's process-wide intra-op thread count (once, at daemon start); returns it.

    ``choose``: see ``torch_threads_for`` (used for ``auto`` only). Call it before the
    runtime's threads run their first torch op: each thread adopts the process value when it
    first uses the intra-op pool.
    """
    import torch

    threads = torch_threads_for(setting, choose=choose, device=device)
    torch.set_num_threads(threads)
    return int(torch.get_num_threads())


def configure_device(device: str, max_gpu_memory_fraction: float) -> None:
    """Apply memory limits from the settings before experts are built.

    Torch's thread count is the supervisor's call (``apply_torch_threads``), made once.
    """
    import torch

    if device.startswith("cuda"):
        torch.cuda.set_per_process_memory_fraction(max_gpu_memory_fraction, int(device.split(":")[1]))


def live_usage(device: str, process: psutil.Process) -> dict[str, Any]:
    """Current machine and device usage for the status snapshot (cheap, non-blocking)."""
    vm = psutil.virtual_memory()
    with process.oneshot():
        proc = {"cpu_pct": process.cpu_percent(None), "rss_bytes": int(process.memory_info().rss),
                "threads": process.num_threads()}
    usage: dict[str, Any] = {
        "system": {
            "cpu_pct": psutil.cpu_percent(None),
            "cpu_count": psutil.cpu_count() or 1,
            "ram_used_bytes": int(vm.total - vm.available),
            "ram_total_bytes": int(vm.total),
        },
        "process": proc,
        "device": {"name": device, "utilization_pct": None, "memory_used_bytes": None, "memory_total_bytes": None},
    }
    if device.startswith("cuda"):
        import torch

        index = int(device.split(":")[1])
        try:
            free, total = torch.cuda.mem_get_info(index)
            usage["device"]["memory_used_bytes"] = int(total - free)
            usage["device"]["memory_total_bytes"] = int(total)
        except RuntimeError:
            pass
        try:
            usage["device"]["utilization_pct"] = float(torch.cuda.utilization(index))
        except Exception:  # needs pynvml; absent on many installs
            pass
    elif device == "cpu":
        usage["device"]["utilization_pct"] = proc["cpu_pct"] / max(1, psutil.cpu_count() or 1)
        usage["device"]["memory_used_bytes"] = proc["rss_bytes"]
        usage["device"]["memory_total_bytes"] = int(vm.total)
    return usage
