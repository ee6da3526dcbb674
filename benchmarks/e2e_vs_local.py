"""Local vs e2e TopK SAEs on the same tokens of SmolLM2-135M (layer 15), as Braun et al. compare.

    OMP_NUM_THREADS=2 python benchmarks/e2e_vs_local.py --mode e2e --contexts 160 \
        --token-batch 2 --eval-sequences 16 --max-train-minutes 8.5
    OMP_NUM_THREADS=2 python benchmarks/e2e_vs_local.py --mode local --contexts 160 \
        --token-batch 2 --eval-sequences 16 --stop-at-step <steps the e2e run made>

Both runs start from ``recipes/smollm2-e2e-topk.yaml`` and differ only in ``model.loss.mode``:
the corpus is cut to ``--contexts`` training contexts (plus the held-out ones) and step ``t``
of both runs trains on the same contexts. The e2e run takes ``token_batch_size`` whole contexts
per step; the local run streams the activations of the contexts in the same seeded order with a
mixing buffer of one batch (``batch_size = buffer_size =`` the mean kept tokens per step), so
its step ``t`` holds the same tokens up to a few at the batch boundaries. ``--max-train-minutes``
stops the e2e run early on a slow machine; give the local run ``--stop-at-step`` equal to the
steps the e2e run made (both keep the learning-rate schedule of the full pass). Both SAEs start
from the same weights (same seed), have the same k (so the same L0) and the same optimizer. At
the end both are evaluated on the same held-out contexts: FVU and L0 on their activations, and
KL / CE with the SAE spliced into the LM (the ``e2e_kl`` callback). Prints ``key=value`` lines
and writes them to ``--out/<mode>.json``; run the modes one after the other, not at once.
"""

from __future__ import annotations

import argparse
import json
import os
import time
from pathlib import Path

import lightning.pytorch as pl
import torch

from sae_lightning.lm.e2e_module import E2ESAEModule, use_token_batches
from sae_lightning.module import SAEModule
from sae_lightning.recipe import load_recipe
from sae_lightning.runner import build_run

RECIPE = Path(__file__).resolve().parents[1] / "recipes" / "smollm2-e2e-topk.yaml"
REPORT = (
    "val/fvu",
    "val/l0",
    "e2e/kl",
    "e2e/ce_clean",
    "e2e/ce_sae",
    "e2e/ce_zero_ablation",
    "e2e/ce_recovered",
    "e2e/ce_increase",
    "e2e/kl_score",
    "val/dead_fraction_eval",
)


class Progress(pl.Callback):
    """Prints the step and elapsed time every 5 steps; stops after ``limit_s`` of training or at
    ``stop_step`` (the schedule still spans ``max_steps``)."""

    def __init__(self, started: float, limit_s: float | None, stop_step: int | None) -> None:
        self.started = started
        self.limit_s = limit_s
        self.stop_step = stop_step

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx) -> None:
        elapsed = time.perf_counter() - self.started
        if trainer.global_step % 5 == 0:
            print(f"step={trainer.global_step} elapsed_s={elapsed:.0f}", flush=True)
        if self.limit_s is not None and elapsed > self.limit_s:
            trainer.should_stop = True
        if self.stop_step is not None and trainer.global_step >= self.stop_step:
            trainer.should_stop = True


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--mode", choices=["local", "e2e", "e2e_ds"], required=True)
    parser.add_argument("--contexts", type=int, default=112, help="training contexts (one pass)")
    parser.add_argument("--token-batch", type=int, default=4, help="contexts per step")
    parser.add_argument("--steps", type=int, default=None, help="max_steps (timing probes)")
    parser.add_argument("--stop-at-step", type=int, default=None, help="stop early, same schedule")
    parser.add_argument("--eval-sequences", type=int, default=8, help="held-out contexts for KL")
    parser.add_argument(
        "--max-train-minutes", type=float, default=None, help="stop training after this long"
    )
    parser.add_argument("--out", type=Path, default=Path("runs/e2e_vs_local"))
    args = parser.parse_args()
    print(f"load_average={os.getloadavg()} OMP_NUM_THREADS={os.environ.get('OMP_NUM_THREADS')}")
    started = time.perf_counter()

    base = load_recipe([RECIPE])
    steps = args.contexts // args.token_batch  # the e2e run's one pass
    max_steps = steps if args.steps is None else args.steps
    overrides = [
        ("name", f"e2e-vs-local-{args.mode}"),
        ("output_dir", str(args.out)),
        ("model.loss.mode", args.mode),
        ("data.max_sequences", str(args.contexts + base.data["val_sequences"])),
        ("data.token_batch_size", str(args.token_batch)),
        ("data.stats_tokens", "4096"),
        ("trainer.max_steps", str(max_steps)),
        ("trainer.val_check_interval", str(max_steps)),
        ("trainer.enable_progress_bar", "false"),
        ("callbacks", f"[{{name: e2e_kl, sequences: {args.eval_sequences}}}]"),
    ]
    recipe = load_recipe([RECIPE], overrides)
    run = build_run(recipe, log=False)
    run.datamodule.load()  # tokenizes the corpus (and loads the LM); harvests nothing
    train = run.datamodule.corpus.train
    assert len(train) == args.contexts, (len(train), args.contexts)
    kept = int(train.keep.sum())
    if args.mode == "local":
        # One mixing buffer per step: step t holds (about) the tokens of e2e step t.
        rows = kept // steps
        more = [("data.batch_size", str(rows)), ("data.buffer_size", str(rows))]
        run = build_run(load_recipe([RECIPE], [*overrides, *more]), log=False)
        datamodule = run.datamodule
        module: SAEModule = run.module
    else:
        datamodule = run.datamodule
        pl.seed_everything(recipe.seed, workers=True, verbose=False)  # the local run's init
        module = E2ESAEModule(**run.module.hparams)
        use_token_batches(datamodule)
    init = float(module.sae.encoder.W_enc.detach().double().sum())
    setup_s = time.perf_counter() - started

    t = time.perf_counter()
    limit = None if args.max_train_minutes is None else 60 * args.max_train_minutes
    run.trainer.callbacks.insert(0, Progress(t, limit, args.stop_at_step))
    run.trainer.fit(module, datamodule=datamodule)
    fit_s = time.perf_counter() - t
    done = run.trainer.global_step
    if "e2e/kl" not in run.trainer.callback_metrics:  # stopped early: evaluate now
        run.trainer.validate(module, datamodule=datamodule, verbose=False)
    eval_s = time.perf_counter() - t - fit_s
    metrics = {k: float(v) for k, v in run.trainer.callback_metrics.items()}
    result = {
        "mode": args.mode,
        "train_contexts": args.contexts,
        "train_tokens": kept,
        "steps": done,
        "tokens_per_step": kept / steps,
        "tokens_trained": round(done * kept / steps),
        "init_W_enc_sum": init,
        "setup_s": setup_s,
        "fit_s": fit_s,
        "eval_s": eval_s,
        "wall_s": time.perf_counter() - started,
        **{k: metrics[k] for k in REPORT if k in metrics},
        "train/kl_last": metrics.get("train/kl", float("nan")),
        "train/fvu_last": metrics.get("train/fvu", float("nan")),
    }
    for key, value in result.items():
        print(f"{key}={value}")
    args.out.mkdir(parents=True, exist_ok=True)
    (args.out / f"{args.mode}.json").write_text(json.dumps(result, indent=2) + "\n")


if __name__ == "__main__":
    torch.set_num_threads(int(os.environ.get("OMP_NUM_THREADS", "2")))
    main()
