"""Function-space SAEs side by side on the same synthetic functions.

SAE-MLP, L-SAE, SAE-CNN, SAE-FNO and L-SAE-FNO train on the same batches of the sparse functional
generative model (``function_synthetic``: 1-D, sums of ``n_active`` of ``n_atoms`` known atoms,
training grid N = 64), with the same budget: steps, batch, Adam with the same warm-up and cosine
schedule (the runner's ``build_optimizer``), relative-L2 loss, ``d_sae`` and ``k``. Only the
peak learning rate (and, for concept maps, whether joint top-k divides the kept codes by the
domain fraction) differs: each model's is the best of a grid measured by ``--tune`` on a seed
that is not reported (see ``TUNED``).

Each step is ``SAEModule.compute_step`` (the loss ``sae-lightning fit`` computes), backward,
the decoder's unit-norm hooks and one optimizer and scheduler step, in a plain loop so that the
MMCS can be measured every ``--eval-every`` steps without a Trainer.

Reported per model (mean over ``--seeds``, spread as min-max):

- MMCS: Hungarian-matched |cos| between the true atoms and the decoder's concept functions at the
  training grid, shift-aware (maximised over circular shifts) for the convolutional decoders
  (SAE-CNN, SAE-FNO, L-SAE-FNO), plain for SAE-MLP and L-SAE;
- utilisation: fraction of concepts active in at least one of the validation samples;
- steps to MMCS 0.9: the first evaluated step at which MMCS >= 0.9 ("-" if never);
- relative L2 ``||u - u_hat|| / ||u||`` on the same validation functions sampled at N, 2N, 4N.
  SAE-MLP and L-SAE cannot run at another grid ("n/a"); in brackets, their error through
  resampling: the fine samples subsampled to N, reconstructed, trigonometrically interpolated
  back to the fine grid.

Then the acceptance check: SAE-FNO's errors at 2N and 4N over its error at N (goal <= 1.5), and
the same ratios for SAE-CNN. Usage::

    OMP_NUM_THREADS=1 python benchmarks/function_space.py                 # the table
    OMP_NUM_THREADS=1 python benchmarks/function_space.py --tune          # the lr grid
    OMP_NUM_THREADS=1 python benchmarks/function_space.py --tune --normalize-mass
"""

from __future__ import annotations

import argparse
import os
import platform
import shlex
import sys
import time
from dataclasses import dataclass
from statistics import mean
from types import SimpleNamespace
from typing import Any, NamedTuple

import torch
from torch import Tensor

from sae_lightning.functional import relative_l2
from sae_lightning.module import SAEModule, build_optimizer

GRID = 64
RESOLUTIONS = (64, 128, 256)
MMCS_TARGET = 0.9
TRANSFER_GOAL = 1.5
WORSE_BY = 1.1


def data_config() -> dict[str, Any]:
    """The synthetic functions: 8 localised atoms (two Gaussians of width 0.02-0.04 each), 3
    per sample at their canonical positions, grid 64."""
    return {
        "n_atoms": 8,
        "family": "bumps",
        "bump_width": 0.04,
        "bumps_per_atom": 2,
        "dims": 1,
        "grid": GRID,
        "n_active": 3,
        "shifts": "none",
        "noise_std": 0.02,
        "batch_size": 64,
        "val_samples": 256,
    }


@dataclass(frozen=True)
class Model:
    """One contender: its encoder and decoder specs."""

    encoder: dict[str, Any]
    decoder: dict[str, Any]
    maps: bool  # concept maps (convolutional) rather than vector codes


def sparsity(maps: bool, normalize_mass: bool, k: int = 3) -> dict[str, Any]:
    """ReLU + top-k on vector codes; on maps, joint top-k: k concepts, one grid point each
    (domain fraction 1/64: the generative model's codes are impulses), ranked by the norm on
    the kept region; ``normalize_mass`` (tuned) divides the kept codes by the fraction."""
    if not maps:
        return {"name": "joint_topk", "k": k}
    return {
        "name": "joint_topk",
        "k": k,
        "domain_fraction": 1 / GRID,
        "rank_by": "kept",
        "normalize_mass": normalize_mass,
    }


def models() -> dict[str, Model]:
    """The five SAEs. Modes and kernel size cover the atoms: a bump atom spans about 0.4 of the
    domain (25 grid points) and has little energy above frequency 15."""
    return {
        "SAE-MLP": Model({"name": "sae_mlp", "grid": [GRID]}, {"name": "sae_mlp"}, False),
        "L-SAE": Model({"name": "lifted", "grid": [GRID]}, {"name": "lifted"}, False),
        "SAE-CNN": Model({"name": "cnn", "kernel_size": [25]}, {"name": "cnn"}, True),
        "SAE-FNO": Model({"name": "fno", "modes": [16]}, {"name": "fno"}, True),
        "L-SAE-FNO": Model({"name": "lifted_fno", "modes": [16]}, {"name": "lifted_fno"}, True),
    }


