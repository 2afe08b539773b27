"""How many experts a node hosts: num_experts, the grid, and what fits in memory."""

from __future__ import annotations

import dataclasses

from volunteer.daemon.capacity import HEADROOM, expert_state_bytes, host_capacity
from volunteer.daemon.hardware import GpuInfo, HardwareInfo
from volunteer.manifest import load_manifest

GiB = 2**30


def hardware(ram: int, gpus: list[GpuInfo] | None = None) -> HardwareInfo:
    return HardwareInfo("cpu", 2, 1, ram, "linux", "3.11", "2.13", None, gpus or [])


def test_state_bytes_count_weights_and_optimizer_buffers_without_allocating() -> None:
    m = load_manifest("demo")  # ffn h=64: 2*64*256 weights + 256 + 64 + 2*64 biases/norm = 33,216 params
    adam = expert_state_bytes(m)
    assert adam == 4 * 33216 * 3
    sgd = dataclasses.replace(m, optimizer=dataclasses.replace(m.optimizer, name="sgd", momentum=0.0))
    assert expert_state_bytes(sgd) == 4 * 33216
    big = dataclasses.replace(m, expert=dataclasses.replace(m.expert, hidden_dim=16384))  # 2.1 G params: meta only
    assert expert_state_bytes(big) == 4 * 3 * (8 * 16384**2 + 7 * 16384)  # 24 GiB, never allocated


def test_capacity_is_bounded_by_num_experts_grid_and_memory() -> None:
    assert host_capacity(4, 8, 1000, "cpu", hardware(16 * GiB), 0.9) == (4, "num_experts=4")
    assert host_capacity(16, 8, 1000, "cpu", hardware(16 * GiB), 0.9) == (8, "the grid has 8 expert(s)")
    state = GiB  # 1 GiB state, 3 GiB budget per expert; half of 16 GiB RAM fits 2
    slots, why = host_capacity(16, 64, state, "cpu", hardware(16 * GiB), 0.9)
    assert slots == int(8 * GiB // (state * HEADROOM)) == 2 and why.startswith("memory: 2 expert(s)")
    assert host_capacity(16, 64, 100 * GiB, "cpu", hardware(16 * GiB), 0.9)[0] == 1  # always at least one


def test_gpu_budget_uses_the_chosen_device_and_fraction() -> None:
    gpus = [GpuInfo(0, "small", 8 * GiB, "8.0", 10), GpuInfo(1, "big", 80 * GiB, "9.0", 100)]
    hw = hardware(16 * GiB, gpus)
    big = host_capacity(64, 1024, GiB, "cuda:1", hw, 0.75)
    assert big[0] == int(60 * GiB // (3 * GiB)) == 20 and "75% of the GPU" in big[1]
    assert host_capacity(64, 1024, GiB, "cuda:0", hw, 0.75)[0] == 2


def test_several_gpus_each_hold_what_fits_in_their_own_memory() -> None:
    hw = hardware(16 * GiB, [GpuInfo(0, "a", 8 * GiB, "8.0", 10), GpuInfo(1, "b", 80 * GiB, "9.0", 100)])
    one = host_capacity(64, 1024, GiB, ["cuda:1"], hw, 0.75)[0]
    both, why = host_capacity(64, 1024, GiB, ["cuda:0", "cuda:1"], hw, 0.75)
    assert one == 20 and both == 22 and "2 GPUs" in why
