"""Dead latents with and without the resampler, on synthetic superposition data.

A wide TopK SAE (16 x d_in latents for 4 x d_in true atoms) with AuxK off ends with many dead
latents. The same run (same seed, data and schedule) is repeated with the ``resampler``
callback at Anthropic's encoder norm (0.2 x the mean live row) and at 1.0 x; a run with AuxK on
(OpenAI's remedy, 1/32) is the reference. Every run goes through the real stack (recipe ->
registry -> SAEModule -> lightning.Trainer). The resampler fires at 1/8, 2/8, 3/8 and 4/8 of
the run, so the second half trains the new latents (or lets them die again).

    python benchmarks/resampling.py     # 4 runs of 1000 steps: 11 min on a busy 2-core machine
    python benchmarks/resampling.py --steps 2000 --threads 2

Reported: dead latents at the end (never firing on the 8192-sample validation set, and not
fired in the last ``dead_window_tokens`` training tokens), validation FVU, dictionary recovery
(MMCS) and the latents re-initialised at the last resample (``train/resampled``); then, for each
resampler run against the plain run measured here, the ratio of dead latents (goal < 0.5) and
the FVU difference (goal <= 0).
"""

from __future__ import annotations

import argparse
import logging
import tempfile
import time
import warnings
from pathlib import Path

import torch

RECIPE = Path(__file__).resolve().parents[1] / "recipes" / "quickstart.yaml"
PLAIN = "{name: topk, k: 4, aux_coefficient: 0.0}"
AUXK = "{name: topk, k: 4, aux_coefficient: 0.03125}"


def base_overrides(steps: int, seed: int, out: Path) -> dict[str, str]:
    every = steps // 8
    return {
        "output_dir": str(out),
        "seed": str(seed),
        "data.d": "32",
        "data.n_atoms": "128",
        "data.batch_size": "1024",
        "model.d_sae": "512",
        "model.sparsity": PLAIN,
        "model.optimizer.lr": "0.01",
        "model.optimizer.warmup_steps": "50",
        "model.loss.dead_window_tokens": str(every * 1024 // 2),
        "trainer.max_steps": str(steps),
        "trainer.val_check_interval": str(steps),
        "trainer.enable_progress_bar": "false",
        "checkpoint.every_n_steps": str(steps),
    }


def resampler(steps: int, scale: float) -> str:
    every = steps // 8
    return (
        f"[{{name: resampler, every_n_steps: {every}, max_resamples: 4, "
        f"n_candidates: 16384, encoder_norm_scale: {scale}}}]"
    )


def run(name: str, base: dict[str, str], extra: dict[str, str]) -> dict[str, float]:
    from sae_lightning.recipe import load_recipe
    from sae_lightning.runner import fit

    over = {**base, **extra}
    start = time.perf_counter()
    metrics = fit(load_recipe([RECIPE], [*over.items(), ("name", name)]))
    d_sae = int(base["model.d_sae"])
    train_dead = next(v for k, v in metrics.items() if k.startswith("train/dead_fraction"))
    return {
        "dead_eval": round(metrics["val/dead_fraction_eval"] * d_sae),
        "dead_window": round(train_dead * d_sae),
        "fvu": metrics["val/fvu"],
        "mmcs": metrics["val/mmcs"],
        "resampled": metrics.get("train/resampled", 0.0),
        "seconds": time.perf_counter() - start,
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--steps", type=int, default=1000, help="training steps per run")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--threads", type=int, default=2, help="torch CPU threads")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    import lightning.pytorch  # noqa: F401 - sets its loggers' levels on import; then quiet them

    logging.getLogger("lightning.pytorch").setLevel(logging.WARNING)
    warnings.filterwarnings("ignore")

    with tempfile.TemporaryDirectory() as tmp:
        base = base_overrides(args.steps, args.seed, Path(tmp))
        runs = {
            "topk, AuxK off": run("plain", base, {}),
            "+ resampler (scale 0.2)": run(
                "resampled02", base, {"callbacks": resampler(args.steps, 0.2)}
            ),
            "+ resampler (scale 1.0)": run(
                "resampled10", base, {"callbacks": resampler(args.steps, 1.0)}
            ),
            "topk, AuxK 1/32 (reference)": run("auxk", base, {"model.sparsity": AUXK}),
        }

    d_sae = int(base["model.d_sae"])
    print(f"\n{args.steps} steps x 1024 tokens, d_in 32, d_sae {d_sae}, k 4, seed {args.seed}")
    print(
        f"{'run':30s} {'dead(eval)':>10s} {'dead(window)':>12s} {'val FVU':>8s} {'MMCS':>6s} "
        f"{'last resample':>13s}"
    )
    for name, r in runs.items():
        print(
            f"{name:30s} {r['dead_eval']:>10d} {r['dead_window']:>12d} {r['fvu']:>8.4f} "
            f"{r['mmcs']:>6.3f} {r['resampled']:>13.0f}   ({r['seconds']:.0f} s)"
        )
    plain = runs["topk, AuxK off"]
    print()
    for name in ("+ resampler (scale 0.2)", "+ resampler (scale 1.0)"):
        r = runs[name]
        ratio = r["dead_eval"] / max(plain["dead_eval"], 1)
        print(
            f"{name}: dead / plain {ratio:.3f} (goal < 0.5), "
            f"FVU - plain {r['fvu'] - plain['fvu']:+.4f} (goal <= 0)"
        )


if __name__ == "__main__":
    main()
