"""The real-LM frontier: expander SAEs of degree d against a dense TopK SAE on SmolLM2-135M.

Data: the residual stream after block 15 of SmolLM2-135M (``d_in = 576``), harvested once into
the activation cache by ``sae-lightning cache --config recipes/expander-lm-frontier.yaml``
(Python's documentation, ``builtin:python-docs``). Every SAE trains from that cache with the
same seed, so all see the same batches of the same tokens.

SAEs: expander (``signed_topk``, the paper's TopK) with ``d`` in 4, 8, 16, 32, 64, and a dense
TopK SAE (core ``linear`` encoder and decoder, ``topk``), all at ``n = 4608`` and ``k = 32``.

Held out: the docstrings of standard-library modules the training corpus does not include
(:data:`HELDOUT_MODULES`), packed into contexts of the same length. On them: FVU of the
activations (normalised and outlier-clipped as in training), and, with each SAE spliced into the
LM at the hook, KL(clean || spliced) and CE recovered against zero ablation
(``sae_lightning.lm.evaluation``). Dead fraction: latents that did not fire in the last
``loss.dead_window_tokens`` training tokens. Tokens/s: training step time from batch start to
batch end, median after 5 warm-up steps.

    sae-lightning models prepare smollm2                      # once
    python benchmarks/expander_lm_frontier.py                 # cache (once), train, evaluate, doc
    python benchmarks/expander_lm_frontier.py --cache-only    # only the harvest
    python benchmarks/expander_lm_frontier.py --max-contexts 12 --steps 8 --heldout-contexts 2
                                                              # an end-to-end check, minutes

Writes the table and an SVG between the ``lm-frontier`` markers of ``docs/expander.md``.
"""

from __future__ import annotations

import argparse
import importlib
import json
import math
import statistics
import subprocess
import sys
import tempfile
import time
import warnings
from pathlib import Path
from typing import Any

import torch
from expander_common import StepTimer, frontier_parser, label_of, svg_frame, write_frontier

from sae_lightning.recipe import load_recipe
from sae_lightning.runner import build_run

warnings.filterwarnings("ignore")

ROOT = Path(__file__).resolve().parents[1]
RECIPE = ROOT / "recipes" / "expander-lm-frontier.yaml"
DOC = ROOT / "docs" / "expander.md"
BEGIN, END = "<!-- lm-frontier:begin -->", "<!-- lm-frontier:end -->"
DEGREES = (4, 8, 16, 32, 64)
HELDOUT_MODULES = """
asyncio.events asyncio.tasks asyncio.streams asyncio.queues asyncio.locks logging.handlers
logging.config unittest.mock importlib.metadata email.utils email.header http.cookies
json.decoder json.encoder multiprocessing.pool multiprocessing.managers urllib.robotparser
xml.sax.saxutils ctypes tomllib zoneinfo
"""
"""Modules whose docstrings are the held-out text: none is in the training corpus
(``sae_lightning.lm.corpus.STDLIB_MODULES``; a module's text holds only what it defines)."""


def variants() -> list[tuple[str, list[tuple[str, str]]]]:
    out = [(f"expander d={d}", [("model.encoder.d", str(d))]) for d in DEGREES]
    dense = [
        ("model.encoder", '{"name": "linear"}'),
        ("model.decoder", '{"name": "linear"}'),
        ("model.sparsity", '{"name": "topk", "k": 32}'),
    ]
    return [*out, ("dense TopK", dense)]


def data_overrides(args: argparse.Namespace) -> list[tuple[str, str]]:
    """``--max-contexts``: a smaller corpus in its own cache folder (a quick end-to-end check)."""
    if not args.max_contexts:
        return []
    folder = f"{load_recipe([RECIPE]).data['cache_dir']}-{args.max_contexts}"
    return [("data.max_sequences", str(args.max_contexts)), ("data.cache_dir", folder)]


def cache(args: argparse.Namespace) -> None:
    """Harvest the training activations (skipped when the cache is complete)."""
    cli = Path(sys.executable).parent / "sae-lightning"
    overrides = [f"--{key}={value}" for key, value in data_overrides(args)]
    subprocess.run([str(cli), "cache", "--config", str(RECIPE), *overrides], check=True)


