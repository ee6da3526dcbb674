"""BatchTopK (Bussmann et al. 2024): the top k x batch activations over the whole batch.

A variable number of latents is active per row while the average L0 is k in training.
At inference the batch dependence is replaced by a global threshold: an exponential moving
average of the smallest selected activation, as SAELens keeps it.

Selection keeps exactly the ``k x batch`` largest activations: every activation above the
``(k x batch)``-th largest one (the threshold), and of those equal to it, the first in
row-major order of the batch, as many as make ``k x batch`` (a stable sort's choice; ties are
rare with continuous inputs, but repeated rows, such as a language model's first token in every
context, tie whole rows). So the count is fixed, and the fused path's codes have a length known
in advance: nothing is read on the host in a training step.

The rule does not depend on how the batch is split, which is what makes data parallelism exact:
under DDP the batch is the GLOBAL one, in rank order. Each rank takes its local top
``k x global batch`` values, all-gathers them (values only, fp32; fp64 for fp64 activations)
and finds the global threshold; the ranks then all-gather two counts (entries above it, entries
equal to it), so each keeps the ties that precede the quota in the global order. W ranks select
exactly what one process selects on the concatenated batch, and every rank updates the running
threshold identically. This needs equal local batch sizes, as Lightning's DDP gives.

With a linear encoder the SAE calls :meth:`BatchTopK.fused_encode`: the same rule and the same
collectives on the sparse path of :mod:`sae_lightning.kernels.encode`, whose codes are flat
(:attr:`Codes.is_flat`: ``k x batch`` pairs in one row-major list with row offsets) and whose
backward touches only the kept entries. :meth:`BatchTopK.forward` is the dense path and the
reference it is tested against.
"""

from __future__ import annotations

import torch
import torch.distributed as dist
from pydantic import Field
from torch import Tensor

from sae_lightning.components.base import (
    AuxSource,
    Codes,
    Decoder,
    PeerActivation,
    SparsityOutput,
    data_parallel_world_size,
)
from sae_lightning.components.sparsity.auxk import AuxKConfig, AuxKSparsity
from sae_lightning.components.sparsity.topk import check_k
from sae_lightning.kernels.encode import (
    EncoderInputs,
    batch_topk_encode,
    batch_topk_encode_with_dead,
    threshold_encode,
)
from sae_lightning.kernels.select import QuotaFn, first_kept


class BatchTopKConfig(AuxKConfig):
    k: int = Field(32, gt=0, description="mean active latents per row (k x batch kept per batch)")
    threshold_momentum: float = Field(
        0.01, gt=0, le=1, description="EMA rate of the inference threshold (SAELens: 0.01)"
    )


def at_least_fp32(t: Tensor) -> Tensor:
    """``t`` in fp32, or as it is when wider (fp64): the threshold never rounds a kept value."""
    return t.to(torch.promote_types(t.dtype, torch.float32))


def batch_threshold(top: Tensor, n_keep: int, world: int) -> tuple[Tensor, Tensor]:
    """The global selection threshold from this rank's largest activations.

    Args:
        top: this rank's ``min(n_keep, local entries)`` largest non-negative activations, in
            any order, in fp32 or wider (:func:`at_least_fp32`).
        n_keep: entries kept over the global batch (``k x global batch``).
        world: DDP ranks taking part; above 1 this is a collective (every rank must call it):
            one all-gather of ``n_keep`` floats.

    Returns:
        ``(threshold, smallest)``, scalars of ``top``'s dtype: the ``n_keep``-th largest
        activation of the global batch, and the smallest positive one among the ``n_keep``
        largest (``inf`` when none is positive), which the running inference threshold follows.
    """
    if world > 1:
        if top.numel() < n_keep:  # d_sae < k * world: pad so every rank sends the same size
            top = torch.cat([top, top.new_full((n_keep - top.numel(),), -torch.inf)])
        gathered = [torch.empty_like(top) for _ in range(world)]
        dist.all_gather(gathered, top)
        # Every entry of the global top n_keep is in its own rank's local top n_keep.
        top = torch.cat(gathered).topk(n_keep, sorted=False).values
    if top.numel() == 0:  # an empty batch keeps nothing
        inf = top.new_full((), torch.inf)
        return inf, inf
    threshold = top.min()
    smallest = torch.where(top > 0, top, torch.full_like(top, torch.inf)).min()
    return threshold, smallest


