"""The values plugins hand each other and the core: codes, sparsity outputs, auxiliary-loss
sources, dead latents, peer activations and the slices a resampling hook rewrote.

Kept apart from the plugin base classes (:mod:`sae_lightning.components.base`, which re-exports
every name here) so that each file holds one concept.
"""

from __future__ import annotations

from typing import Literal, NamedTuple

import torch
from torch import Tensor, nn

from sae_lightning.kernels.encode import DeadSelection, EncoderInputs
from sae_lightning.kernels.select import pad_rows, rows_of


class Codes(NamedTuple):
    """Latent activations: dense, as ``k`` (index, value) pairs per row, or as one flat list.

    Sparse codes let decoders gather the active dictionary rows instead of multiplying by a
    dense ``(batch, d_sae)`` matrix that is mostly zeros. Rows with a varying number of active
    latents (BatchTopK in training) come *flat*: every row's pairs in one row-major list of a
    length fixed in advance, with the first entry of each row in ``offsets``, so that no shape
    depends on the data. Function-space SAEs produce *concept maps*: dense values
    ``(batch, d_sae, *grid)``, one function per latent (see :mod:`sae_lightning.functional`); a
    latent is then active in a sample when its map is nonzero anywhere.
    """

    values: Tensor
    """``(batch, k)`` when sparse, ``(entries,)`` when flat, ``(batch, d_sae)`` when dense,
    ``(batch, d_sae, *grid)`` for concept maps; zero means inactive (flat padding is zero)."""
    indices: Tensor | None
    """Latent ids of ``values`` (same shape) when sparse or flat; None when dense."""
    d_sae: int
    """Number of latents."""
    offsets: Tensor | None = None
    """``(batch,)`` first entry of each row when flat (``F.embedding_bag``'s ``offsets``:
    row ``b`` holds entries ``offsets[b]`` up to ``offsets[b + 1]``); None otherwise."""

    @property
    def is_sparse(self) -> bool:
        """True for ``(index, value)`` pairs, per row or flat."""
        return self.indices is not None

    @property
    def is_flat(self) -> bool:
        """True for one flat list of pairs with row ``offsets``."""
        return self.offsets is not None

    @property
    def is_map(self) -> bool:
        """True for concept maps ``(batch, d_sae, *grid)``."""
        return self.values.ndim > 2

    def rows(self) -> Tensor:
        """The row of each entry: ``(entries,)`` when flat, ``(batch, k)`` when sparse."""
        if self.offsets is not None:
            return rows_of(self.offsets, self.values.numel())
        batch, k = self.values.shape[:2]
        return torch.arange(batch, device=self.values.device).unsqueeze(1).expand(batch, k)

    def padded(self) -> Codes:
        """The same codes with ``(batch, k)`` pairs per row (rows padded to the widest): the
        layout decoders that do not take flat codes get; the width is read on the host."""
        if self.offsets is None:
            return self
        assert self.indices is not None
        values, indices = pad_rows(self.values, self.indices, self.rows(), len(self.offsets))
        return Codes(values, indices, self.d_sae)

    def _active(self) -> Tensor:
        """Which entries are active (anywhere, for maps): ``values``' shape less the grid."""
        if self.values.ndim > 2:
            return (self.values != 0).flatten(2).any(dim=2)
        return self.values != 0

    def _per_row(self, per_entry: Tensor) -> Tensor:
        """``(batch,)`` sums over each row of a per-entry quantity."""
        if self.offsets is None:
            return per_entry.sum(dim=1)
        out = per_entry.new_zeros(len(self.offsets))
        return out.index_add_(0, self.rows(), per_entry)

    def dense(self) -> Tensor:
        """The ``(batch, d_sae)`` activation matrix."""
        if self.indices is None:
            return self.values
        if self.offsets is not None:
            out = self.values.new_zeros(len(self.offsets), self.d_sae)
            return out.index_put((self.rows(), self.indices), self.values, accumulate=True)
        out = self.values.new_zeros(self.values.shape[0], self.d_sae)
        return out.scatter_add(1, self.indices, self.values)

    def l0(self) -> Tensor:
        """``(batch,)`` number of active latents per row (per sample, for concept maps)."""
        return self._per_row(self._active().long())

    def fire_counts(self) -> Tensor:
        """``(d_sae,)`` how many rows (samples, for concept maps) each latent was active in."""
        if self.indices is None:
            return self._active().sum(dim=0)
        counts = torch.zeros(self.d_sae, dtype=torch.long, device=self.values.device)
        active = (self.values != 0).long()
        return counts.scatter_add_(0, self.indices.reshape(-1), active.reshape(-1))

    def l1(self) -> Tensor:
        """``(batch,)`` L1 norm of each row; for maps, the sum of each map's integral of |z|."""
        if self.values.ndim > 2:
            return self.values.abs().flatten(2).mean(dim=2).sum(dim=1)
        return self._per_row(self.values.abs())


AuxSource = Tensor | EncoderInputs | DeadSelection
"""What a sparsity plugin's auxiliary loss starts from: the ``(batch, d_sae)`` pre-activations
(dense path), the linear encoder's inputs (fused path, which never materialises them), or the
dead latents the fused pass already selected from its own product (AuxK)."""


class DeadLatents(NamedTuple):
    """A training step's dead latents, known before its forward pass.

    The SAE hands them to a sparsity plugin's fused path, which may then select what its
    auxiliary loss needs from the product it computes anyway (AuxK's dead latents).
    """

    mask: Tensor
    """``(d_sae,)`` bool: the mask the step's ``auxiliary_losses`` receives (the same tensor)."""
    at_most: int | None = None
    """An upper bound on the latents ``mask`` marks, known on the host without reading the
    device (0: none can be dead yet), or None: the plugin may size its work by it."""


class SparsityOutput(NamedTuple):
    """What a sparsity function returns for one batch."""

    codes: Codes
    """The sparse latent activations."""
    losses: dict[str, Tensor]
    """Penalty terms already multiplied by their coefficients; each is added to the loss."""
    aux_source: AuxSource | None = None
    """What :meth:`SparsityFn.auxiliary_losses` of the same step needs; None lets the SAE pass
    the pre-activations (dense path). The SAE hands it back, so no plugin keeps state between
    the two calls."""


class PeerActivation(NamedTuple):
    """How a sparsity plugin is written in the peer formats (SAELens, sparsify), exactly.

    The exporter checks the declaration on probe inputs before it writes anything, so a
    plugin that declares a mapping it does not compute is refused, not exported wrongly.
    """

    activation: Literal["relu", "topk", "jumprelu"]
    """``relu`` (SAELens ``standard``), ``topk`` or ``jumprelu``: ``ReLU(z) * (z > threshold)``."""
    k: int | None = None
    """Active latents per row, for ``topk``."""
    threshold: Tensor | None = None
    """``(d_sae,)`` non-negative thresholds, for ``jumprelu``."""
    bias_shift: Tensor | float = 0.0
    """Added to the encoder bias ``b_enc`` on export: the plugin computes
    ``activation(z + bias_shift)`` (e.g. soft thresholding ``ReLU(z - t)``: ``relu``, ``-t``)."""


class Touched(NamedTuple):
    """A slice of one parameter rewritten in place by resampling.

    The resampler zeroes the optimizer state (Adam moments) of exactly this slice.
    """

    param: nn.Parameter
    """The parameter that was modified."""
    index: Tensor
    """``(n,)`` long ids along ``dim`` that were rewritten."""
    dim: int = 0
    """The dimension ``index`` selects along."""
