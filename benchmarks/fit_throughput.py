"""Time ``sae-lightning fit``, the command users run, against the bare training step.

For each data module, ``fit`` runs in a subprocess twice, for ``--short`` and ``--long`` steps;
``(wall(long) - wall(short)) / (long - short)`` is the seconds of one steady-state step, with
start-up, setup, the final validation and the export cancelling out. The bare step
(``_harness.ProjectStep``: the module's ``compute_step``, backward and optimizer hooks on
in-memory batches, no Lightning) is timed in this process before and after the fits, steps back
to back; its reference is the mean of the two, so load that changes during the run moves both
sides. ``fit_over_bare = bare step s / fit step s``. Both do the same work: the recipe's
``dead_window_tokens`` is longer than the longer fit, so no latent counts as dead and AuxK does
not run, as in the bare step.

    python benchmarks/fit_throughput.py --threads 2        # (768, 16384, 32, 4096), CPU
    python benchmarks/fit_throughput.py --device cuda [--dtype bf16]

Data modules: ``synthetic`` (the recipe default's generator) and ``activation_cache``, a cache
that ``sae-lightning cache`` writes first from a one-layer GPT-2 of width ``d_in`` (random
weights, built locally) over generated text. Prints ``key=value`` lines, among them
``fit_over_bare_<data>=<float>`` for each data module; the last line, ``fit_over_bare=<float>``,
is the smaller.
"""

from __future__ import annotations

import argparse
import os
import random
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent))

from _harness import (  # the benchmark folder is not a package
    PRECISIONS,
    ProjectStep,
    add_shape_args,
    emit,
    emit_machine,
    make_batches,
    pipelined_step_s,
    setup_torch,
)

DATA = ("synthetic", "activation_cache")
HOOK = "transformer.h.0"


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    add_shape_args(p)
    p.add_argument("--short", type=int, default=10, help="steps of the shorter fit")
    p.add_argument("--long", type=int, default=30, help="steps of the longer fit")
    p.add_argument("--data", default=",".join(DATA), help=f"comma list from: {', '.join(DATA)}")
    p.add_argument(
        "--cache-tokens",
        type=int,
        default=None,
        help="activations in the cache (default: 8 batches; fit reads it in epochs)",
    )
    p.set_defaults(plugin="topk", steps=5)
    return p.parse_args(argv)


# ---- the activation cache, made with the project's own command ------------------------------


