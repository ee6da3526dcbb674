"""Time the project's training step against its floor, the encoder product alone.

One step is what ``SAEModule.training_step`` and the optimizer hooks do, without Lightning:
forward, reconstruction + penalty + auxiliary losses, dead-latent counters, backward, the
decoder's gradient projection, Adam (fused, as the module configures it) and the unit-norm
constraint. The floor is ``addmm(b_enc, x, W_enc.T)`` into a preallocated output, the one dense
product a TopK SAE cannot avoid. Both are timed in alternating rounds in one process, so a
change in machine load moves both; ``ratio_to_floor`` is the median of the per-round ratios.

    python benchmarks/train_step.py --plugin topk --d-in 768 --n-latents 16384 --k 32 \\
        --batch 4096 --steps 10 --threads 2 [--through-trainer] [--dense]
    python benchmarks/train_step.py --device cuda --dtype bf16 --peak-tflops 989

Prints ``key=value`` lines (the machine, ``tokens_per_s=``, ``peak_mem_mb=``, ...) and ends
with ``ratio_to_floor=<float>``. Times are medians over rounds; the ``best_*`` lines give the
fastest round of each, the least disturbed by other processes on a shared machine. The step,
the floor and the timing live in ``_harness`` (shared with ``peers.py`` and
``fit_throughput.py``).
"""

from __future__ import annotations

import argparse
import os
import statistics
import sys
import tempfile
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent))

from _harness import (  # the benchmark folder is not a package
    PRECISIONS,
    Floor,
    MemoryMeter,
    ProjectStep,
    add_shape_args,
    build_module,
    emit,
    emit_machine,
    make_batches,
    measure_peak,
    pipelined_step_s,
    setup_torch,
    sparsity_spec,
    sync,
    timed_rounds,
)


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    add_shape_args(p)
    p.add_argument("--plugin", default="topk", help="sparsity plugin: topk, batchtopk, relu, ...")
    p.add_argument(
        "--path",
        choices=["fused", "dense"],
        default="fused",
        help="fused: the sparse TopK path (when the plugin has one); dense: the reference path",
    )
    p.add_argument("--dense", action="store_true", help="also time the dense reference path")
    p.add_argument(
        "--through-trainer",
        action="store_true",
        help="also train through Lightning (runner.build_run, as the fit command builds it) on "
        "in-memory activations; fit_throughput.py times the fit command itself",
    )
    p.add_argument("--compile", action="store_true", help="torch.compile the forward + loss")
    p.add_argument(
        "--kernels",
        action="store_true",
        help="also time the alternatives for the selection and the sparse weight gradient",
    )
    p.add_argument(
        "--sync-report",
        action="store_true",
        help="CUDA: list where two bare steps and two trainer steps wait for the device",
    )
    p.add_argument(
        "--check",
        action="store_true",
        help="compare the fused and dense paths on this device (values, gradients, AuxK live)",
    )
    p.add_argument("--peak-tflops", type=float, default=None, help="device peak, for a fraction")
    return p.parse_args(argv)


# ---- through Lightning ------------------------------------------------------------------------


