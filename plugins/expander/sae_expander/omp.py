"""Orthogonal matching pursuit (OMP) as an alternative encoder for a trained dictionary.

Paper Alg. 1 (rodrgo/expander-sae, inference/structured_omp.py): ``r = y - b_dec``; ``k`` times,
pick the atom with the largest correlation with ``r``, refit all picked atoms to ``y - b_dec`` by
least squares, and recompute ``r``. With the compact storage the correlation ``Wᵀ r`` is a
gather-and-reduce in ``O(batch * d_sae * d)`` instead of ``O(batch * d_sae * d_in)``; the
least-squares refit is unchanged, so the result equals dense OMP up to rounding.
"""

from __future__ import annotations

from collections.abc import Callable

import torch
from torch import Tensor, nn

from sae_expander.kernels import apply_a
from sae_lightning.components.base import Codes

Correlate = Callable[[Tensor], Tensor]
"""``(batch, d_in) -> (batch, d_sae)``: correlations of residuals with every atom."""
AtomColumns = Callable[[Tensor], Tensor]
"""``(batch,)`` latent ids -> ``(batch, d_in)`` those atoms, densely."""

_CHUNK_ELEMENTS = 1 << 24
"""Rows are processed in chunks whose picked-atom matrix ``(chunk, d_in, k)`` holds at most
this many elements (64 MiB in float32)."""


def omp(
    y: Tensor, k: int, correlate: Correlate, atom_columns: AtomColumns, signed: bool
) -> tuple[Tensor, Tensor]:
    """OMP on centred inputs ``y`` (``(batch, d_in)``).

    Args:
        y: inputs minus the decoder bias.
        k: atoms per row.
        correlate: the correlation step (compact or dense).
        atom_columns: the chosen atoms, densely, for the least-squares refit.
        signed: pick the largest signed correlation (the paper's code), else the largest |.|.

    Returns:
        ``(values, indices)``, both ``(batch, k)``: coefficients and atoms in the order picked.
    """
    batch, d_in = y.shape
    support = torch.zeros(batch, k, dtype=torch.long, device=y.device)
    picked = y.new_zeros(batch, d_in, k)  # (batch, d_in, k) chosen atoms as columns
    residual = y
    coef = y.new_zeros(batch, 0, 1)
    for t in range(k):
        score = correlate(residual)  # (batch, d_sae)
        if not signed:
            score = score.abs()
        if t:
            score.scatter_(1, support[:, :t], -torch.inf)  # never pick an atom twice
        support[:, t] = score.argmax(dim=1)
        picked[:, :, t] = atom_columns(support[:, t])
        basis = picked[:, :, : t + 1]
        coef = torch.linalg.lstsq(basis, y.unsqueeze(-1)).solution  # (batch, t + 1, 1)
        residual = y - (basis @ coef).squeeze(-1)
    return coef.squeeze(-1), support


def _chunked(
    y: Tensor, k: int, run: Callable[[Tensor], tuple[Tensor, Tensor]], d_sae: int
) -> Codes:
    step = max(1, _CHUNK_ELEMENTS // (y.shape[1] * k))
    parts = [run(y[s : s + step]) for s in range(0, max(y.shape[0], 1), step)]
    return Codes(torch.cat([p[0] for p in parts]), torch.cat([p[1] for p in parts]), d_sae)


def _check_k(k: int, d_in: int, d_sae: int) -> None:
    if not 0 < k <= min(d_in, d_sae):
        raise ValueError(
            f"OMP needs 0 < k <= min(d_in, d_sae) = {min(d_in, d_sae)} (more atoms than input "
            f"dimensions cannot be refitted), got k={k}"
        )


@torch.no_grad()
def omp_compact(decoder: nn.Module, x: Tensor, k: int, *, signed: bool = True) -> Codes:
    """OMP on an ``expander`` decoder, correlating through the compact ``(values, rows)``."""
    enc = decoder.expander  # type: ignore[attr-defined]
    _check_k(k, decoder.d_in, decoder.d_sae)  # type: ignore[arg-type]
    w = enc.normalized_values()  # (d_sae, d)
    layout = enc.layout
    y = x.to(w.dtype) - decoder.b_dec  # type: ignore[operator]

    def atom_columns(j: Tensor) -> Tensor:
        return w.new_zeros(j.shape[0], decoder.d_in).scatter_(1, layout.rows[j], w[j])  # type: ignore[call-overload]

    return _chunked(
        y,
        k,
        lambda yc: omp(yc, k, lambda r: apply_a(r, w, layout), atom_columns, signed),
        enc.d_sae,
    )


@torch.no_grad()
def omp_dense(atoms: Tensor, b_dec: Tensor, x: Tensor, k: int, *, signed: bool = True) -> Codes:
    """OMP with a dense ``(d_sae, d_in)`` dictionary (any decoder's ``atoms()``)."""
    d_sae, d_in = atoms.shape
    _check_k(k, d_in, d_sae)
    y = x.to(atoms.dtype) - b_dec
    return _chunked(
        y, k, lambda yc: omp(yc, k, lambda r: r @ atoms.t(), lambda j: atoms[j], signed), d_sae
    )


def encode_omp(sae: nn.Module, x: Tensor, k: int, *, signed: bool = True) -> Codes:
    """Codes of ``x`` (``(batch, d_in)``) by OMP on ``sae``'s dictionary, ``k`` per row.

    An ``expander`` decoder correlates through its compact storage; any other decoder falls back
    to its dense ``atoms()``. Decode the result with ``sae.decode(codes)``.

    Args:
        sae: a :class:`sae_lightning.sae.SparseAutoencoder` (or anything with ``.decoder``).
        x: inputs, not centred (the decoder bias is subtracted here).
        k: atoms per row, at most ``min(d_in, d_sae)``.
        signed: pick by signed correlation (the paper's code) rather than its absolute value.

    Raises:
        ValueError: when ``k`` is out of range.
    """
    decoder = sae.decoder
    if hasattr(decoder, "encode_omp"):
        return decoder.encode_omp(x, k, signed=signed)
    return omp_dense(decoder.atoms().detach(), decoder.b_dec.detach(), x, k, signed=signed)
