"""Side by side: the project's TopK training step, EleutherAI sparsify's and SAELens's.

Each contender runs in its own subprocess (so peak memory is its own) with the same threads,
dtype, shapes and synthetic batches, and times its step in alternating rounds with the same
floor (the encoder product alone) as ``train_step.py`` (both from ``_harness``). The table
gives tokens/s, peak memory and each step's ratio to the floor measured in the same process;
the project's speed-up over a peer is given raw and floor-normalised (robust to load that
changed between subprocesses).

    make bench-peers                      # creates .venv-peers, then runs this
    .venv-peers/bin/python benchmarks/peers.py --d-in 768 --n-latents 16384 --k 32 \\
        --batch 4096 --threads 2

A peer whose package is not installed is listed as skipped. Fairness: every contender uses
``torch.optim.Adam(fused=True)``, fp32 (unless ``--dtype``), the same ``--threads``, AuxK on with
weight 1/32 and the same dead-latent mask; each keeps its own trainer's per-step extras
(sparsify: decoder renormalised before the forward and gradient projection; SAELens: gradient
clipping to norm 1, no projection since its TopK rescales by decoder norms).
"""

from __future__ import annotations

import argparse
import os
import statistics
import subprocess
import sys
from collections.abc import Callable
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent))

from _harness import (  # the benchmark folder is not a package
    Floor,
    MemoryMeter,
    ProjectStep,
    add_shape_args,
    dead_mask,
    describe_machine,
    emit,
    make_batches,
    measure_peak,
    setup_torch,
    timed_rounds,
)

AUXK_WEIGHT = 1 / 32
"""The project's default AuxK weight, given to every contender."""

CONTENDERS: dict[str, tuple[str, str]] = {
    "project": ("sae-lightning", "fused sparse TopK (sae_lightning/kernels/)"),
    "project-dense": ("sae-lightning", "dense reference path (sae.fused = False)"),
    "sparsify": ("eai-sparsify", "SparseCoder forward (FusedEncoder) + fvu + auxk"),
    "saelens": ("sae-lens", "TopKTrainingSAE.training_forward_pass, dense"),
    "saelens-sparse": (
        "sae-lens",
        "same, use_sparse_activations=True, rescale_acts_by_decoder_norm=False",
    ),
}


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    add_shape_args(p)
    p.add_argument(
        "--contenders",
        default="project,sparsify,saelens,saelens-sparse",
        help=f"comma-separated, from: {', '.join(CONTENDERS)}",
    )
    p.add_argument("--worker", choices=sorted(CONTENDERS), help=argparse.SUPPRESS)
    p.set_defaults(plugin="topk")  # what ProjectStep builds
    return p.parse_args(argv)


# ---- the peers' steps, each as its own trainer does it ---------------------------------------


class PeerStep:
    """What every peer's step keeps: its SAE and Adam, the batches it cycles through, and the
    latents held dead (so that AuxK has work)."""

    def __init__(self, args: argparse.Namespace, batches: list[Any], sae: Any) -> None:
        import torch

        self.sae = sae
        self.optimizer = torch.optim.Adam(sae.parameters(), lr=args.lr, fused=True)
        self.held_dead = dead_mask(args, batches[0].device)
        self.batches = batches
        self.t = 0

    def batch(self) -> Any:
        """This step's batch (the list cycles)."""
        return self.batches[self.t % len(self.batches)]


class SparsifyStep(PeerStep):
    """One step of sparsify's ``Trainer.fit`` for an autoencoder with the fvu loss."""

    def __init__(self, args: argparse.Namespace, batches: list[Any]) -> None:
        import torch
        from sparsify import SparseCoder, SparseCoderConfig

        device, dtype = batches[0].device, batches[0].dtype
        cfg = SparseCoderConfig(num_latents=args.n_latents, k=args.k)
        super().__init__(args, batches, SparseCoder(args.d_in, cfg, device=device, dtype=dtype))
        self.since_fired = torch.zeros(args.n_latents, dtype=torch.long, device=device)

    def __call__(self) -> Any:
        import torch

        x = self.batch()
        self.sae.set_decoder_norm_to_unit_norm()
        dead = (self.since_fired > 100_000) | self.held_dead
        out = self.sae(x, dead_mask=dead)
        loss = out.fvu + AUXK_WEIGHT * out.auxk_loss
        loss.backward()
        self.sae.remove_gradient_parallel_to_decoder_directions()
        self.optimizer.step()
        self.optimizer.zero_grad()
        with torch.no_grad():
            did_fire = torch.zeros_like(self.held_dead)
            did_fire[out.latent_indices.flatten()] = True
            self.since_fired += x.shape[0]
            self.since_fired[did_fire] = 0
        self.t += 1
        return loss