def trainer_tokens_per_s(
    args: argparse.Namespace,
    batches: list[Any],
    sync_report: bool = False,
) -> float:
    """Train through ``runner.build_run`` (as ``sae-lightning fit`` does) on in-memory batches.

    The run is the fit command's, unchanged (callbacks, TensorBoard logger, progress bar) but
    for the data, in memory, so that only the training loop is timed; validation and periodic
    checkpoints are pushed past the timed window. Tokens/s is measured between the end
    of step ``warmup`` and the end of the last step, waiting for the device only at those two
    points, so that a trainer whose host work overlaps the device's is not serialised by the
    measurement.

    Args:
        sync_report: on CUDA, print every host-device synchronisation of two steps.
    """
    import lightning.pytorch as pl
    from torch.utils.data import DataLoader, IterableDataset

    from sae_lightning.config import RecipeConfig
    from sae_lightning.runner import build_run

    device = batches[0].device
    total = args.warmup + args.steps + 1

    class Cycle(IterableDataset):
        def __iter__(self) -> Iterator[Any]:
            i = 0
            while True:
                yield batches[i % len(batches)]
                i += 1

    class InMemory(pl.LightningDataModule):
        def train_dataloader(self) -> DataLoader:
            return DataLoader(Cycle(), batch_size=None, num_workers=0)

    class Clock(pl.Callback):
        def __init__(self) -> None:
            self.stamps: list[float] = []
            self.report = SyncReport() if sync_report and device.type == "cuda" else None

        def on_train_batch_start(self, trainer: Any, *rest: Any) -> None:
            if self.report is not None and trainer.global_step == args.warmup:
                self.report.start()

        def on_train_batch_end(self, trainer: Any, *rest: Any) -> None:
            if self.report is not None and trainer.global_step == args.warmup + 2:
                self.report.stop()  # two whole steps, callbacks before this one included
            if trainer.global_step in (args.warmup + 1, total):
                sync(device)
                self.stamps.append(time.perf_counter())

    with tempfile.TemporaryDirectory() as tmp:
        recipe = RecipeConfig.model_validate(
            {
                "name": "bench",
                "seed": args.seed,
                "output_dir": tmp,
                "model": {
                    "d_in": args.d_in,
                    "d_sae": args.n_latents,
                    "sparsity": sparsity_spec(args),
                    "optimizer": {"lr": args.lr},
                },
                "data": {"name": "synthetic", "d": args.d_in, "batch_size": args.batch},
                "trainer": {
                    "max_steps": total,
                    "accelerator": "gpu" if device.type == "cuda" else "cpu",
                    "val_check_interval": total + 1,
                    "limit_val_batches": 0,
                    "precision": PRECISIONS[args.dtype],
                },
                "checkpoint": {"every_n_steps": total + 1},
            }
        )
        run = build_run(recipe)
        clock = Clock()
        run.trainer.callbacks.append(clock)
        run.trainer.fit(run.module, datamodule=InMemory())
    if clock.report is not None:
        clock.report.emit("trainer")
    first, last = clock.stamps
    return args.batch * args.steps / (last - first)


class SyncReport:
    """Where a CUDA program waits for the device: ``torch.cuda.set_sync_debug_mode`` warnings,
    counted by the innermost project or Lightning frame that caused them."""

    def __init__(self) -> None:
        import collections

        self.sites: collections.Counter[str] = collections.Counter()
        self._saved: Any = None

    def start(self) -> None:
        import warnings

        import torch

        self._saved = warnings.showwarning
        warnings.simplefilter("always")

        def record(message: Any, category: Any, filename: str, lineno: int, *rest: Any) -> None:
            if "synchroniz" in str(message):
                self.sites[_caller()] += 1
            else:
                self._saved(message, category, filename, lineno, *rest)

        warnings.showwarning = record
        torch.cuda.set_sync_debug_mode("warn")

    def stop(self) -> None:
        import warnings

        import torch

        torch.cuda.set_sync_debug_mode("default")
        if self._saved is not None:
            warnings.showwarning = self._saved

    def emit(self, label: str) -> None:
        emit(f"{label}_syncs", sum(self.sites.values()))
        for site, n in self.sites.most_common():
            print(f"  sync x{n}: {site}", flush=True)


def _caller() -> str:
    """The innermost frames outside torch and this file's warning hook, as ``file:line`` s."""
    import traceback

    frames = [
        f
        for f in traceback.extract_stack()[:-3]
        if "site-packages/torch/" not in f.filename and not f.filename.endswith("warnings.py")
    ]
    keep = [f for f in frames if "lightning" in f.filename]  # the project's and Lightning's
    chosen = (keep or frames)[-3:]
    return " <- ".join(
        f"{Path(f.filename).parent.name}/{Path(f.filename).name}:{f.lineno}"
        for f in reversed(chosen)
    )


def bare_sync_report(step: Callable[[], Any]) -> None:
    """Print the host-device synchronisations of two bare steps (CUDA)."""
    report = SyncReport()
    report.start()
    try:
        step()
        step()
    finally:
        report.stop()
    report.emit("bare")


# ---- agreement of the two paths ---------------------------------------------------------------


