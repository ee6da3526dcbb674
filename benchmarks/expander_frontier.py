"""The storage-fidelity frontier: expander SAEs of degree d against a dense SAE, same data.

Trains ``recipes/expander-frontier.yaml`` once per variant (expander d in 4..128, where d = 128
is the full mask, and a dense untied SAE with the core ``linear`` encoder and decoder; all with
``signed_topk``), on the same synthetic ground-truth data, then writes a table and an SVG plot
between the ``frontier`` markers of ``docs/expander.md``.

    python benchmarks/expander_frontier.py                     # ~5 min on 2 CPU cores
    python benchmarks/expander_frontier.py --steps 300 --no-write   # a quick look

Columns: values learned for the dictionary, encoder included (tied expander ``d * d_sae``; dense
untied ``2 * d_in * d_sae``), the decoder storage ratio ``m / d``, final validation FVU with the
amortised encoder and with OMP on the same dictionary (``val/omp/fvu``), MMCS, the best MMCS any
``d``-sparse dictionary could reach on these true atoms, the fraction of true atoms recovered at
cosine >= 0.9, dead fractions, and training tokens/s (step time from batch start to batch end, i.e.
forward, backward and Adam; data generation and validation excluded).
"""

from __future__ import annotations

import argparse
import math
import re
import statistics
import tempfile
import time
import warnings
from pathlib import Path

import torch
from expander_common import StepTimer, frontier_parser, label_of, svg_frame, write_frontier

from sae_lightning.recipe import load_recipe
from sae_lightning.runner import build_run, finish

warnings.filterwarnings("ignore")

ROOT = Path(__file__).resolve().parents[1]
RECIPE = ROOT / "recipes" / "expander-frontier.yaml"
DOC = ROOT / "docs" / "expander.md"
BEGIN, END = "<!-- frontier:begin -->", "<!-- frontier:end -->"
DEGREES = (4, 8, 16, 32, 64, 128)


def variants() -> list[tuple[str, list[tuple[str, str]]]]:
    """``(label, overrides)`` per run; overrides are dotted recipe keys."""
    out = [(f"expander d={d}", [("model.encoder.d", str(d))]) for d in DEGREES]
    dense = [("model.encoder.name", "linear"), ("model.decoder.name", "linear")]
    return [*out, ("dense (linear/linear)", dense)]


def train(label: str, overrides: list[tuple[str, str]], args: argparse.Namespace) -> dict:
    common = [
        ("name", re.sub(r"[^A-Za-z0-9_.-]+", "-", label)),
        ("output_dir", args.output_dir),
        ("trainer.enable_progress_bar", "false"),
        ("trainer.enable_model_summary", "false"),
    ]
    if args.steps:
        common += [("trainer.max_steps", str(args.steps))]
    recipe = load_recipe([RECIPE], [*common, *overrides])
    run = build_run(recipe)
    timer = StepTimer()
    run.trainer.callbacks.append(timer)
    run.trainer.fit(run.module, datamodule=run.datamodule)
    metrics = finish(run)
    steps = timer.times[5:]  # the first steps warm up allocator and caches
    sae = run.module.sae
    d_in, d_sae = sae.d_in, sae.d_sae
    d = recipe.model.encoder.get("d") if recipe.model.encoder["name"] == "expander" else d_in
    dead_key = next(k for k in metrics if k.startswith("train/dead_fraction_"))
    # Best MMCS any d-sparse dictionary could reach: a true atom's cosine with a d-sparse unit
    # vector is at most the norm of its d largest coordinates (its support chosen freely).
    true = run.datamodule.generative.atoms.double()
    bound = true.abs().topk(d, dim=1).values.norm(dim=1).mean().item()
    return {
        "label": label,
        "d": d,
        # tied expander: d * d_sae values in all; dense untied: encoder and decoder matrices
        "values": d * d_sae if recipe.model.encoder["name"] == "expander" else 2 * d_in * d_sae,
        "ratio": d_in / d,
        "fvu": metrics["val/fvu"],
        "omp_fvu": metrics.get("val/omp/fvu", math.nan),
        "mmcs": metrics["val/mmcs"],
        "mmcs_bound": bound,
        "recovered": metrics["val/recovered_frac"],
        "dead_eval": metrics["val/dead_fraction_eval"],
        "dead_train": metrics[dead_key],
        "dead_key": dead_key,
        "tokens_per_s": recipe.data["batch_size"] * len(steps) / sum(steps),
        "step_ms": 1000 * statistics.median(steps),
        "steps": int(metrics["trainer/global_step"]),
    }