class SAELensStep(PeerStep):
    """One step of SAELens's ``SAETrainer._train_step`` for a TopK SAE."""

    def __init__(self, args: argparse.Namespace, batches: list[Any], *, sparse: bool) -> None:
        import torch
        from sae_lens import TopKTrainingSAE, TopKTrainingSAEConfig

        device, dtype = batches[0].device, batches[0].dtype
        cfg = TopKTrainingSAEConfig(
            d_in=args.d_in,
            d_sae=args.n_latents,
            k=args.k,
            dtype=str(dtype).removeprefix("torch."),
            device=str(device),
            use_sparse_activations=sparse,
            # The sparse option fails in backward with the decoder-norm rescaling (torch 2.13:
            # aten::view on a SparseCPU tensor), so it runs without it.
            rescale_acts_by_decoder_norm=not sparse,
            aux_loss_coefficient=AUXK_WEIGHT,
        )
        super().__init__(args, batches, TopKTrainingSAE(cfg))
        self.since_fired = torch.zeros(args.n_latents, device=device)

    def __call__(self) -> Any:
        import torch
        from sae_lens.saes.sae import TrainStepInput

        x = self.batch()
        self.sae.train()
        out = self.sae.training_forward_pass(
            step_input=TrainStepInput(
                sae_in=x,
                coefficients={},
                dead_neuron_mask=(self.since_fired > 100_000 // x.shape[0]) | self.held_dead,
                n_training_steps=self.t,
                is_logging_step=False,
            )
        )
        with torch.no_grad():
            did_fire = out.feature_acts.bool().float().sum(-2).bool()
            if did_fire.is_sparse:
                did_fire = did_fire.to_dense()
            self.since_fired += 1
            self.since_fired[did_fire] = 0
        out.loss.backward()
        torch.nn.utils.clip_grad_norm_(self.sae.parameters(), 1.0)
        self.optimizer.step()
        self.optimizer.zero_grad()
        self.t += 1
        return out.loss


def build_step(name: str, args: argparse.Namespace, batches: list[Any]) -> Callable[[], Any]:
    if name == "project":
        return ProjectStep(args, batches, fused=True)
    if name == "project-dense":
        return ProjectStep(args, batches, fused=False)
    if name == "sparsify":
        return SparsifyStep(args, batches)
    return SAELensStep(args, batches, sparse=name == "saelens-sparse")


def import_contender(name: str) -> None:
    import sae_lightning.module  # noqa: F401  (also the data generator of every contender)

    if name == "sparsify":
        import sparsify  # noqa: F401
    elif name.startswith("saelens"):
        import sae_lens  # noqa: F401


# ---- one contender per process --------------------------------------------------------------


def worker(args: argparse.Namespace) -> int:
    torch, device, dtype = setup_torch(args)
    name = args.worker
    try:  # import before the memory baseline, so that libraries do not count as the step's
        import_contender(name)
    except ImportError as err:
        emit("skipped", f"{type(err).__name__}: {err}".replace("\n", " "))
        return 0
    meter = MemoryMeter(device)
    batches = make_batches(args, device, dtype)
    step = build_step(name, args, batches)
    for _ in range(args.warmup):
        step()
    peak = measure_peak(meter, step, device)
    floor = Floor(args, batches[0])
    times = timed_rounds({"floor": floor, "step": step}, args.steps, device)
    floor_s = statistics.median(times["floor"])
    step_s = statistics.median(times["step"])
    emit("threads", torch.get_num_threads())
    emit("floor_s", floor_s)
    emit("step_s", step_s)
    emit("tokens_per_s", args.batch / step_s)
    emit("peak_mem_mb", peak)
    emit("best_floor_s", min(times["floor"]))
    emit("best_step_s", min(times["step"]))
    emit(
        "ratio_to_floor",
        statistics.median(f / s for f, s in zip(times["floor"], times["step"], strict=True)),
    )
    return 0


def worker_argv(args: argparse.Namespace) -> list[str]:
    """The shared flags of ``args`` (see ``add_shape_args``), for a worker's command line."""
    shared = argparse.ArgumentParser(add_help=False)
    add_shape_args(shared)
    argv: list[str] = []
    for action in shared._actions:
        value = getattr(args, action.dest)
        if value is not None:
            argv += [action.option_strings[0], str(value)]
    return argv


def run_worker(name: str, argv: list[str], args: argparse.Namespace) -> dict[str, str]:
    env = dict(os.environ)
    if args.device == "cpu":  # sparsify's Triton decoder is GPU-only
        env["SPARSIFY_DISABLE_TRITON"] = "1"
    threads = args.threads
    if threads is not None:
        env["OMP_NUM_THREADS"] = str(threads)
    proc = subprocess.run(
        [sys.executable, __file__, "--worker", name, *argv],
        env=env,
        capture_output=True,
        text=True,
        check=False,
    )
    result: dict[str, str] = {}
    for line in proc.stdout.splitlines():
        key, sep, value = line.partition("=")
        if sep and key.isidentifier():
            result[key] = value
    if proc.returncode != 0:
        tail = " | ".join(proc.stderr.strip().splitlines()[-3:])
        result["skipped"] = f"exit {proc.returncode}: {tail}"
    return result


def table(args: argparse.Namespace, results: dict[str, dict[str, str]]) -> list[str]:
    project = results.get("project", {})
    rows = [
        "| contender | package | code path | tokens/s | step s | floor s | floor / step "
        "| best step s | best floor s | peak MiB | project speed-up (raw, floor-normalised) |",
        "|---|---|---|---:|---:|---:|---:|---:|---:|---:|---|",
    ]
    for name, res in results.items():
        package, path = CONTENDERS[name]
        if "skipped" in res or "tokens_per_s" not in res:
            reason = res.get("skipped", "no result")
            rows.append(f"| {name} | {package} | skipped: {reason} | | | | | | | | |")
            continue
        speedup = ""
        if name != "project" and "tokens_per_s" in project:
            raw = float(project["tokens_per_s"]) / float(res["tokens_per_s"])
            norm = float(project["ratio_to_floor"]) / float(res["ratio_to_floor"])
            speedup = f"{raw:.2f}x, {norm:.2f}x"
        rows.append(
            f"| {name} | {package} | {path} | {float(res['tokens_per_s']):,.0f} "
            f"| {float(res['step_s']):.3f} | {float(res['floor_s']):.3f} "
            f"| {float(res['ratio_to_floor']):.3f} | {float(res['best_step_s']):.3f} "
            f"| {float(res['best_floor_s']):.3f} | {float(res['peak_mem_mb']):,.0f} | {speedup} |"
        )
    return rows


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    if args.worker:
        return worker(args)
    names = [n.strip() for n in args.contenders.split(",") if n.strip()]
    unknown = [n for n in names if n not in CONTENDERS]
    if unknown:
        raise SystemExit(f"--contenders: unknown {unknown}; choose from {', '.join(CONTENDERS)}")
    if "project" not in names:
        names.insert(0, "project")
    results = {name: run_worker(name, worker_argv(args), args) for name in names}

    machine = describe_machine()
    print(f"# {machine['cpu']}, torch {machine['torch']}, load {machine['load_avg_1m']}")
    print(
        f"# d_in={args.d_in} n_latents={args.n_latents} k={args.k} batch={args.batch} "
        f"dtype={args.dtype} device={args.device} threads={args.threads or 'default'} "
        f"steps={args.steps} dead_fraction={args.dead_fraction} optimizer=torch Adam(fused=True)"
    )
    print("\n".join(table(args, results)))
    project = results.get("project", {})
    peers = {
        n: r for n, r in results.items() if not n.startswith("project") and "tokens_per_s" in r
    }
    if "tokens_per_s" in project and peers:
        fastest = max(peers, key=lambda n: float(peers[n]["tokens_per_s"]))
        best = peers[fastest]
        emit("fastest_peer", fastest)
        emit(
            "speedup_vs_fastest_peer", float(project["tokens_per_s"]) / float(best["tokens_per_s"])
        )
        emit(
            "speedup_vs_fastest_peer_floor_normalised",
            float(project["ratio_to_floor"]) / float(best["ratio_to_floor"]),
        )
        emit(
            "speedup_vs_fastest_peer_best_rounds",
            float(best["best_step_s"]) / float(project["best_step_s"]),
        )
        emit("peak_mem_vs_fastest_peer", float(project["peak_mem_mb"]) / float(best["peak_mem_mb"]))
    if "tokens_per_s" in project:
        emit("tokens_per_s", float(project["tokens_per_s"]))
        emit("peak_mem_mb", float(project["peak_mem_mb"]))
        emit("ratio_to_floor", float(project["ratio_to_floor"]))
    return 0


if __name__ == "__main__":
    sys.exit(main())
