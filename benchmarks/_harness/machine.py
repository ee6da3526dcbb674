"""The machine a result was measured on, as docs/performance.md names it."""

from __future__ import annotations

import os
import platform
from pathlib import Path
from typing import Any


def describe_machine(device: Any = None) -> dict[str, str]:
    """CPU model, cores, torch threads and version, the GPU (if used), the load average."""
    import torch

    cpu = platform.processor() or "unknown"
    cpuinfo = Path("/proc/cpuinfo")
    if cpuinfo.exists():
        for line in cpuinfo.read_text().splitlines():
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    found = {
        "cpu": cpu,
        "cpu_count": str(os.cpu_count()),
        "threads": str(torch.get_num_threads()),
        "torch": torch.__version__,
        "load_avg_1m": f"{os.getloadavg()[0]:.2f}" if hasattr(os, "getloadavg") else "n/a",
    }
    if device is not None and getattr(device, "type", None) == "cuda":
        found["gpu"] = torch.cuda.get_device_name(device)
    return found


def emit_machine(device: Any = None) -> None:
    """Print :func:`describe_machine` as ``machine_<key>=value`` lines."""
    for key, value in describe_machine(device).items():
        print(f"machine_{key}={value}", flush=True)
