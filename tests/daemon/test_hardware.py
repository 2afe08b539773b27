"""Hardware detection and the device choice rules."""

from __future__ import annotations

import pytest

from volunteer.daemon.hardware import (
    DeviceError,
    GpuInfo,
    HardwareInfo,
    choose_device,
    describe_device,
    detect_hardware,
)


def hw(gpus: int = 0, mps: bool = False) -> HardwareInfo:
    return HardwareInfo("cpu-model", 8, 4, 16 * 2**30, "linux", "3.11", "2.x", "12.1" if gpus else None,
                        [GpuInfo(i, f"GPU{i}", (i + 1) * 2**30, "8.0", 10) for i in range(gpus)], mps)


def test_detect_hardware_reports_this_machine() -> None:
    info = detect_hardware()
    assert info.cpu_logical >= 1 and info.ram_bytes > 0
    assert choose_device("auto", info) in ("cpu", "mps") or choose_device("auto", info).startswith("cuda:")
    assert "cpu" in describe_device("cpu", info)


def test_auto_prefers_largest_gpu_then_mps_then_cpu() -> None:
    assert choose_device("auto", hw(gpus=2)) == "cuda:1"
    assert choose_device("auto", hw(mps=True)) == "mps"
    assert choose_device("auto", hw()) == "cpu"
    assert choose_device("CUDA", hw(gpus=1)) == "cuda:0"
    assert choose_device("cuda:1", hw(gpus=2)) == "cuda:1"
    assert "GPU1" in describe_device("cuda:1", hw(gpus=2))


@pytest.mark.parametrize(
    ("requested", "machine", "fragment"),
    [("cuda", hw(), "no CUDA GPU"), ("cuda:3", hw(gpus=2), "only cuda:0..cuda:1"),
     ("mps", hw(), "MPS is not available"), ("tpu", hw(), "unknown device")],
)
def test_unavailable_devices_explain_themselves(requested: str, machine: HardwareInfo, fragment: str) -> None:
    with pytest.raises(DeviceError, match=fragment):
        choose_device(requested, machine)