def table(rows: list[dict]) -> str:
    dead_key = rows[0]["dead_key"].removeprefix("train/")
    lines = [
        "| SAE | values learned (encoder + decoder) | decoder storage m/d | val FVU "
        "| val FVU, OMP | MMCS | MMCS bound | recovered (cos >= 0.9) | dead (val set) "
        f"| {dead_key} | tokens/s |",
        "|---|---|---|---|---|---|---|---|---|---|---|",
    ]
    for r in rows:
        lines.append(
            f"| {r['label']} | {r['values']:,} | {r['ratio']:.0f}x | {r['fvu']:.3f} | "
            f"{r['omp_fvu']:.3f} | {r['mmcs']:.3f} | {r['mmcs_bound']:.3f} | "
            f"{r['recovered']:.2f} | "
            f"{r['dead_eval']:.3f} | {r['dead_train']:.3f} | {r['tokens_per_s']:,.0f} |"
        )
    return "\n".join(lines)


def svg(rows: list[dict]) -> str:
    """FVU (amortised encoder and OMP) against values learned, log2 x axis, drawn by hand.

    Expanders are joined by a line; the dense SAE is a separate square marker.
    """
    w, h, left, right, top, bottom = 560, 300, 60, 20, 20, 50
    xs = [math.log2(r["values"]) for r in rows]
    x0, x1 = min(xs) - 0.5, max(xs) + 0.5
    y1 = max(max(r["fvu"], r["omp_fvu"]) for r in rows) * 1.1

    def px(v: float) -> float:
        return left + (v - x0) / (x1 - x0) * (w - left - right)

    def py(v: float) -> float:
        return top + (1 - v / y1) * (h - top - bottom)

    out = svg_frame(
        (w, h, left, right, top, bottom),
        [(py(y1 * i / 4), y1 * i / 4) for i in range(5)],
        [(px(x), label_of(r)) for r, x in zip(rows, xs, strict=True)],
        "values learned, encoder + decoder (log scale)",
        "validation FVU",
    )
    for key, colour in (("fvu", "#1f77b4"), ("omp_fvu", "#d62728")):
        line = [(r, x) for r, x in zip(rows, xs, strict=True) if r["label"].startswith("expander")]
        pts = " ".join(f"{px(x):.1f},{py(r[key]):.1f}" for r, x in line)
        out.append(f'<polyline points="{pts}" fill="none" stroke="{colour}"/>')
        for r, x in zip(rows, xs, strict=True):
            cx, cy = px(x), py(r[key])
            if r["label"].startswith("expander"):
                out.append(f'<circle cx="{cx:.1f}" cy="{cy:.1f}" r="3" fill="{colour}"/>')
            else:
                out.append(
                    f'<rect x="{cx - 4:.1f}" y="{cy - 4:.1f}" width="8" height="8" '
                    f'fill="none" stroke="{colour}"/>'
                )
    for i, (label, colour) in enumerate(
        (("amortised encoder", "#1f77b4"), ("OMP, same dictionary", "#d62728"))
    ):
        y = top + 8 + 16 * i
        out.append(f'<circle cx="{w - 170}" cy="{y}" r="4" fill="{colour}"/>')
        out.append(f'<text x="{w - 160}" y="{y + 4}">{label}</text>')
    out.append("</svg>")
    return "\n".join(out)


def write_doc(rows: list[dict], args: argparse.Namespace) -> None:
    steps = rows[0]["steps"]
    header = (
        f"Generated by `python benchmarks/expander_frontier.py` on {time.strftime('%Y-%m-%d')}"
        f" ({steps} steps of 1024 tokens per SAE, seed 0, torch threads: "
        f"{torch.get_num_threads()}, torch {torch.__version__}, CPU). One seed: the quality "
        "columns repeat exactly on rerun (tokens/s does not), but their spread over seeds "
        "was not measured."
    )
    write_frontier(DOC, (BEGIN, END), header, table(rows), svg(rows))


def main() -> None:
    # One thread is robust on a shared machine.
    args = frontier_parser(__doc__.splitlines()[0], threads=1).parse_args()
    torch.set_num_threads(args.threads)
    with tempfile.TemporaryDirectory() as tmp:
        args.output_dir = args.output_dir or tmp
        rows = []
        for label, overrides in variants():
            if args.only and not any(o in label for o in args.only):
                continue
            rows.append(train(label, overrides, args))
            r = rows[-1]
            print(
                f"{label}: fvu {r['fvu']:.3f} omp {r['omp_fvu']:.3f} mmcs {r['mmcs']:.3f} "
                f"dead {r['dead_eval']:.3f} {r['tokens_per_s']:,.0f} tok/s",
                flush=True,
            )
    print(table(rows))
    if not args.no_write and not args.only:
        write_doc(rows, args)
        print(f"wrote {DOC}")


if __name__ == "__main__":
    main()
