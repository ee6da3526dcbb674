"""The expander kernels on a GPU: float64 equivalence on the device, then step time and memory.

1. The float64 comparison of ``tests/test_expander.py`` (compact SAE, fused path and dense-masked
   path, against a dense masked one, outputs and every gradient) and compact against dense OMP,
   run on the device.
2. Training-step time and peak allocated memory of the expander SAE against the dense TopK SAE,
   alternating in rounds: forward, MSE + AuxK (1% dead latents), backward, decoder hooks, fused
   Adam (the step of ``expander_memory.py``), float32.

    python benchmarks/expander_gpu.py                 # needs CUDA
    python benchmarks/expander_gpu.py --device cpu    # tiny shapes, to check that it runs
"""

from __future__ import annotations

import argparse
import statistics
import time

import torch
from expander_common import train_step
from sae_expander import encode_omp
from sae_expander.omp import omp_dense

from sae_lightning.sae import SparseAutoencoder


def build(kind: str, m: int, n: int, k: int, d: int, sparsity: dict | None = None):
    if kind == "dense":
        enc, dec = {"name": "linear"}, {"name": "linear"}
        spars = sparsity or {"name": "topk", "k": k}
    else:
        enc, dec = {"name": "expander", "d": d}, {"name": "expander"}
        spars = sparsity or {"name": "signed_topk", "k": k}
    return SparseAutoencoder(m, n, enc, dec, spars)


def check_float64(device: str) -> None:
    cases = [("signed_topk", False), ("signed_topk", True), ("relu", False), ("topk", False)]
    for name, probe in cases:
        torch.manual_seed(0)
        spec = {"name": name, "k": 5} if "topk" in name else {"name": name}
        sae = build("expander", 24, 96, 5, 4, spec).to(device, torch.float64)
        sae.fused = not probe  # the probe reads the dense pre-activations: the reference path
        with torch.no_grad():
            sae.encoder.b_enc.normal_(0, 0.1)
            sae.decoder.b_dec.normal_(0, 0.1)
        x = torch.randn(16, 24, dtype=torch.float64, device=device)
        probe_w = torch.randn(16, 96, dtype=torch.float64, device=device) * 1e-2

        def loss_of(x_hat, pre, probe=probe, probe_w=probe_w, x=x):
            loss = (x - x_hat).pow(2).sum()
            return loss + (probe_w * pre).sum() if probe else loss

        out = sae.run(x)
        grads = torch.autograd.grad(loss_of(out.x_hat, out.pre_acts), list(sae.parameters()))
        enc = sae.encoder
        v = torch.zeros(96, 24, dtype=x.dtype, device=device)
        v = v.scatter(1, enc.indices.long(), enc.values)
        w = v / v.norm(dim=1, keepdim=True)
        pre = (x - sae.decoder.b_dec) @ w.t() + enc.b_enc
        codes = sae.sparsity(pre, step=0, decoder=sae.decoder).codes.dense()
        x_hat = codes @ w + sae.decoder.b_dec
        ref = torch.autograd.grad(loss_of(x_hat, pre), list(sae.parameters()))
        diffs = [(out.x_hat - x_hat).abs().max()] + [
            (a - b).abs().max() for a, b in zip(grads, ref, strict=True)
        ]
        err = max(float(t.detach()) for t in diffs)
        verdict = "OK" if err < 1e-9 else "FAIL"
        print(f"float64 {name} probe={probe}: max abs diff {err:.2e} {verdict}")
    sae = build("expander", 32, 128, 6, 6).to(device, torch.float64)
    x = torch.randn(64, 32, dtype=torch.float64, device=device)
    compact = encode_omp(sae, x, 6)
    dense = omp_dense(sae.atoms(), sae.decoder.b_dec, x, 6)
    same = torch.equal(compact.indices, dense.indices)
    print(
        f"OMP compact == dense: same atoms {same}, max coefficient diff "
        f"{float((compact.values - dense.values).abs().max()):.1e}"
    )


def step_time(kind: str, shape: tuple[int, ...], device: str, steps: int) -> tuple[float, float]:
    m, n, k, d, batch = shape
    torch.manual_seed(0)
    sae = build(kind, m, n, k, d).to(device)
    opt = torch.optim.Adam(sae.parameters(), lr=1e-4, fused=True)
    x = torch.randn(batch, m, device=device)
    dead = torch.zeros(n, dtype=torch.bool, device=device)
    dead[: n // 100] = True
    cuda = device == "cuda"
    if cuda:
        torch.cuda.reset_peak_memory_stats()
    times = []
    for _ in range(steps + 3):
        if cuda:
            torch.cuda.synchronize()
        t0 = time.perf_counter()
        train_step(sae, x, opt, dead)
        if cuda:
            torch.cuda.synchronize()
        times.append(time.perf_counter() - t0)
    peak = torch.cuda.max_memory_allocated() / 2**20 if cuda else float("nan")
    del sae, opt, x
    if cuda:
        torch.cuda.empty_cache()
    return statistics.median(times[3:]), peak


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--device", default="cuda")
    parser.add_argument("--steps", type=int, default=10)
    parser.add_argument("--rounds", type=int, default=2)
    args = parser.parse_args()
    name = torch.cuda.get_device_name() if args.device == "cuda" else "cpu"
    print(f"device {name}, torch {torch.__version__}")
    check_float64(args.device)
    shapes = [(768, 16384, 32, 16, 4096), (768, 16384, 32, 16, 16384), (2048, 65536, 32, 8, 4096)]
    if args.device != "cuda":
        shapes = [(64, 512, 8, 8, 256)]
    for shape in shapes:
        runs: dict[str, list[tuple[float, float]]] = {"dense": [], "expander": []}
        for _ in range(args.rounds):
            for kind in runs:
                runs[kind].append(step_time(kind, shape, args.device, args.steps))
        t = {kind: statistics.median(s for s, _ in r) for kind, r in runs.items()}
        peak = {kind: max(p for _, p in r) for kind, r in runs.items()}
        m, n, k, d, batch = shape
        print(
            f"m={m} n={n} k={k} d={d} batch={batch}: "
            f"dense {t['dense'] * 1e3:.2f} ms ({batch / t['dense']:,.0f} tok/s, peak "
            f"{peak['dense']:,.0f} MiB) | expander {t['expander'] * 1e3:.2f} ms "
            f"({batch / t['expander']:,.0f} tok/s, peak {peak['expander']:,.0f} MiB) | "
            f"speed-up {t['dense'] / t['expander']:.2f}x, memory "
            f"{peak['dense'] / peak['expander']:.1f}x",
            flush=True,
        )


if __name__ == "__main__":
    main()