def heldout(args: argparse.Namespace, tmp: Path) -> dict[str, Any]:
    """The LM, the held-out contexts and their raw activations at the hook."""
    from sae_lightning.data.activations import ActivationDataModule
    from sae_lightning.lm.corpus import _module_text

    docs = []
    for name in HELDOUT_MODULES.split():
        try:
            text = _module_text(importlib.import_module(name))
        except ImportError:
            continue
        docs.append(json.dumps({"text": text}))
    path = tmp / "heldout.jsonl"
    path.write_text("\n".join(docs) + "\n")
    recipe = load_recipe([RECIPE])
    config = ActivationDataModule.Config.model_validate(
        {
            **{k: v for k, v in recipe.data.items() if k != "name"},
            "text": [str(path)],
            "val_sequences": args.heldout_contexts,
            "max_sequences": args.heldout_contexts + 1,
            "cache_dir": None,
        }
    )
    dm = ActivationDataModule(config, seed=recipe.seed)
    dm.load()
    assert dm.corpus is not None and dm.harvester is not None
    contexts = dm.corpus.val
    return {
        "model": dm.model,
        "hook": dm.hooks[0],
        "io": config.io,
        "ids": contexts.ids,
        "keep": contexts.keep,
        "raw": dm.harvester(contexts),  # (kept positions, d_in)
    }


def train(label: str, overrides: list[tuple[str, str]], args: argparse.Namespace) -> Any:
    common = [
        ("name", label.replace(" ", "-").replace("=", "")),
        ("output_dir", args.output_dir),
    ]
    if args.steps:
        common.append(("trainer.max_steps", str(args.steps)))
    recipe = load_recipe([RECIPE], [*common, *data_overrides(args), *overrides])
    run = build_run(recipe, log=False)
    timer = StepTimer()
    run.trainer.callbacks.append(timer)
    run.trainer.fit(run.module, datamodule=run.datamodule)
    return recipe, run, timer.times[5:]


@torch.no_grad()
def evaluate(run: Any, held: dict[str, Any], args: argparse.Namespace) -> dict[str, float]:
    from sae_lightning.lm.evaluation import memory_chunk, splice_metrics, spliced_loss_sums

    sae = run.module.sae.eval()
    dm = run.datamodule
    x = dm.transform(held["raw"].float())  # scaled and clipped as the training batches
    x_hat = sae(x)
    fvu = float((x - x_hat).pow(2).sum() / (x - x.mean(dim=0)).pow(2).sum())

    def reconstruct(a: torch.Tensor) -> torch.Tensor:
        return (sae(a.float() * dm.scale) / dm.scale).to(a.dtype)

    vocab = int(held["model"].get_output_embeddings().weight.shape[0])
    chunk = memory_chunk(1024 * 2**20, held["ids"].shape[1], vocab)
    sums = spliced_loss_sums(
        held["model"], held["hook"], held["io"], reconstruct, held["ids"], held["keep"], chunk
    )
    m = splice_metrics(sums)
    return {
        "fvu": fvu,
        "kl": m.kl,
        "ce_recovered": m.ce_recovered,
        "ce_clean": m.ce_clean,
        "ce_zero": m.ce_zero_ablation,
        "tokens": float(sums[-1]),
    }


def row(label: str, recipe: Any, run: Any, times: list[float], scores: dict) -> dict[str, Any]:
    sae = run.module.sae
    metrics = run.trainer.callback_metrics
    dead_key = next(k for k in metrics if k.startswith("train/dead_fraction_"))
    expander = recipe.model.encoder["name"] == "expander"
    d = recipe.model.encoder["d"] if expander else sae.d_in
    return {
        "label": label,
        "values": d * sae.d_sae,
        "ratio": sae.d_in / d,
        **scores,
        "dead": float(metrics[dead_key]),
        "dead_key": dead_key.removeprefix("train/"),
        "tokens_per_s": recipe.data["batch_size"] / statistics.median(times),
        "steps": int(run.trainer.global_step),
        "batch": int(recipe.data["batch_size"]),
    }


def table(rows: list[dict]) -> str:
    lines = [
        "| SAE | stored decoder values | m/d | held-out FVU | CE recovered | KL (nats/token) "
        f"| {rows[0]['dead_key']} | tokens/s |",
        "|---|---|---|---|---|---|---|---|",
    ]
    for r in rows:
        lines.append(
            f"| {r['label']} | {r['values']:,} | {r['ratio']:.0f}x | {r['fvu']:.3f} | "
            f"{r['ce_recovered']:.3f} | {r['kl']:.3f} | {r['dead']:.3f} | "
            f"{r['tokens_per_s']:,.0f} |"
        )
    return "\n".join(lines)