LR_GRID = (0.003, 0.01, 0.03, 0.1, 0.3)
TUNE_SEED = 100


class Tuned(NamedTuple):
    lr: float
    normalize_mass: bool = False  # joint_topk on concept maps only


TUNED: dict[str, Tuned] = {
    # The best final MMCS at seed TUNE_SEED after 800 steps over LR_GRID, extended by one
    # factor of ~3 past an edge that won (`--lrs`), and for concept maps over normalize_mass
    # off and on (`--tune`, `--tune --normalize-mass`); the measured grid is in the docs.
    "SAE-MLP": Tuned(1.0),
    "L-SAE": Tuned(0.003),
    "SAE-CNN": Tuned(0.03, False),
    "SAE-FNO": Tuned(0.1, True),
    "L-SAE-FNO": Tuned(0.3, False),
}


# ---- evaluation -----------------------------------------------------------------------------


def fourier_upsample(x: Tensor, n: int) -> Tensor:
    """Trigonometric interpolation of periodic samples ``(..., m)`` onto ``n >= m`` points."""
    m = x.shape[-1]
    spec = torch.fft.rfft(x.double(), norm="forward")
    if m % 2 == 0:  # the Nyquist coefficient is shared by +-m/2 on the finer grid
        spec[..., -1] *= 0.5
    return torch.fft.irfft(spec, n=n, norm="forward")


@torch.no_grad()
def rel_l2_at(sae: torch.nn.Module, u: Tensor, native: bool) -> float:
    """Mean relative L2 error on ``u``; ``native=False``: through the training grid."""
    if native:
        u_hat = sae(u)
    else:
        r = u.shape[-1] // GRID
        u_hat = fourier_upsample(sae(u[..., ::r].contiguous()), u.shape[-1])
    return float(relative_l2(u.double(), u_hat.double()).mean())


@dataclass
class Result:
    """One model trained at one seed."""

    mmcs: float
    utilisation: float
    steps_to_target: int | None
    rel_l2: dict[int, float | None]
    rel_l2_interp: dict[int, float]
    seconds: float
    curve: list[tuple[int, float]]


def train_one(model: Model, seed: int, tuned: Tuned, steps: int, eval_every: int) -> Result:
    """Train one SAE on the shared data stream and evaluate it (see the module docstring)."""
    from sae_neural_operator.data.synthetic import (
        FunctionSyntheticConfig,
        FunctionSyntheticDataModule,
    )
    from sae_neural_operator.recovery import concept_support, functional_mmcs, utilization

    data = FunctionSyntheticDataModule(FunctionSyntheticConfig(**data_config()), seed=seed)
    torch.manual_seed(seed)
    module = SAEModule(
        d_in=1,
        d_sae=16,
        encoder=model.encoder,
        decoder=model.decoder,
        sparsity=sparsity(model.maps, tuned.normalize_mass),
        optimizer={"lr": tuned.lr, "warmup_steps": 50, "decay": "cosine"},
        loss={"reconstruction": "rel_l2"},
    )
    sae = module.sae
    built = build_optimizer(
        [(list(module.parameters()), module.optimizer_config)],
        SimpleNamespace(max_steps=steps),  # type: ignore[arg-type]
    )
    opt, sched = built["optimizer"], built["lr_scheduler"]["scheduler"]
    true = data.true_concepts((GRID,), torch.float64)
    shift_aware = bool(sae.decoder.convolutional)

    def mmcs() -> float:
        with torch.no_grad():
            learned = sae.decoder.concept_functions((GRID,)).double()
        return functional_mmcs(true, learned, shift_aware=shift_aware).mmcs

    curve: list[tuple[int, float]] = []
    start = time.perf_counter()
    for t in range(steps):
        out = module.compute_step(data.rank_batch(t), step=t)
        opt.zero_grad(set_to_none=True)
        out.loss.backward()
        sae.before_optimizer_step()
        opt.step()
        sched.step()
        sae.after_optimizer_step()
        if (t + 1) % eval_every == 0 or t + 1 == steps:
            curve.append((t + 1, mmcs()))
    seconds = time.perf_counter() - start

    hit = next((s for s, m in curve if m >= MMCS_TARGET), None)
    u, _ = data.validation_set((GRID,))
    with torch.no_grad():
        active = concept_support(sae.encode(u))
    rel: dict[int, float | None] = {}
    interp: dict[int, float] = {}
    for n in RESOLUTIONS:
        u_n, _ = data.validation_set((n,))
        rel[n] = rel_l2_at(sae, u_n, native=True) if model.maps or n == GRID else None
        if not model.maps:
            interp[n] = rel_l2_at(sae, u_n, native=False)
    return Result(curve[-1][1], utilization(active), hit, rel, interp, seconds, curve)


