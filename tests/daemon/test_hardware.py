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


def test_device_lists_place_experts_across_every_named_gpu() -> None:
    from volunteer.daemon.hardware import choose_devices

    assert choose_devices("auto", hw(gpus=3)) == ["cuda:0", "cuda:1", "cuda:2"]  # every GPU
    assert choose_devices("auto", hw()) == ["cpu"] and choose_devices("auto", hw(mps=True)) == ["mps"]
    assert choose_devices("cuda:1", hw(gpus=2)) == ["cuda:1"]
    assert choose_devices(" cuda:2, cuda:0 ", hw(gpus=3)) == ["cuda:2", "cuda:0"]
    for bad, why in (("cuda:0,cuda:0", "twice"), ("cuda:0,cpu", "only name GPUs"),
                     ("cuda:0,cuda:5", "only cuda:0..cuda:1"), ("cuda:0,cuda:1", "no CUDA GPU")):
        machine = hw() if why == "no CUDA GPU" else hw(gpus=2)
        with pytest.raises(DeviceError, match=why):
            choose_devices(bad, machine)


def test_supervisor_places_each_new_expert_on_the_least_loaded_device() -> None:
    import gc
    import weakref

    from volunteer.daemon.supervisor import Supervisor

    sup = Supervisor.__new__(Supervisor)  # placement only: no home, manifest or runtime
    sup.devices = ["cuda:0", "cuda:1"]
    sup._placed = {d: weakref.WeakSet() for d in sup.devices}

    class Backend:  # stands in for an ExpertBackend (weakref-able)
        pass

    held = []
    for _ in range(5):
        b = Backend()
        sup._placed[sup.place()].add(b)
        held.append(b)
    assert [len(sup._placed[d]) for d in sup.devices] == [3, 2]
    del held[0], held[1]  # two experts leave cuda:0 (handed off, dropped)
    gc.collect()
    assert sup.place() == "cuda:0" and len(sup._placed["cuda:0"]) == 1