def tie_quota(n_above: Tensor, tied: Tensor, n_keep: int, world: int) -> Tensor:
    """How many of this rank's entries equal to the threshold are kept (the first in row-major
    order; the ranks before this one in the global batch take theirs first).

    Args:
        n_above: this rank's entries above the threshold (0-dim).
        tied: bool mask of this rank's entries equal to the threshold.
        n_keep: entries kept over the global batch.
        world: DDP ranks taking part; above 1 this is a collective (every rank must call it):
            one all-gather of two counts.

    Returns:
        A 0-dim long, possibly negative (none) or above the number of ties (all).
    """
    if world == 1:
        return n_keep - n_above
    counts = torch.stack([n_above.long(), tied.sum()])
    gathered = [torch.empty_like(counts) for _ in range(world)]
    dist.all_gather(gathered, counts)
    table = torch.stack(gathered)  # (world, [above, tied])
    return n_keep - table[:, 0].sum() - table[: dist.get_rank(), 1].sum()


def batch_quota(n_keep: int, world: int) -> QuotaFn:
    """:func:`tie_quota` as a selection's ``quota_of``."""

    def quota_of(n_above: Tensor, tied: Tensor) -> Tensor:
        return tie_quota(n_above, tied, n_keep, world)

    return quota_of


def select_batch_topk(acts: Tensor, k: int, *, across_ranks: bool) -> tuple[Tensor, Tensor]:
    """Keep the ``k * batch`` largest entries of ``acts`` (batch, d_sae), ties by position.

    Args:
        acts: non-negative activations of this rank's rows.
        k: mean number of active latents per row.
        across_ranks: select over the global batch of all DDP ranks (a collective: every rank
            must call it); ignored without an initialised process group.

    Returns:
        ``(codes, smallest)``: the codes (same shape and dtype as ``acts``) and, as an fp32
        scalar (fp64 for fp64 ``acts``), the smallest positive kept value (``inf`` when nothing
        positive was kept).
    """
    world = data_parallel_world_size() if across_ranks else 1
    n_keep = k * acts.shape[0] * world
    flat = acts.detach().reshape(-1)
    m = min(n_keep, flat.numel())
    top = at_least_fp32(flat.topk(m, sorted=False).values)
    threshold, smallest = batch_threshold(top, n_keep, world)
    above = flat > threshold
    tied = flat == threshold
    quota = tie_quota(above.sum(), tied, n_keep, world)
    first = first_kept(tied, m, quota)  # the kept ties by position; numel in empty slots
    keep = torch.cat([above, above.new_zeros(1)]).index_fill_(0, first, True)[:-1]
    return acts.masked_fill(~keep.view_as(acts), 0.0), smallest


def batch_topk(acts: Tensor, k: int) -> Tensor:
    """Keep the ``k * batch`` largest entries of ``acts`` (batch, d_sae) (ties by position),
    zero the rest."""
    return select_batch_topk(acts, k, across_ranks=False)[0]


