"""``volunteer info``: the hardware torch and psutil see, and the device a join would use."""

from __future__ import annotations

import json
import os
import sys
from pathlib import Path
from typing import Optional

import typer

from volunteer.cli.console import domain_errors


def info(
    home: Optional[Path] = typer.Option(None, "--home", envvar="VOLUNTEER_HOME", show_envvar=True,
                                        help="Node home whose settings pick the device."),
    device: Optional[str] = typer.Option(None, "--device", help="Device to check instead of the setting."),
    as_json: bool = typer.Option(False, "--json", help="Print machine-readable JSON."),
) -> None:
    """Show GPUs (name, memory, compute capability), CPU, RAM, versions and the device choice."""
    from volunteer.daemon.hardware import choose_devices, describe_device, detect_hardware
    from volunteer.daemon.home import NodeHome, resolve_home
    from volunteer.daemon.settings import resolve_settings

    with domain_errors():
        node = NodeHome(resolve_home(home))
        settings = resolve_settings(node.config_file, os.environ, {"device": device})
        hw = detect_hardware()
        devices = choose_devices(settings.device, hw)
        chosen = devices[0]
        cached = _cached_selfbench(node.cache_dir / "selfbench.json")
    if as_json:
        doc = {"hardware": hw.as_dict(), "device": chosen, "devices": devices,
               "device_description": " + ".join(describe_device(d, hw) for d in devices),
               "device_setting": settings.device, "home": str(node.root), "selfbench_cache": cached}
        sys.stdout.write(json.dumps(doc, indent=2, sort_keys=True) + "\n")
        return
    lines = [
        f"cpu      {hw.cpu_model} ({hw.cpu_logical} threads, {hw.cpu_physical or '?'} cores)",
        f"ram      {hw.ram_bytes / 2**30:.1f} GiB",
    ]
    if hw.gpus:
        for g in hw.gpus:
            lines.append(f"gpu {g.index}    {g.name}, {g.memory_bytes / 2**30:.1f} GiB, compute capability "
                         f"{g.compute_capability}, {g.multiprocessors} SMs")
    else:
        lines.append("gpu      none visible to torch" + (" (MPS available)" if hw.mps else ""))
    lines += [
        f"software python {hw.python}, torch {hw.torch} (cuda {hw.cuda or 'not built in'}), {hw.platform}",
        f"device   {' + '.join(describe_device(d, hw) for d in devices)}  "
        f"[setting device={settings.device} from {settings.source('device')}]",
        f"home     {node.root}",
    ]
    for key, entry in cached.items():
        lines.append(f"bench    {key}: {entry.get('train_samples_per_s', '?')} train samples/s")
    print("\n".join(lines))


def _cached_selfbench(path: Path) -> dict:
    from volunteer.experts.selfbench import read_cache

    return read_cache(path)
