"""What every peer format needs from an SAE: its affine maps and its sparsity, checked.

SAELens and sparsify store an SAE as plain tensors (``W_enc``, ``b_enc``, ``W_dec``, ``b_dec``
and, for JumpReLU, ``threshold``) plus a config naming the activation function. This module
reads those tensors out of any :class:`~sae_lightning.sae.SparseAutoencoder` whose encoder is
affine and whose decoder is ``codes @ atoms + b_dec`` (it checks both on probe inputs rather
than trusting class names), maps the sparsity plugin onto the activations the peers know, and
builds an SAE back from such tensors.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, replace
from typing import Any, Literal

import torch
from torch import Tensor

from sae_lightning.components.base import Codes
from sae_lightning.errors import SaeLightningError

Activation = Literal["relu", "topk", "jumprelu"]
"""The activations both this package and the peer formats can express exactly."""

SUPPORTED = (
    "relu -> 'standard', topk -> 'topk', jumprelu -> 'jumprelu', "
    "batchtopk -> 'jumprelu' with one global threshold, and any plugin that declares its "
    "equivalent with SparsityFn.peer_activation()"
)
"""Human-readable list of the sparsity plugins the SAELens export accepts."""


class FormatError(SaeLightningError):
    """A file does not follow the format it claims, or holds something we cannot represent."""


class UnsupportedArchitectureError(FormatError):
    """The SAE cannot be written in (or read from) the requested format without changing it."""


@dataclass(frozen=True)
class AffineSAE:
    """An SAE as the peer formats see it, every tensor float32 on the CPU.

    ``encode(x) = act(W_enc (x - b_dec [if center_input]) + b_enc)`` and
    ``decode(f) = f @ W_dec + b_dec``.
    """

    W_enc: Tensor
    """``(d_sae, d_in)`` encoder matrix, one row per latent (this package's layout)."""
    b_enc: Tensor
    """``(d_sae,)`` encoder bias."""
    W_dec: Tensor
    """``(d_sae, d_in)`` dictionary, one atom per row."""
    b_dec: Tensor
    """``(d_in,)`` decoder bias."""
    center_input: bool
    """Whether ``b_dec`` is subtracted from inputs before encoding."""
    activation: Activation
    """Which activation follows the encoder."""
    k: int | None = None
    """Active latents per row, for ``topk``."""
    threshold: Tensor | None = None
    """``(d_sae,)`` non-negative thresholds, for ``jumprelu``."""

    @property
    def d_in(self) -> int:
        return int(self.W_enc.shape[1])

    @property
    def d_sae(self) -> int:
        return int(self.W_enc.shape[0])

    def uncentered(self) -> AffineSAE:
        """The same SAE with the input centring folded into the encoder bias.

        ``W (x - b_dec) + b = W x + (b - W b_dec)``: exact in real arithmetic, a rounding of
        ``b_enc`` in float32 (computed in float64, so within one ulp of the exact fold).
        """
        if not self.center_input:
            return self
        folded = self.b_enc.double() - self.W_enc.double() @ self.b_dec.double()
        return replace(self, b_enc=folded.float(), center_input=False)

    def centered(self) -> AffineSAE:
        """The same SAE written with centred inputs: ``W x + b = W (x - b_dec) + (b + W b_dec)``."""
        if self.center_input:
            return self
        folded = self.b_enc.double() + self.W_enc.double() @ self.b_dec.double()
        return replace(self, b_enc=folded.float(), center_input=True)


# ---- reading an SAE --------------------------------------------------------------------------


def _probe(d: int, rows: int = 16, seed: int = 1234) -> Tensor:
    return torch.randn(rows, d, generator=torch.Generator().manual_seed(seed))


def _check_close(what: str, got: Tensor, want: Tensor, fix: str) -> None:
    scale = float(want.abs().max().clamp_min(1.0))
    err = float((got - want).abs().max())
    if not math.isfinite(err) or err > 1e-3 * scale:  # loose enough for TF32 matmuls
        raise UnsupportedArchitectureError(
            f"{what} (max deviation {err:.3g} on probe inputs); {fix}"
        )


@torch.no_grad()
def affine_parts(sae: torch.nn.Module, target: str) -> AffineSAE:
    """Read ``sae``'s tensors as a peer format stores them.

    Args:
        sae: a :class:`~sae_lightning.sae.SparseAutoencoder`.
        target: the format's name, for error messages.

    Raises:
        UnsupportedArchitectureError: the encoder is not affine, the decoder is not linear, or
            the sparsity function has no equivalent in ``target``.
    """
    encoder, decoder = sae.encoder, sae.decoder
    affine = encoder.affine()
    if affine is None:
        raise UnsupportedArchitectureError(
            f"encoder {type(encoder).__name__} exposes no weight matrix; {target} stores a dense "
            "linear encoder W_enc, so only affine encoders can be exported"
        )
    weight = affine[0]
    d_in, d_sae = int(sae.d_in), int(sae.d_sae)
    zero = torch.zeros(1, d_in, dtype=weight.dtype, device=weight.device)
    bias = encoder(zero).squeeze(0).detach().float().cpu()  # exact: W 0 + b = b
    weight = weight.detach().float().cpu()
    x = _probe(d_in)
    _check_close(
        f"encoder {type(encoder).__name__} is not affine",
        encoder(x.to(zero)).float().cpu(),
        x @ weight.t() + bias,
        f"{target} can only express W_enc x + b_enc",
    )
    atoms = decoder.atoms().detach().float().cpu()
    b_dec = decoder.b_dec.detach().float().cpu()
    codes = torch.relu(_probe(d_sae, seed=99))
    _check_close(
        f"decoder {type(decoder).__name__} is not codes @ atoms + b_dec",
        decoder(Codes(codes.to(decoder.b_dec), None, d_sae)).float().cpu(),
        codes @ atoms + b_dec,
        f"{target} can only express a linear dictionary",
    )
    activation, k, threshold, bias_shift = sparsity_of(sae, target)
    return AffineSAE(
        weight.contiguous(),
        (bias + bias_shift).contiguous(),
        atoms.contiguous(),
        b_dec.contiguous(),
        bool(encoder.center_input),
        activation,
        k,
        threshold,
    )


def sparsity_of(
    sae: torch.nn.Module, target: str
) -> tuple[Activation, int | None, Tensor | None, Tensor]:
    """Map the SAE's sparsity plugin onto ``(activation, k, threshold, bias shift)``.

    The plugin declares its equivalent (``SparsityFn.peer_activation``); the declaration is
    checked on probe pre-activations, so a plugin that computes something else (e.g. a
    subclass of TopK that shifts its inputs) is refused instead of exported wrongly.

    Raises:
        UnsupportedArchitectureError: the plugin declares no equivalent, cannot state it yet
            (a BatchTopK SAE whose inference threshold was never measured), or does not
            compute what it declares.
    """
    sparsity = sae.sparsity
    kind = type(sparsity)
    name = f"sparsity '{sae.spec.sparsity.get('name', kind.__name__)}'"
    where = f"{name} ({kind.__module__}.{kind.__name__})"
    try:
        peer = sparsity.peer_activation()
    except ValueError as err:
        raise UnsupportedArchitectureError(f"{err} ({target})") from None
    if peer is None:
        raise UnsupportedArchitectureError(
            f"{where} has no {target} equivalent; supported: {SUPPORTED}"
        )
    d_sae = int(sae.d_sae)
    shift = torch.as_tensor(peer.bias_shift, dtype=torch.float32).expand(d_sae).clone()
    threshold = None
    if peer.threshold is not None:
        threshold = peer.threshold.detach().float().cpu().expand(d_sae).contiguous()
    _check_declared_activation(sae, peer.activation, peer.k, threshold, shift, where, target)
    return peer.activation, peer.k, threshold, shift


def _check_declared_activation(
    sae: torch.nn.Module,
    activation: Activation,
    k: int | None,
    threshold: Tensor | None,
    shift: Tensor,
    where: str,
    target: str,
) -> None:
    """Compare the plugin's inference codes with the declared activation on probe inputs."""
    sparsity, d_sae = sae.sparsity, int(sae.d_sae)
    z = _probe(d_sae, seed=7) * 2
    h = z + shift
    if activation == "topk":
        if k is None or not 0 < k <= d_sae:
            raise UnsupportedArchitectureError(f"{where} declares topk with k={k}")
        values, indices = h.topk(k, dim=1)
        want = torch.zeros_like(h).scatter(1, indices, torch.relu(values))
    elif activation == "jumprelu":
        if threshold is None:
            raise UnsupportedArchitectureError(f"{where} declares jumprelu without thresholds")
        want = torch.relu(h) * (h > torch.relu(threshold))
    else:
        want = torch.relu(h)
    training = sparsity.training
    sparsity.eval()  # inference codes, and no running statistics updated
    try:
        param = next(iter(sparsity.parameters()), sae.decoder.b_dec)
        got = sparsity(z.to(param), step=0, decoder=sae.decoder).codes.dense().float().cpu()
    finally:
        sparsity.train(training)
    _check_close(
        f"{where} does not compute the {target} activation it declares ({activation})",
        got,
        want,
        f"supported: {SUPPORTED}",
    )


# ---- building an SAE -------------------------------------------------------------------------


@torch.no_grad()
def build_sae(
    parts: AffineSAE, *, where: str, dtype: torch.dtype = torch.float32
) -> torch.nn.Module:
    """A :class:`~sae_lightning.sae.SparseAutoencoder` computing exactly what ``parts`` describe.

    Args:
        parts: the tensors and activation, read from a peer format.
        where: the file they came from, for error messages.
        dtype: the SAE's dtype (the file's, so a bf16 SAE selects the latents its library does).
    """
    from sae_lightning.sae import SparseAutoencoder

    unit = bool(((parts.W_dec.norm(dim=1) - 1).abs() < 1e-5).all())
    sparsity: dict[str, Any] = {"name": parts.activation}
    if parts.activation == "topk":
        if parts.k is None or not 0 < parts.k <= parts.d_sae:
            raise FormatError(f"{where}: k={parts.k} is not in 1..d_sae={parts.d_sae}")
        sparsity["k"] = parts.k
    sae = SparseAutoencoder(
        parts.d_in,
        parts.d_sae,
        {"name": "linear", "center_input": parts.center_input},
        {"name": "linear", "unit_norm": unit, "project_gradients": unit},
        sparsity,
        field_prefix=where,
    )
    state = {
        "encoder.W_enc": parts.W_enc,
        "encoder.b_enc": parts.b_enc,
        "decoder.W_dec": parts.W_dec,
        "decoder.b_dec": parts.b_dec,
    }
    if parts.activation == "jumprelu":
        assert parts.threshold is not None
        # JumpReLU keeps log(theta); a zero threshold (plain ReLU gate) becomes log 0 = -inf.
        state["sparsity.log_threshold"] = parts.threshold.clamp_min(0).log()
    work = torch.float64 if dtype == torch.float64 else torch.float32
    sae.to(work)
    sae.load_state_dict({k: v.to(work).contiguous() for k, v in state.items()}, strict=True)
    return sae.to(dtype).eval()
