"""Peak memory of a training step: expander SAE against the dense TopK SAE of the same m, n.

Each configuration runs in its own subprocess. After building the SAE and its optimizer, the
child hands freed memory back to the kernel (glibc ``malloc_trim``), resets the kernel's
resident-memory high-water mark (``/proc/self/clear_refs``), runs a few training steps, and
reports ``VmHWM`` minus the resident memory it had after importing everything (torch,
lightning, the plugins): parameters, gradients, Adam state and activations, none of the build
step's temporaries.

A step mirrors ``SAEModule.training_step`` plus the optimizer hooks without Lightning: forward,
squared-error reconstruction + the sparsity plugin's auxiliary (AuxK) term, backward, the
decoder's gradient hook, fused Adam, the decoder's constraint hook.

    python benchmarks/expander_memory.py                      # m=2048, n=65536, d=8, k=32
    python benchmarks/expander_memory.py --batch 256 1024 4096 16384

Linux with glibc only (reads /proc, calls ``malloc_trim``). The dense SAE at the default shape
needs about 5 GiB free. The last lines print each ratio as
``memory_ratio_batch<B>=<dense peak / expander peak>``.
"""

from __future__ import annotations

import argparse
import ctypes
import gc
import json
import re
import subprocess
import sys
from pathlib import Path


def _status_kib(field: str) -> int:
    return int(re.search(rf"{field}:\s+(\d+)", Path("/proc/self/status").read_text()).group(1))


def child(kind: str, m: int, n: int, d: int, k: int, batch: int, steps: int) -> dict:
    """Build one SAE, run ``steps`` training steps, return its peak memory in MiB."""
    import torch
    from expander_common import train_step  # before the baseline, like torch and lightning

    from sae_lightning.sae import SparseAutoencoder

    if kind == "dense":
        specs = ({"name": "linear"}, {"name": "linear"}, {"name": "topk", "k": k})
    else:
        specs = (
            {"name": "expander", "d": d},
            {"name": "expander"},
            {"name": "signed_topk", "k": k},
        )
    tiny = SparseAutoencoder(16, 64, *specs[:2], {**specs[2], "k": 4})  # import every plugin
    tiny.run(torch.randn(8, 16)).x_hat.sum().backward()
    del tiny
    gc.collect()
    ctypes.CDLL("libc.so.6").malloc_trim(0)
    baseline = _status_kib("VmRSS")  # the interpreter, torch, lightning and the plugins
    torch.manual_seed(0)
    sae = SparseAutoencoder(m, n, *specs)
    opt = torch.optim.Adam(sae.parameters(), lr=1e-4, fused=True)
    x = torch.randn(batch, m)
    dead = torch.zeros(n, dtype=torch.bool)
    dead[: n // 100] = True  # 1% dead latents, so AuxK does its work
    state_bytes = sum(t.numel() * t.element_size() for t in sae.state_dict().values())
    gc.collect()
    ctypes.CDLL("libc.so.6").malloc_trim(0)  # hand freed build temporaries back to the kernel
    Path("/proc/self/clear_refs").write_text("5")  # reset VmHWM: build temporaries excluded
    for _ in range(steps):
        train_step(sae, x, opt, dead)
    return {
        "kind": kind,
        "batch": batch,
        "peak_mib": (_status_kib("VmHWM") - baseline) / 1024,
        "state_mib": state_bytes / 2**20,
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--d-in", type=int, default=2048, help="m")
    parser.add_argument("--d-sae", type=int, default=65536, help="n")
    parser.add_argument("--d", type=int, default=8, help="expander degree")
    parser.add_argument("--k", type=int, default=32)
    parser.add_argument("--batch", type=int, nargs="+", default=[256, 1024, 4096])
    parser.add_argument("--steps", type=int, default=2)
    parser.add_argument("--child", nargs=2, metavar=("KIND", "BATCH"), help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.child:
        kind, batch = args.child
        result = child(kind, args.d_in, args.d_sae, args.d, args.k, int(batch), args.steps)
        print(json.dumps(result))
        return

    print(f"m={args.d_in} n={args.d_sae} d={args.d} k={args.k} steps={args.steps}")
    print(
        "| batch | dense peak (MiB) | expander peak (MiB) | ratio | dense / expander state (MiB) |"
    )
    print("|---|---|---|---|---|")
    shape = ["--d-in", str(args.d_in), "--d-sae", str(args.d_sae), "--d", str(args.d)]
    shape += ["--k", str(args.k), "--steps", str(args.steps)]
    ratios = {}
    for batch in args.batch:
        res = {}
        for kind in ("dense", "expander"):
            cmd = [sys.executable, __file__, *shape, "--child", kind, str(batch)]
            out = subprocess.run(cmd, capture_output=True, text=True, check=True).stdout
            res[kind] = json.loads(out.strip().splitlines()[-1])
        dense, exp = res["dense"], res["expander"]
        print(
            f"| {batch} | {dense['peak_mib']:,.0f} | {exp['peak_mib']:,.0f} | "
            f"{dense['peak_mib'] / exp['peak_mib']:.1f}x | "
            f"{dense['state_mib']:,.1f} / {exp['state_mib']:,.1f} |",
            flush=True,
        )
        ratios[batch] = dense["peak_mib"] / exp["peak_mib"]
    print()
    for batch, ratio in ratios.items():
        print(f"memory_ratio_batch{batch}={ratio:.1f}")


if __name__ == "__main__":
    main()
