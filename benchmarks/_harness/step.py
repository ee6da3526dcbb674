"""The project's bare training step and its floor, on synthetic batches.

The step is what ``SAEModule.training_step`` and the optimizer hooks do, without Lightning:
forward, loss terms, metrics and dead-latent counters (``SAEModule.compute_step``), backward,
the decoder's gradient projection, Adam (fused, as the module configures it) and the unit-norm
constraint. The floor is ``addmm(b_enc, x, W_enc.T)`` into a preallocated output, the one dense
product a TopK SAE cannot avoid.
"""

from __future__ import annotations

import argparse
import os
from typing import Any

DTYPES = {"fp32": "float32", "bf16": "bfloat16", "fp16": "float16"}
PRECISIONS = {"fp32": "32-true", "bf16": "bf16-true", "fp16": "16-true"}
"""``trainer.precision`` that trains in ``--dtype`` as the bare step does (weights included)."""


def add_shape_args(p: argparse.ArgumentParser) -> None:
    """The flags every step benchmark shares: shapes, steps, device, dtype, threads."""
    p.add_argument("--d-in", type=int, default=768)
    p.add_argument("--n-latents", type=int, default=16384)
    p.add_argument("--k", type=int, default=32)
    p.add_argument("--batch", type=int, default=4096)
    p.add_argument("--steps", type=int, default=10, help="timed rounds (each: floor + step)")
    p.add_argument("--warmup", type=int, default=3, help="untimed steps first")
    p.add_argument("--lr", type=float, default=2e-4)
    p.add_argument(
        "--dead-fraction",
        type=float,
        default=0.0,
        help="fraction of latents held dead, so AuxK does work (0: none, as in a fresh run)",
    )
    p.add_argument("--device", default="cpu")
    p.add_argument("--dtype", choices=sorted(DTYPES), default="fp32")
    p.add_argument(
        "--threads", type=int, default=None, help="torch threads (default: OMP_NUM_THREADS)"
    )
    p.add_argument("--seed", type=int, default=0)


def setup_torch(args: argparse.Namespace) -> Any:
    """Import torch with the requested threads; returns ``(torch, device, dtype)``."""
    if args.threads is not None:
        os.environ["OMP_NUM_THREADS"] = str(args.threads)
    import torch

    if args.threads is not None:
        torch.set_num_threads(args.threads)
    torch.manual_seed(args.seed)
    return torch, torch.device(args.device), getattr(torch, DTYPES[args.dtype])


def make_batches(args: argparse.Namespace, device: Any, dtype: Any, n: int = 4) -> list[Any]:
    """``n`` batches of synthetic activations (sparse superposition, known dictionary).

    Every contender of ``peers.py`` draws the same batches from the same seed.
    """
    import torch

    from sae_lightning.data.synthetic import SparseGenerativeModel, SyntheticConfig

    cfg = SyntheticConfig(d=args.d_in, n_active=16, batch_size=args.batch)
    model = SparseGenerativeModel(cfg, seed=args.seed)
    g = torch.Generator().manual_seed(args.seed)
    return [model.sample(args.batch, g).to(device=device, dtype=dtype) for _ in range(n)]


def dead_mask(args: argparse.Namespace, device: Any) -> Any:
    """``(n_latents,)`` bool: the first ``dead_fraction`` of latents, held dead every step."""
    import torch

    mask = torch.zeros(args.n_latents, dtype=torch.bool, device=device)
    mask[: int(args.dead_fraction * args.n_latents)] = True
    return mask


class Floor:
    """The encoder product alone: ``addmm(b_enc, x, W_enc.T)`` into a preallocated output."""

    def __init__(self, args: argparse.Namespace, x: Any) -> None:
        import torch

        self.x = x
        self.w = torch.randn(args.n_latents, args.d_in, device=x.device, dtype=x.dtype)
        self.b = torch.zeros(args.n_latents, device=x.device, dtype=x.dtype)
        self.out = torch.empty(args.batch, args.n_latents, device=x.device, dtype=x.dtype)

    def __call__(self) -> None:
        import torch

        torch.addmm(self.b, self.x, self.w.t(), out=self.out)


def sparsity_spec(args: argparse.Namespace) -> dict[str, Any]:
    """The recipe's ``model.sparsity`` for ``--plugin`` (``k`` for the TopK family)."""
    plugin = getattr(args, "plugin", "topk")
    if plugin in ("topk", "batchtopk"):
        return {"name": plugin, "k": args.k}
    return {"name": plugin}


def build_module(args: argparse.Namespace, device: Any, dtype: Any) -> Any:
    """The ``SAEModule`` a recipe with these shapes builds (linear encoder and decoder)."""
    from sae_lightning.module import SAEModule

    module = SAEModule(
        args.d_in,
        args.n_latents,
        {"name": "linear"},
        {"name": "linear"},
        sparsity_spec(args),
        optimizer={"lr": args.lr},
    )
    return module.to(device=device, dtype=dtype)


class ProjectStep:
    """``SAEModule.compute_step`` (what ``training_step`` runs before logging) + backward +
    the optimizer hooks, called directly (no Lightning).

    The optimizer is the one ``SAEModule.configure_optimizers`` builds: Adam, fused where the
    device supports it. ``fused`` selects the sparse TopK path or the dense reference path.
    """

    def __init__(
        self, args: argparse.Namespace, batches: list[Any], *, fused: bool, compile: bool = False
    ) -> None:
        import torch

        self.batches = batches
        self.device = batches[0].device
        self.module = build_module(args, self.device, batches[0].dtype)
        self.sae = self.module.sae
        self.sae.fused = fused
        cfg = self.module.optimizer_config
        params = [p for p in self.module.parameters() if p.requires_grad]
        self.optimizer = torch.optim.Adam(
            params,
            lr=cfg.lr,
            betas=cfg.betas,
            eps=cfg.eps,
            fused=self.device.type in ("cpu", "cuda"),
        )
        self.dead = dead_mask(args, self.device)
        self.hold_dead = bool(self.dead.any())
        self.t = 0
        self.losses = torch.compile(self._losses) if compile else self._losses

    def _losses(self, x: Any) -> Any:
        # The module's own step: forward, loss terms, metrics and dead-latent counters.
        return self.module.compute_step(x, step=self.t).loss

    def __call__(self) -> Any:
        x = self.batches[self.t % len(self.batches)]
        if self.hold_dead:  # hold the chosen latents dead, so that AuxK has work
            self.module.tokens_since_fired.masked_fill_(self.dead, 2**40)
        loss = self.losses(x)
        loss.backward()
        self.sae.before_optimizer_step()
        self.optimizer.step()
        self.sae.after_optimizer_step()
        self.optimizer.zero_grad(set_to_none=True)
        self.t += 1
        return loss