def svg(rows: list[dict]) -> str:
    """CE recovered against stored decoder values (log2 x axis); dense as a square."""
    w, h, left, right, top, bottom = 560, 300, 60, 20, 20, 50
    xs = [math.log2(r["values"]) for r in rows]
    x0, x1 = min(xs) - 0.5, max(xs) + 0.5
    lo = min(0.0, min(r["ce_recovered"] for r in rows))

    def px(v: float) -> float:
        return left + (v - x0) / (x1 - x0) * (w - left - right)

    def py(v: float) -> float:
        return top + (1 - (v - lo) / (1 - lo)) * (h - top - bottom)

    y_ticks = [(py(lo + (1 - lo) * i / 4), lo + (1 - lo) * i / 4) for i in range(5)]
    out = svg_frame(
        (w, h, left, right, top, bottom),
        y_ticks,
        [(px(x), label_of(r)) for r, x in zip(rows, xs, strict=True)],
        "stored decoder values (log scale)",
        "CE recovered, held out",
    )
    line = [(r, x) for r, x in zip(rows, xs, strict=True) if r["label"].startswith("expander")]
    pts = " ".join(f"{px(x):.1f},{py(r['ce_recovered']):.1f}" for r, x in line)
    out.append(f'<polyline points="{pts}" fill="none" stroke="#1f77b4"/>')
    for r, x in zip(rows, xs, strict=True):
        cx, cy = px(x), py(r["ce_recovered"])
        if r["label"].startswith("expander"):
            out.append(f'<circle cx="{cx:.1f}" cy="{cy:.1f}" r="3" fill="#1f77b4"/>')
        else:
            out.append(
                f'<rect x="{cx - 4:.1f}" y="{cy - 4:.1f}" width="8" height="8" '
                'fill="none" stroke="#d62728"/>'
            )
    out.append("</svg>")
    return "\n".join(out)


def write_doc(rows: list[dict], held: dict[str, Any], args: argparse.Namespace) -> None:
    r0 = rows[0]
    header = (
        f"Generated by `python benchmarks/expander_lm_frontier.py` ({r0['steps']} steps of "
        f"{r0['batch']:,} tokens per SAE = {r0['steps'] * r0['batch']:,} training tokens, "
        f"seed 0, torch threads: {torch.get_num_threads()}, torch {torch.__version__}, "
        f"CPU). Held out: {int(held['tokens']):,} predicted tokens in "
        f"{args.heldout_contexts} contexts of 256; CE clean {held['ce_clean']:.3f}, "
        f"zero-ablated {held['ce_zero']:.3f} nats/token. One seed."
    )
    write_frontier(DOC, (BEGIN, END), header, table(rows), svg(rows))


def main() -> None:
    parser = frontier_parser(__doc__.splitlines()[0], threads=2)
    parser.add_argument("--heldout-contexts", type=int, default=8, help="held-out contexts")
    parser.add_argument("--cache-only", action="store_true", help="harvest, then stop")
    parser.add_argument(
        "--max-contexts", type=int, default=None, help="cap the training corpus (quick check)"
    )
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    start = time.perf_counter()
    cache(args)
    print(f"cache ready after {time.perf_counter() - start:.0f} s", flush=True)
    if args.cache_only:
        return
    with tempfile.TemporaryDirectory() as tmp:
        args.output_dir = args.output_dir or tmp
        held = heldout(args, Path(tmp))
        rows = []
        for label, overrides in variants():
            if args.only and not any(o in label for o in args.only):
                continue
            recipe, run, times = train(label, overrides, args)
            scores = evaluate(run, held, args)
            rows.append(row(label, recipe, run, times, scores))
            r = rows[-1]
            print(
                f"{label}: fvu {r['fvu']:.3f} ce_rec {r['ce_recovered']:.3f} kl {r['kl']:.3f} "
                f"dead {r['dead']:.3f} {r['tokens_per_s']:,.0f} tok/s "
                f"({time.perf_counter() - start:.0f} s)",
                flush=True,
            )
    print(table(rows))
    print(json.dumps(rows))
    if not args.no_write and not args.only and not args.max_contexts and not args.steps:
        write_doc(rows, rows[-1], args)
        print(f"wrote {DOC}")


if __name__ == "__main__":
    main()
