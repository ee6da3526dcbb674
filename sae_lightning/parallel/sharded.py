"""The SAE's forward pass when each tensor-parallel rank holds a slice of the latents.

Parameters stay where the plugins put them (``sae.encoder.W_enc``...), so checkpoints keep the
one-process keys; :func:`shard_parameters` turns each per-latent parameter into a DTensor,
sharded along the latents over the ``tensor_parallel`` mesh dimension and replicated over
``data_parallel``. The decoder bias is replicated. The forward works on the local shards:

- encode: ``x @ W_enc[shard].T + b_enc[shard]``, no communication;
- select: TopK and BatchTopK as :mod:`.selection` describes; ReLU and JumpReLU need none;
- decode: each shard reconstructs its partial sum, one all-reduce sums them
  (:class:`~.comm.ReduceFromShards`);
- penalties that sum over latents (L1, L0) are partial sums, reduced the same way.

Everything downstream of the reconstruction is identical on the ranks of a tensor-parallel
group, so each computes the same loss and back-propagates into its own shard; the decoder bias
that centres the encoder's input gets its encoder-side gradient summed over the shards
(:class:`~.comm.CopyToShards`).
"""

from __future__ import annotations

from typing import NamedTuple

import torch
from torch import Tensor, nn
from torch.distributed.tensor import DTensor, Replicate, Shard

from sae_lightning.components.decoders.linear import LinearDecoder
from sae_lightning.components.encoders.linear import LinearEncoder
from sae_lightning.components.sparsity.batchtopk import BatchTopK
from sae_lightning.components.sparsity.jumprelu import JumpReLU, JumpReLUFunction, StepFunction
from sae_lightning.components.sparsity.relu import ReLUL1, warmup_factor
from sae_lightning.components.sparsity.topk import TopK
from sae_lightning.errors import ConfigError
from sae_lightning.kernels.decode import sparse_decode
from sae_lightning.parallel.comm import CopyToShards, ReduceFromShards, all_reduce
from sae_lightning.parallel.mesh import ShardLayout
from sae_lightning.parallel.selection import batch_topk_keep, batch_topk_threshold, sharded_topk
from sae_lightning.sae import SparseAutoencoder

SHARDED_PARAMETERS = ("encoder.W_enc", "encoder.b_enc", "decoder.W_dec", "sparsity.log_threshold")
"""Parameters with one row per latent: sharded. Every other parameter is replicated."""


SPARSITY_NAMES = "topk, batchtopk, relu, jumprelu"


def check_shardable(sae: SparseAutoencoder) -> None:
    """Refuse an SAE whose plugins the sharded forward does not implement.

    Raises:
        ConfigError: naming the recipe field to change.
    """
    supported = (
        ("encoder", sae.encoder, (LinearEncoder,), "linear"),
        ("decoder", sae.decoder, (LinearDecoder,), "linear"),
        (
            "sparsity",
            sae.sparsity,
            (TopK, BatchTopK, ReLUL1, JumpReLU),
            "topk, batchtopk, relu, jumprelu",
        ),
    )
    for role, plugin, classes, names in supported:
        if not isinstance(plugin, classes):
            raise ConfigError(
                f"model.{role}",
                f"'{sae.specs[role]['name']}' cannot be sharded over latents "
                f"(trainer.strategy: model_parallel supports {names})",
                "use one of those, or trainer.strategy: ddp",
            )


def local(t: Tensor) -> Tensor:
    """The local shard of a DTensor (differentiable), or ``t`` itself."""
    return t.to_local() if isinstance(t, DTensor) else t


@torch.no_grad()
def shard_parameters(sae: SparseAutoencoder, layout: ShardLayout) -> None:
    """Replace ``sae``'s parameters in place by DTensors on ``layout.mesh``.

    Every rank built the same full SAE from the same seed, so each keeps its own rows.
    """
    rows = slice(layout.offset, layout.offset + layout.shard_size)
    for name, param in list(sae.named_parameters()):
        if isinstance(param, DTensor):
            continue
        owner = sae.get_submodule(name.rpartition(".")[0])
        sharded = name in SHARDED_PARAMETERS
        data = param.detach()[rows].clone() if sharded else param.detach().clone()
        placements = [Replicate(), Shard(0) if sharded else Replicate()]
        dt = DTensor.from_local(data, layout.mesh, placements, run_check=False)
        setattr(owner, name.rpartition(".")[2], nn.Parameter(dt, requires_grad=param.requires_grad))