def check_agreement(args: argparse.Namespace, batches: list[Any]) -> float:
    """Fused against dense on this device: one training forward + backward, AuxK live.

    The batch has all-zero rows (ties), a tenth of the latents is held dead so AuxK works, and
    BatchTopK is also compared at inference with the threshold the training step measured.
    Prints each quantity's ``max |fused - dense| / max |dense|`` and returns the largest.
    """
    import copy

    import torch

    device, dtype = batches[0].device, batches[0].dtype
    torch.manual_seed(args.seed + 1)
    module = build_module(args, device, dtype)
    with torch.no_grad():  # off the zero init, so that every gradient is exercised
        module.sae.encoder.b_enc.normal_(0, 0.1)
        module.sae.decoder.b_dec.normal_(0, 0.1)
    x = batches[0].clone()
    x[::7] = 0.0
    dead = torch.zeros(args.n_latents, dtype=torch.bool, device=device)
    dead[torch.randperm(args.n_latents, device=device)[: args.n_latents // 10]] = True
    results = []
    for fused in (True, False):
        sae = copy.deepcopy(module.sae)
        sae.fused = fused
        out = sae.run(x)
        loss = (x - out.x_hat).pow(2).sum(dim=1).mean()
        residual = x - out.x_hat.detach()
        aux = sae.sparsity.auxiliary_losses(out.aux_source, x, residual, sae.decoder, dead)
        loss = loss + sum(aux.values())
        loss.backward()
        found = {"codes": out.codes.dense(), "x_hat": out.x_hat, "loss": loss}
        found.update({f"grad_{n}": p.grad for n, p in sae.named_parameters() if p.grad is not None})
        if hasattr(sae.sparsity, "threshold"):
            found["threshold"] = sae.sparsity.threshold.clone()
            sae.eval()
            with torch.no_grad():
                found["inference_codes"] = sae.encode_codes(x).dense()
        results.append(found)
    worst = 0.0
    for name, expected in results[1].items():
        got = results[0][name].detach().float()
        expected = expected.detach().float()
        err = float((got - expected).abs().max() / expected.abs().max().clamp_min(1e-30))
        emit(f"check_{name}_rel_err", err)
        worst = max(worst, err)
    return worst


# ---- kernel alternatives ----------------------------------------------------------------------


def kernel_timings(args: argparse.Namespace, x: Any, rounds: int) -> dict[str, float]:
    """Median seconds of the selection and weight-gradient alternatives on the step's shapes.

    Weight gradient: ``grad_W[i] = sum over (b, j) with idx[b, j] == i of g[b, j] x[b]``.
    """
    import torch

    from sae_lightning.kernels.select import topk_select
    from sae_lightning.kernels.weight_grad import _weight_grad_dense_backward, sparse_weight_grad

    n, k, batch = args.n_latents, args.k, args.batch
    pre = torch.randn(batch, n, device=x.device, dtype=x.dtype)
    idx = pre.topk(k, dim=1).indices  # (batch, k)
    g = torch.randn(batch, k, device=x.device, dtype=x.dtype)

    def sparsify_index_add() -> Any:  # sparsify 1.3.3's FusedEncoder.backward
        out = torch.zeros(n, x.shape[1], device=x.device, dtype=x.dtype)
        contributions = (g.unsqueeze(2) * x.unsqueeze(1)).reshape(-1, x.shape[1])  # (b*k, d)
        return out.index_add_(0, idx.flatten(), contributions)

    def index_add_by_column() -> Any:  # k index_add_ calls of (batch, d) each
        out = torch.zeros(n, x.shape[1], device=x.device, dtype=x.dtype)
        for j in range(k):
            out.index_add_(0, idx[:, j], x * g[:, j : j + 1])
        return out

    def csr_matmul() -> Any:  # (n, batch) CSR of g, sorted by latent, times x
        rows = idx.reshape(-1)
        order = rows.argsort()
        crow = torch.zeros(n + 1, dtype=torch.long, device=x.device)
        crow[1:] = torch.bincount(rows, minlength=n).cumsum(0)
        cols = torch.div(order, k, rounding_mode="floor")
        a = torch.sparse_csr_tensor(
            crow, cols, g.reshape(-1)[order], (n, batch), check_invariants=False
        )
        return a @ x

    pair_rows = torch.arange(batch, device=x.device).repeat_interleave(k)  # row of each pair
    fns = {
        "select_torch_topk": lambda: pre.topk(k, dim=1, sorted=False),
        "select_topk_select": lambda: topk_select(pre, k),
        "wgrad_sparse_weight_grad": lambda: sparse_weight_grad(idx, g, x, n),
        "wgrad_aten_embedding_bag_backward": lambda: _weight_grad_dense_backward(
            idx.reshape(-1), g.reshape(-1), x, n, pair_rows
        ),
        "wgrad_sparsify_index_add": sparsify_index_add,
        "wgrad_index_add_by_column": index_add_by_column,
        "wgrad_csr_matmul": csr_matmul,
    }
    expected = sparse_weight_grad(idx, g, x, n)
    for name in fns:
        if not name.startswith("wgrad_"):
            continue
        got = fns[name]()
        assert torch.allclose(got, expected, rtol=1e-4, atol=1e-4), name
    times = timed_rounds(fns, rounds, x.device)
    return {name: statistics.median(ts) for name, ts in times.items()}


# ---- main -------------------------------------------------------------------------------------


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    torch, device, dtype = setup_torch(args)
    emit_machine(device)
    emit("device", device.type)
    emit("threads", torch.get_num_threads())
    emit("dtype", args.dtype)
    emit("plugin", args.plugin)
    emit("path", args.path)
    emit("shape", f"d_in={args.d_in},n_latents={args.n_latents},k={args.k},batch={args.batch}")
    emit("thp_mem_alloc", os.environ.get("THP_MEM_ALLOC_ENABLE", "0"))

    import sae_lightning.module  # noqa: F401  (imported before the memory baseline, as in peers.py)

    meter = MemoryMeter(device)
    batches = make_batches(args, device, dtype)
    step = ProjectStep(args, batches, fused=args.path == "fused", compile=args.compile)
    for _ in range(args.warmup):
        step()
    peak = measure_peak(meter, step, device)

    floor = Floor(args, batches[0])
    contenders: dict[str, Callable[[], Any]] = {"floor": floor, "step": step}
    if args.dense:
        dense = ProjectStep(args, batches, fused=False)
        for _ in range(max(1, args.warmup - 1)):
            dense()
        contenders["dense"] = dense
    times = timed_rounds(contenders, args.steps, device)

    floor_s = statistics.median(times["floor"])
    step_s = statistics.median(times["step"])
    ratio = statistics.median(f / s for f, s in zip(times["floor"], times["step"], strict=True))
    flops = 2 * args.batch * args.d_in * args.n_latents
    emit("floor_s", floor_s)
    emit("floor_tokens_per_s", args.batch / floor_s)
    emit("step_s", step_s)
    emit("best_floor_s", min(times["floor"]))
    emit("best_step_s", min(times["step"]))
    emit("best_ratio_to_floor", min(times["floor"]) / min(times["step"]))
    if args.dense:
        dense_s = statistics.median(times["dense"])
        emit("dense_step_s", dense_s)
        emit("dense_tokens_per_s", args.batch / dense_s)
        emit("speedup_over_dense", dense_s / step_s)
    if args.peak_tflops:
        emit("floor_fraction_of_peak", flops / floor_s / 1e12 / args.peak_tflops)
        emit("step_fraction_of_peak", flops / step_s / 1e12 / args.peak_tflops)
    if args.check:
        worst = check_agreement(args, batches)
        emit("check_max_rel_err", worst)
        emit("check_pass", int(worst <= 1e-5))
    if args.sync_report and device.type == "cuda":
        bare_sync_report(step)
    if args.through_trainer:
        # The bare step timed as the trainer is (back to back, one wait at the end), before and
        # after the trainer run: the reference is the mean of the two, so that a change in
        # machine load during the run moves both sides.
        before_s = pipelined_step_s(step, args.steps, device)
        trainer = trainer_tokens_per_s(args, batches, sync_report=args.sync_report)
        after_s = pipelined_step_s(step, args.steps, device)
        bare = args.batch / ((before_s + after_s) / 2)
        emit("bare_tokens_per_s_before", args.batch / before_s)
        emit("bare_tokens_per_s_after", args.batch / after_s)
        emit("trainer_tokens_per_s", trainer)
        emit("trainer_ratio_to_bare", trainer / bare)
    if args.kernels:  # last: its big temporaries must not disturb the timings above
        for name, seconds in kernel_timings(args, batches[0], args.steps).items():
            emit(f"kernel_{name}_s", seconds)
    emit("tokens_per_s", args.batch / step_s)
    emit("peak_mem_mb", peak)
    emit("ratio_to_floor", ratio)
    return 0


if __name__ == "__main__":
    sys.exit(main())