# ---- reporting ------------------------------------------------------------------------------


def spread(values: list[float], fmt: str = "{:.3f}") -> str:
    """``mean (min-max)``, or the single value."""
    if len(values) == 1:
        return fmt.format(values[0])
    return f"{fmt.format(mean(values))} ({fmt.format(min(values))}-{fmt.format(max(values))})"


def steps_cell(hits: list[int | None]) -> str:
    """Per-seed steps to the MMCS target, ``-`` where never reached."""
    return ", ".join("-" if h is None else str(h) for h in hits)


def tuned_cell(tuned: Tuned, maps: bool) -> str:
    return f"{tuned.lr}, {'on' if tuned.normalize_mass else 'off'}" if maps else f"{tuned.lr}"


def rel_cell(results: list[Result], n: int) -> str:
    native = [r.rel_l2[n] for r in results]
    if all(v is not None for v in native):
        return spread([float(v) for v in native if v is not None])
    interp = [r.rel_l2_interp[n] for r in results]
    return f"n/a [{spread(interp)}]"


def table(all_results: dict[str, list[Result]]) -> str:
    head = (
        "| model | codes | lr, mass norm. | MMCS | utilisation | "
        f"steps to MMCS {MMCS_TARGET} (per seed) | "
        + " | ".join(f"rel L2 @{n}" for n in RESOLUTIONS)
        + " | train s/run |"
    )
    rows = [head, "|" + "---|" * (7 + len(RESOLUTIONS))]
    for name, results in all_results.items():
        model = models()[name]
        codes = "maps, shift-aware" if model.maps else "vector"
        rows.append(
            f"| {name} | {codes} | {tuned_cell(TUNED[name], model.maps)} | "
            f"{spread([r.mmcs for r in results])} | "
            f"{spread([r.utilisation for r in results], '{:.2f}')} | "
            f"{steps_cell([r.steps_to_target for r in results])} | "
            + " | ".join(rel_cell(results, n) for n in RESOLUTIONS)
            + f" | {mean(r.seconds for r in results):.1f} |"
        )
    return "\n".join(rows)


def transfer_ratios(results: list[Result]) -> dict[int, list[float]]:
    """Per seed, rel L2 at each finer grid over rel L2 at the training grid."""
    out: dict[int, list[float]] = {}
    for n in RESOLUTIONS[1:]:
        out[n] = [float(r.rel_l2[n]) / float(r.rel_l2[GRID]) for r in results]  # type: ignore[arg-type]
    return out


def acceptance(all_results: dict[str, list[Result]]) -> list[str]:
    lines = []
    fno = transfer_ratios(all_results["SAE-FNO"])
    cnn = transfer_ratios(all_results["SAE-CNN"])
    for n in RESOLUTIONS[1:]:
        ok = max(fno[n]) <= TRANSFER_GOAL
        lines.append(
            f"SAE-FNO rel_l2@{n} / rel_l2@{GRID}: {spread(fno[n])} "
            f"-> {'PASS' if ok else 'FAIL'} (goal <= {TRANSFER_GOAL} at every seed)"
        )
    for n in RESOLUTIONS[1:]:
        # measurably worse: CNN's growth of the error at least WORSE_BY times FNO's, every seed
        excess = [c / f for c, f in zip(cnn[n], fno[n], strict=True)]
        worse = min(excess) >= WORSE_BY
        lines.append(
            f"SAE-CNN rel_l2@{n} / rel_l2@{GRID}: {spread(cnn[n])}; over SAE-FNO's ratio: "
            f"{spread(excess)} -> {'measurably worse' if worse else 'NOT measurably worse'} "
            f"(goal >= {WORSE_BY} at every seed)"
        )
    return lines


def band_limit_ceiling(seeds: list[int], modes: int = 16) -> list[float]:
    """Per seed, the mean over true atoms of ``||P_M d|| / ||d||`` (``P_M`` keeps ``|k| < M``):
    the MMCS a decoder whose concepts have only those modes can reach at best."""
    from sae_neural_operator.data.synthetic import (
        FunctionSyntheticConfig,
        FunctionSyntheticDataModule,
    )

    out = []
    for seed in seeds:
        data = FunctionSyntheticDataModule(FunctionSyntheticConfig(**data_config()), seed=seed)
        atoms = data.true_concepts((4 * GRID,), torch.float64)  # fine grid: no aliasing
        power = torch.fft.rfft(atoms, norm="forward").abs().pow(2)
        power[..., 1:] *= 2  # both signs of each frequency (no Nyquist energy at 4N)
        kept = power[..., :modes].sum(dim=(-1, -2)) / power.sum(dim=(-1, -2))
        out.append(float(kept.sqrt().mean()))
    return out


