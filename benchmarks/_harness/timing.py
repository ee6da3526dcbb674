"""Timing and memory: rounds that alternate contenders, back-to-back steps, peak memory."""

from __future__ import annotations

import time
from collections.abc import Callable
from pathlib import Path
from typing import Any


def emit(key: str, value: Any) -> None:
    """Print one ``key=value`` result line (floats with 6 significant digits)."""
    print(f"{key}={value:.6g}" if isinstance(value, float) else f"{key}={value}", flush=True)


def sync(device: Any) -> None:
    """Wait for a CUDA device (a no-op on the CPU)."""
    import torch

    if device.type == "cuda":
        torch.cuda.synchronize(device)


def timed_rounds(
    fns: dict[str, Callable[[], Any]], rounds: int, device: Any
) -> dict[str, list[float]]:
    """Run every function once per round, in turn, and return each one's seconds per call.

    Alternating rounds let a change in machine load move every contender alike.
    """
    times: dict[str, list[float]] = {name: [] for name in fns}
    for _ in range(rounds):
        for name, fn in fns.items():
            sync(device)
            t0 = time.perf_counter()
            fn()
            sync(device)
            times[name].append(time.perf_counter() - t0)
    return times


def pipelined_step_s(step: Callable[[], Any], steps: int, device: Any) -> float:
    """Seconds per step, ``steps`` back to back, waiting for the device only at the end (as a
    training loop runs), after one untimed step."""
    step()
    sync(device)
    t0 = time.perf_counter()
    for _ in range(steps):
        step()
    sync(device)
    return (time.perf_counter() - t0) / steps


class MemoryMeter:
    """Peak memory of a phase, above a baseline taken before anything of a contender exists.

    CPU: the process's peak resident set (``VmHWM``), reset through ``/proc/self/clear_refs``.
    CUDA: the allocator's ``max_memory_allocated``.
    """

    def __init__(self, device: Any) -> None:
        self.device = device
        self.baseline = self._current()

    def _current(self) -> float:
        import torch

        if self.device.type == "cuda":
            return torch.cuda.memory_allocated(self.device) / 2**20
        return _proc_status_mb("VmRSS")

    def reset(self) -> None:
        import torch

        if self.device.type == "cuda":
            torch.cuda.reset_peak_memory_stats(self.device)
        else:
            Path("/proc/self/clear_refs").write_text("5")

    def peak_mb(self) -> float:
        import torch

        if self.device.type == "cuda":
            peak = torch.cuda.max_memory_allocated(self.device) / 2**20
        else:
            peak = _proc_status_mb("VmHWM")
        return peak - self.baseline


def _proc_status_mb(key: str) -> float:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith(key + ":"):
            return int(line.split()[1]) / 1024  # kB -> MiB
    raise RuntimeError(f"{key} missing from /proc/self/status (memory needs Linux)")


def measure_peak(meter: MemoryMeter, step: Callable[[], Any], device: Any, n: int = 2) -> float:
    """Peak MiB of ``n`` calls of ``step`` above ``meter``'s baseline."""
    meter.reset()
    for _ in range(n):
        step()
    sync(device)
    return meter.peak_mb()