def write_lm(folder: Path, d_model: int, seed: int) -> Path:
    """A one-layer GPT-2 of width ``d_model`` with a character tokenizer, saved to ``folder``."""
    import torch
    from transformers import GPT2Config, GPT2LMHeadModel

    tests = Path(__file__).resolve().parents[1] / "tests"
    sys.path.insert(0, str(tests))
    from lm_scripts.tiny_lm import CHARS, SPECIALS, make_tokenizer

    config = GPT2Config(
        vocab_size=len(SPECIALS) + len(CHARS),
        n_positions=128,
        n_embd=d_model,
        n_layer=1,
        n_head=max(1, d_model // 64),
        bos_token_id=1,
        eos_token_id=2,
        pad_token_id=3,
    )
    torch.manual_seed(seed)
    GPT2LMHeadModel(config).eval().save_pretrained(str(folder))
    make_tokenizer().save_pretrained(str(folder))
    return folder


def write_text(folder: Path, n_chars: int, seed: int) -> Path:
    """Generated pseudo-code, ``n_chars`` characters (one token each) in 4 KiB documents."""
    rng = random.Random(seed)
    words = ["def", "return", "value", "list", "sum", "for", "in", "range", "x", "y", "print"]
    folder.mkdir(parents=True, exist_ok=True)
    written, i = 0, 0
    while written < n_chars:
        text = " ".join(rng.choice(words) for _ in range(800))[:4096] + ".\n"
        (folder / f"doc{i:04d}.txt").write_text(text)
        written += len(text)
        i += 1
    return folder


def make_cache(root: Path, args: argparse.Namespace, env: dict[str, str]) -> dict[str, Any]:
    """Write the activation cache with ``sae-lightning cache``; returns the fit's data section."""
    tokens = args.cache_tokens or 8 * args.batch
    context = 128
    model = write_lm(root / "lm", args.d_in, args.seed)
    text = write_text(root / "text", int(tokens * 1.1) + 4 * context, args.seed)
    cache = root / "cache"
    data = {
        "name": "lm_activations",
        "model": str(model),
        "hook": HOOK,
        "text": [str(text)],
        "context_length": context,
        "batch_size": args.batch,
        "val_sequences": 4,
        "max_sequences": tokens // context + 4,
        "cache_dir": str(cache),
    }
    recipe = root / "cache.yaml"
    recipe.write_text(_yaml(_recipe(args, data, steps=1, output=root / "runs")))
    started = time.perf_counter()
    _run_cli(["cache", "--config", str(recipe)], env)
    emit("cache_write_s", time.perf_counter() - started)
    return {
        "name": "activation_cache",
        "path": str(cache),
        "model": str(model),
        "hook": HOOK,
        "batch_size": args.batch,
        "val_batch_size": args.batch,
    }


# ---- fit, timed from outside -----------------------------------------------------------------


def _recipe(
    args: argparse.Namespace, data: dict[str, Any], *, steps: int, output: Path
) -> dict[str, Any]:
    return {
        "name": "fit-throughput",
        "seed": args.seed,
        "output_dir": str(output),
        "data": data,
        "model": {
            "d_sae": args.n_latents,
            "encoder": {"name": "linear"},
            "decoder": {"name": "linear"},
            "sparsity": {"name": "topk", "k": args.k},
            "optimizer": {"lr": args.lr},
            # No latent may count as dead within the longer fit: AuxK would then run in its
            # last steps only (on the activation cache, a third of the latents have not fired
            # after 100k tokens), timing AuxK's work rather than fit's overhead; the bare step
            # has no dead latents either.
            "loss": {"dead_window_tokens": 2 * max(args.long, steps) * args.batch},
        },
        "trainer": {
            "max_steps": steps,
            "accelerator": "gpu" if args.device == "cuda" else "cpu",
            "precision": PRECISIONS[args.dtype],
            "val_check_interval": steps,
            "limit_val_batches": 1,
        },
        "checkpoint": {"every_n_steps": steps + 1},
    }


def _yaml(recipe: dict[str, Any]) -> str:
    import yaml

    return yaml.safe_dump(recipe, sort_keys=False)


def _run_cli(argv: list[str], env: dict[str, str]) -> None:
    proc = subprocess.run(
        [sys.executable, "-m", "sae_lightning.cli", *argv],
        env=env,
        capture_output=True,
        text=True,
        check=False,
    )
    if proc.returncode != 0:
        tail = "\n".join((proc.stdout + proc.stderr).strip().splitlines()[-15:])
        raise SystemExit(f"sae-lightning {' '.join(argv)} failed (exit {proc.returncode}):\n{tail}")


def fit_wall_s(
    root: Path, args: argparse.Namespace, data: dict[str, Any], steps: int, env
) -> float:
    """Wall seconds of ``sae-lightning fit`` for ``steps`` steps, start-up to exit."""
    recipe = root / f"fit-{data['name']}-{steps}.yaml"
    recipe.write_text(_yaml(_recipe(args, data, steps=steps, output=root / "runs")))
    started = time.perf_counter()
    _run_cli(["fit", "--config", str(recipe)], env)
    return time.perf_counter() - started


def synthetic_data(args: argparse.Namespace) -> dict[str, Any]:
    return {
        "name": "synthetic",
        "d": args.d_in,
        "batch_size": args.batch,
        "val_samples": args.batch,
        "val_batch_size": args.batch,
    }


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    names = [n.strip() for n in args.data.split(",") if n.strip()]
    unknown = [n for n in names if n not in DATA]
    if unknown or not names:
        raise SystemExit(f"--data: unknown {unknown}; choose from {', '.join(DATA)}")
    if args.long <= args.short:
        raise SystemExit("--long must be larger than --short")
    torch, device, dtype = setup_torch(args)
    emit_machine(device)
    emit("device", device.type)
    emit("threads", torch.get_num_threads())
    emit("dtype", args.dtype)
    emit("shape", f"d_in={args.d_in},n_latents={args.n_latents},k={args.k},batch={args.batch}")
    env = dict(os.environ)
    if args.threads is not None:
        env["OMP_NUM_THREADS"] = str(args.threads)

    batches = make_batches(args, device, dtype)
    step = ProjectStep(args, batches, fused=True)
    for _ in range(args.warmup):
        step()
    ratios: dict[str, float] = {}
    with tempfile.TemporaryDirectory() as tmp:
        root = Path(tmp)
        sections = {
            name: make_cache(root, args, env)
            if name == "activation_cache"
            else synthetic_data(args)
            for name in names
        }
        before_s = pipelined_step_s(step, args.steps, device)
        fit_s: dict[str, float] = {}
        for name, data in sections.items():
            short = fit_wall_s(root, args, data, args.short, env)
            long = fit_wall_s(root, args, data, args.long, env)
            fit_s[name] = (long - short) / (args.long - args.short)
            emit(f"fit_wall_s_{name}", f"{short:.2f},{long:.2f}")
        after_s = pipelined_step_s(step, args.steps, device)
    bare_s = (before_s + after_s) / 2
    emit("bare_step_s_before", before_s)
    emit("bare_step_s_after", after_s)
    for name, seconds in fit_s.items():
        emit(f"fit_step_s_{name}", seconds)
        emit(f"fit_tokens_per_s_{name}", args.batch / seconds)
        ratios[name] = bare_s / seconds
        emit(f"fit_over_bare_{name}", ratios[name])
    emit("fit_over_bare", min(ratios.values()))
    return 0


if __name__ == "__main__":
    sys.exit(main())