class BatchTopK(AuxKSparsity[BatchTopKConfig]):
    """BatchTopK: top k x batch ReLU activations per batch; a running threshold at inference."""

    auxk_owner = "BatchTopK"

    def __init__(self, config: BatchTopKConfig, *, d_in: int, d_sae: int) -> None:
        super().__init__(config, d_in=d_in, d_sae=d_sae)
        check_k(config.k, d_sae)
        # Negative means "not measured yet"; inference then falls back to batch selection.
        # Kept in fp32 whatever the training precision.
        self.register_buffer("threshold", torch.tensor(-1.0))

    def forward(self, pre_acts: Tensor, *, step: int, decoder: Decoder) -> SparsityOutput:
        acts = torch.relu(pre_acts)
        if self.training:
            codes, smallest = select_batch_topk(acts, self.config.k, across_ranks=True)
            self._update_threshold(smallest)
        elif bool(self.threshold >= 0):
            codes = acts * (acts > self.threshold)
        else:
            codes = batch_topk(acts, self.config.k)
        return SparsityOutput(Codes(codes, None, self.d_sae), {})

    def fused_select(
        self, inputs: EncoderInputs, dead: Tensor | None, width: int
    ) -> SparsityOutput:
        """The rule of :meth:`forward` on the sparse path, without ``(batch, d_sae)`` codes.

        Training selects over the global batch (the same all-gather as :meth:`forward`) and
        updates the running threshold; inference keeps what exceeds the measured threshold, or,
        before one is measured, selects over the batch alone.

        Args:
            inputs: the linear encoder's input, centring shift, weight and bias.
            dead, width: the ``(d_sae,)`` dead mask, when in training AuxK's top ``width`` dead
                latents per row are selected from the same product.

        Returns:
            Flat codes (:attr:`Codes.is_flat`) of ``k x batch`` slots, or, with a measured
            threshold at inference, codes padded to the widest row (padded slots are zeros at
            latent 0); the ``aux_source`` is AuxK's selection when it was made, else
            ``inputs`` (the pre-activations are never materialised).
        """
        k, batch = self.config.k, inputs.x.shape[0]
        source: AuxSource = inputs
        offsets = None
        if self.training:
            world = data_parallel_world_size()
            n_keep = k * batch * world

            def threshold_of(top: Tensor) -> Tensor:
                threshold, smallest = batch_threshold(at_least_fp32(torch.relu(top)), n_keep, world)
                self._update_threshold(smallest)
                return threshold

            quota_of = batch_quota(n_keep, world)
            if dead is None:
                values, indices, offsets = batch_topk_encode(
                    inputs, n_keep, threshold_of=threshold_of, quota_of=quota_of
                )
            else:
                values, indices, offsets, source = batch_topk_encode_with_dead(
                    inputs, n_keep, dead, width, threshold_of=threshold_of, quota_of=quota_of
                )
        elif bool(self.threshold >= 0):
            values, indices, _ = threshold_encode(inputs, self.threshold)
        else:

            def local_threshold(top: Tensor) -> Tensor:
                return batch_threshold(at_least_fp32(torch.relu(top)), k * batch, 1)[0]

            values, indices, offsets = batch_topk_encode(
                inputs, k * batch, threshold_of=local_threshold
            )
        codes = Codes(torch.relu(values), indices, self.d_sae, offsets)
        return SparsityOutput(codes, {}, source)

    @torch.no_grad()
    def _update_threshold(self, smallest: Tensor) -> None:
        has_any = torch.isfinite(smallest)
        old = self.threshold
        ema = torch.where(
            old < 0, smallest, old + self.config.threshold_momentum * (smallest - old)
        )
        self.threshold.copy_(torch.where(has_any, ema, old))

    def peer_activation(self) -> PeerActivation:
        """JumpReLU with the running inference threshold for every latent (SAELens has no
        BatchTopK at inference: it is that threshold rule).

        Raises:
            ValueError: the threshold was never measured (no training step).
        """
        theta = float(self.threshold)
        if theta < 0:
            raise ValueError(
                "this BatchTopK SAE has no inference threshold yet (it is set during training); "
                "the peer formats store BatchTopK as JumpReLU with that global threshold, so "
                "train it for at least one step before exporting"
            )
        return PeerActivation("jumprelu", threshold=torch.full((self.d_sae,), theta))