class ShardedOutput(NamedTuple):
    """One sharded forward pass, seen from one rank."""

    x_hat: Tensor
    """``(batch, d_in)`` the full reconstruction (identical on the tensor-parallel ranks)."""
    pre_acts: Tensor
    """``(batch, shard_size)`` this shard's encoder output, for AuxK."""
    penalties: dict[str, Tensor]
    """Sparsity penalties over all latents, weighted."""
    active: Tensor
    """``(batch,)`` this shard's active latents per row."""
    fire_counts: Tensor
    """``(shard_size,)`` rows each of this shard's latents was active in."""


def sharded_run(
    sae: SparseAutoencoder, x: Tensor, layout: ShardLayout, *, step: int, training: bool
) -> ShardedOutput:
    """Encode, select and decode ``x`` (this data-parallel rank's rows) on the local shard.

    A collective over the tensor-parallel group (and, for BatchTopK in training, the mesh).
    """
    dec = sae.decoder
    pre = shard_pre_acts(sae, x, layout)  # (batch, shard_size)
    codes = shard_codes(sae, pre, layout, step=step, training=training)
    w_dec = local(dec.W_dec)
    if codes.indices is not None:  # TopK: (batch, k) values of this shard's candidates
        values, indices = codes.values, codes.indices
        # in the atoms' dtype (fp32 under bf16 autocast), as the one-process decoder does
        partial = sparse_decode(indices, values.to(w_dec.dtype), w_dec)
        fired = (values != 0).long()
        fire_counts = torch.zeros(layout.shard_size, dtype=torch.long, device=x.device)
        fire_counts.scatter_add_(0, indices.reshape(-1), fired.reshape(-1))
        active = fired.sum(dim=1)
    else:
        partial = codes.values @ w_dec
        fired_dense = codes.values != 0
        active, fire_counts = fired_dense.sum(dim=1), fired_dense.sum(dim=0)
    # Partial sums are added in fp32 at least (a bf16 matmul's output is widened first).
    partial = partial.to(torch.promote_types(partial.dtype, torch.float32))
    x_hat = ReduceFromShards.apply(partial, layout.tp_group) + local(dec.b_dec)
    return ShardedOutput(x_hat, pre, codes.penalties, active, fire_counts)


def shard_pre_acts(sae: SparseAutoencoder, x: Tensor, layout: ShardLayout) -> Tensor:
    """``(batch, shard_size)`` this shard's encoder output; no communication forward."""
    enc, dec = sae.encoder, sae.decoder
    x_in = x - CopyToShards.apply(local(dec.b_dec), layout.tp_group) if enc.center_input else x
    return torch.addmm(local(enc.b_enc), x_in, local(enc.W_enc).t())


class ShardCodesOut(NamedTuple):
    """This shard's codes of a batch."""

    values: Tensor
    """``(batch, k)`` TopK candidates (0 where one lost globally), else ``(batch, shard_size)``."""
    indices: Tensor | None
    """``(batch, k)`` local latent ids of the TopK candidates; None for dense codes."""
    penalties: dict[str, Tensor]
    """Sparsity penalties over all latents, weighted."""


def shard_codes(
    sae: SparseAutoencoder, pre: Tensor, layout: ShardLayout, *, step: int, training: bool
) -> ShardCodesOut:
    """Select this shard's codes from its pre-activations (a collective for TopK, BatchTopK and
    the penalties' partial sums)."""
    sparsity = sae.sparsity
    penalties: dict[str, Tensor] = {}
    if isinstance(sparsity, TopK):
        codes = sharded_topk(pre, sparsity.config.k, layout)
        return ShardCodesOut(torch.relu(codes.values), codes.indices, penalties)
    if isinstance(sparsity, BatchTopK):
        acts = _batch_topk(sparsity, torch.relu(pre), layout, training)
    elif isinstance(sparsity, JumpReLU):
        theta, eps = local(sparsity.log_threshold).exp(), sparsity.config.bandwidth
        acts = JumpReLUFunction.apply(pre, theta, eps)
        l0 = StepFunction.apply(pre, theta, eps).sum(dim=1).mean()
        coeff = sparsity.config.l0_coefficient * warmup_factor(step, sparsity.config.warmup_steps)
        penalties["l0"] = coeff * ReduceFromShards.apply(l0, layout.tp_group)
    else:
        assert isinstance(sparsity, ReLUL1)
        acts = torch.relu(pre)
        if sparsity.config.weight_by_decoder_norm and not sae.decoder.config.unit_norm:
            l1 = (acts * local(sae.decoder.W_dec).norm(dim=1)).sum(dim=1).mean()
        else:  # unit-norm atoms weigh 1
            l1 = acts.sum(dim=1).mean()
        coeff = sparsity.config.l1_coefficient * warmup_factor(step, sparsity.config.warmup_steps)
        penalties["l1"] = coeff * ReduceFromShards.apply(l1, layout.tp_group)
    return ShardCodesOut(acts, None, penalties)