def environment(argv: list[str]) -> list[str]:
    return [
        f"command: OMP_NUM_THREADS={os.environ.get('OMP_NUM_THREADS', '(unset)')} "
        f"python {shlex.join(['benchmarks/function_space.py', *argv])}",
        f"python {platform.python_version()}, torch {torch.__version__}, "
        f"torch threads {torch.get_num_threads()}, cpus {os.cpu_count()}, "
        f"load average at start {os.getloadavg()[0]:.2f}",
    ]


# ---- main -----------------------------------------------------------------------------------


def parse_args(argv: list[str]) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n", 1)[0])
    p.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2, 3, 4])
    p.add_argument("--steps", type=int, default=800)
    p.add_argument("--eval-every", type=int, default=25, help="MMCS every this many steps")
    p.add_argument("--threads", type=int, default=1, help="torch.set_num_threads")
    p.add_argument("--models", nargs="+", default=None, help="subset of the five")
    p.add_argument("--tune", action="store_true", help=f"lr grid {LR_GRID} at seed {TUNE_SEED}")
    p.add_argument("--lrs", type=float, nargs="+", default=list(LR_GRID), help="--tune grid")
    p.add_argument(
        "--normalize-mass",
        action="store_true",
        help="with --tune: joint top-k on concept maps divides kept codes by the fraction",
    )
    return p.parse_args(argv)


def tune(args: argparse.Namespace, names: list[str]) -> None:
    mass = "on" if args.normalize_mass else "off"
    grid = args.lrs
    print(f"| model | mass norm. | {' | '.join(f'lr {lr}' for lr in grid)} | best lr |")
    print("|---|---|" + "---|" * (len(grid) + 1))
    for name in names:
        model = models()[name]
        scores = [
            train_one(
                model,
                TUNE_SEED,
                Tuned(lr, args.normalize_mass),
                args.steps,
                args.eval_every,
            )
            for lr in grid
        ]
        best = max(range(len(grid)), key=lambda i: scores[i].mmcs)
        cells = [f"{s.mmcs:.3f} / {s.rel_l2[GRID]:.3f}" for s in scores]
        norm = mass if model.maps else "n/a"
        print(f"| {name} | {norm} | {' | '.join(cells)} | {grid[best]} |", flush=True)
    print(f"(cells: final MMCS / rel L2 @{GRID}; seed {TUNE_SEED}, {args.steps} steps)")


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    args = parse_args(argv)
    torch.set_num_threads(args.threads)
    wall = time.perf_counter()
    for line in environment(argv):
        print(line)
    names = args.models or list(models())
    cfg = data_config()
    print(
        f"data: function_synthetic {cfg['family']}, {cfg['n_atoms']} atoms, {cfg['n_active']} "
        f"active, grid {GRID}, batch {cfg['batch_size']}, noise {cfg['noise_std']}; d_sae 16, "
        f"k 3; {args.steps} steps, Adam, 50 warm-up steps, cosine decay; seeds {args.seeds}"
    )
    if args.tune:
        tune(args, names)
    else:
        results: dict[str, list[Result]] = {}
        for name in names:
            model = models()[name]
            results[name] = [
                train_one(model, s, TUNED[name], args.steps, args.eval_every) for s in args.seeds
            ]
            print(
                f"  trained {name}: {mean(r.seconds for r in results[name]):.1f} s/run", flush=True
            )
        print()
        print(table(results))
        print()
        for name, runs in results.items():
            cells = ", ".join(
                f"seed {seed}: {r.mmcs:.4f} / {r.rel_l2[GRID]:.4f}"
                for seed, r in zip(args.seeds, runs, strict=True)
            )
            print(f"{name} MMCS / rel L2 @{GRID} per seed: {cells}")
        print()
        if {"SAE-FNO", "SAE-CNN"} <= set(results):
            for line in acceptance(results):
                print(line)
        ceiling = band_limit_ceiling(args.seeds)
        print(
            "MMCS ceiling of a decoder keeping the 16 modes |k| < 16 (SAE-FNO, L-SAE-FNO): "
            f"{spread(ceiling)}"
        )
    print(
        f"wall time {time.perf_counter() - wall:.0f} s; load average at end "
        f"{os.getloadavg()[0]:.2f}"
    )
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
