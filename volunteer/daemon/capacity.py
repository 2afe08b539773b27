"""How many experts this node can host: ``num_experts``, bounded by the grid and by memory.

``expert_state_bytes(manifest)`` sizes one expert's state without allocating it (the module is
built on torch's ``meta`` device): weights plus the optimizer's per-parameter buffers (Adam
keeps two moments, SGD with momentum one). ``host_capacity(...)`` turns the node's memory
budget into a slot count, so a volunteer that sets ``num_experts`` high on a small machine
takes what fits instead of failing later; the reason is shown in ``status``:

- GPU: ``max_gpu_memory_fraction`` of the device's memory;
- CPU: ``CPU_RAM_SHARE`` of the machine's RAM (the rest stays with the user's own programs);
- each expert is budgeted ``HEADROOM`` times its state (activations, the activation cache,
  a shard snapshot being encoded, a download being decoded).
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

CPU_RAM_SHARE = 0.5
HEADROOM = 3.0


def expert_state_bytes(manifest: Any) -> int:
    """Bytes of one expert's weights and optimizer state (fp32), computed on the meta device."""
    import torch

    from volunteer.experts.registry import build_expert

    with torch.device("meta"):
        module = build_expert(manifest.expert.kind, manifest.expert.hidden_dim, **manifest.expert.options)
    params = sum(p.numel() for p in module.parameters() if p.requires_grad)
    opt = manifest.optimizer
    buffers = 2 if opt.name == "adam" else (1 if opt.momentum > 0 else 0)
    return 4 * params * (1 + buffers)


def host_capacity(num_experts: int, grid_size: int, state_bytes: int, device: str | Sequence[str],
                  hardware: Any, gpu_fraction: float) -> tuple[int, str]:
    """(slots, why): how many experts to host and what bounds it (pure). ``device``: one device
    or the node's list (several GPUs: each holds what fits in its own memory)."""
    devices = [device] if isinstance(device, str) else list(device)
    per_expert = max(1.0, state_bytes * HEADROOM)
    gpus = [_gpu(d, hardware) for d in devices if d.startswith("cuda") and hardware.gpus]
    if gpus:
        fits = max(1, sum(int(g.memory_bytes * gpu_fraction // per_expert) for g in gpus))
        where = f"{gpu_fraction:.0%} of the GPU's memory" if len(gpus) == 1 else (
            f"{gpu_fraction:.0%} of the memory of {len(gpus)} GPUs")
    else:
        budget, where = hardware.ram_bytes * CPU_RAM_SHARE, f"{CPU_RAM_SHARE:.0%} of the RAM"
        fits = max(1, int(budget // per_expert))
    slots = min(num_experts, grid_size, fits)
    if slots == num_experts:
        return slots, f"num_experts={num_experts}"
    if slots == grid_size:
        return slots, f"the grid has {grid_size} expert(s)"
    return slots, (f"memory: {fits} expert(s) of {state_bytes / 2**20:.1f} MiB state fit in {where} "
                   f"(num_experts={num_experts})")


def _gpu(device: str, hardware: Any) -> Any:
    """The detected GPU behind ``cuda`` / ``cuda:N`` (the first one if the index is unknown)."""
    index = int(device.split(":")[1]) if ":" in device else 0
    return next((g for g in hardware.gpus if g.index == index), hardware.gpus[0])