def _batch_topk(sparsity: BatchTopK, acts: Tensor, layout: ShardLayout, training: bool) -> Tensor:
    """BatchTopK codes of this shard: over the global batch in training (updating the running
    threshold), by the running threshold at inference."""
    k, batch = sparsity.config.k, acts.shape[0]
    if training:
        n_keep = k * batch * layout.dp_size
        threshold, smallest = batch_topk_threshold(acts, n_keep)
        with torch.no_grad():  # the plugin's running-threshold EMA
            old = sparsity.threshold
            ema = torch.where(
                old < 0, smallest, old + sparsity.config.threshold_momentum * (smallest - old)
            )
            old.copy_(torch.where(torch.isfinite(smallest), ema, old))
        return acts.masked_fill(~batch_topk_keep(acts, threshold, n_keep, layout), 0.0)
    if bool(sparsity.threshold >= 0):
        return acts * (acts > sparsity.threshold)
    threshold, _ = batch_topk_threshold(acts, k * batch, group=layout.tp_group)
    keep = batch_topk_keep(acts, threshold, k * batch, layout, layout.tp_group)
    return acts.masked_fill(~keep, 0.0)


def sharded_auxk(
    sae: SparseAutoencoder,
    pre_acts: Tensor,
    residual: Tensor,
    dead: Tensor,
    n_dead: int,
    variance: Tensor,
    layout: ShardLayout,
) -> dict[str, Tensor]:
    """AuxK (Gao et al. 2024) over the shards: the top ``k_aux`` dead latents of all shards
    decode the residual; ``{}`` when the plugin has no AuxK term.

    Args:
        pre_acts: ``(batch, shard_size)`` this shard's encoder output.
        residual: ``(batch, d_in)`` ``x - x_hat``, detached.
        dead: ``(shard_size,)`` bool, this shard's dead latents.
        n_dead: dead latents over all shards.
        variance: this data-parallel rank's share of the global batch's total variance.
    """
    sparsity = sae.sparsity
    if not isinstance(sparsity, TopK | BatchTopK) or sparsity.config.aux_coefficient == 0:
        return {}
    coefficient = sparsity.config.aux_coefficient
    k_aux = min(sparsity.k_aux, layout.d_sae)
    if n_dead == 0:
        return {"auxk": pre_acts.new_zeros(())}
    masked = torch.where(dead.unsqueeze(0), pre_acts, torch.full_like(pre_acts, -torch.inf))
    codes = sharded_topk(masked, k_aux, layout)
    w_dec = local(sae.decoder.W_dec)
    partial = sparse_decode(codes.indices, codes.values.to(w_dec.dtype), w_dec)
    e_hat = ReduceFromShards.apply(partial, layout.tp_group)
    scale = min(n_dead / k_aux, 1.0)
    term = scale * (e_hat - residual).pow(2).sum() / variance.clamp_min(1e-12)
    return {"auxk": coefficient * term}


def variance_share(x: Tensor, layout: ShardLayout) -> Tensor:
    """This data-parallel rank's share of the global batch's total variance (see
    :func:`sae_lightning.components.base.total_variance_share`), over the data-parallel group."""
    x = x.detach()
    stats = torch.cat([x.sum(dim=0), x.new_tensor([x.shape[0]])])
    all_reduce(stats, layout.dp_group, "dp")
    variance = (x - stats[:-1] / stats[-1]).pow(2).sum()
    return all_reduce(variance.view(1), layout.dp_group, "dp")[0] / layout.dp_size
