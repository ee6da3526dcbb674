"""SAELens's on-disk format: ``cfg.json`` + ``sae_weights.safetensors`` (SAELens 6.x layout).

Tensors, in SAELens's own names and shapes: ``W_enc (d_in, d_sae)``, ``b_enc (d_sae,)``,
``W_dec (d_sae, d_in)``, ``b_dec (d_in,)`` and, for ``jumprelu``, ``threshold (d_sae,)``.
SAELens encodes ``act((x - b_dec * apply_b_dec_to_input) @ W_enc + b_enc)`` with ``act`` ReLU
(``standard``), ReLU of the top ``k`` (``topk``) or ``ReLU(h) * (h > ReLU(threshold))``
(``jumprelu``), and decodes ``f @ W_dec + b_dec``; see ``sae_lens/saes/*.py``.

Exports are inference files: training-only settings (penalty coefficients, AuxK, schedules)
have no place in them and are not written.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

import torch

from sae_lightning.formats.common import (
    AffineSAE,
    FormatError,
    UnsupportedArchitectureError,
    affine_parts,
)
from sae_lightning.formats.files import SAEFiles, check_tensors, load_affine_sae, write_sae_files

FILES = SAEFiles("cfg.json", "sae_weights.safetensors", "an SAELens SAE directory")
LAYOUT_VERSION = "6.0.0"
"""Written as ``metadata.sae_lens_version``: SAELens reads configs older than 6.0 through a
legacy converter, so this marks the file as the 6.x layout it follows."""

_ARCHITECTURE = {"relu": "standard", "topk": "topk", "jumprelu": "jumprelu"}
_ACTIVATION = {v: k for k, v in _ARCHITECTURE.items()}


def export_saelens(
    sae: torch.nn.Module, directory: str | os.PathLike[str], **provenance: Any
) -> Path:
    """Write ``sae`` as an SAELens SAE: ``cfg.json`` and ``sae_weights.safetensors``.

    Args:
        sae: a :class:`~sae_lightning.sae.SparseAutoencoder`.
        directory: created if missing; the two files are written atomically.
        provenance: extra JSON stored under the top-level ``sae_lightning`` key, which SAELens
            ignores (it keeps only its dataclass fields).

    Raises:
        UnsupportedArchitectureError: the SAE has no exact SAELens equivalent.
    """
    parts = affine_parts(sae, "SAELens")
    tensors = {
        "W_enc": parts.W_enc.t().contiguous(),  # SAELens: (d_in, d_sae)
        "b_enc": parts.b_enc,
        "W_dec": parts.W_dec,
        "b_dec": parts.b_dec,
    }
    if parts.activation == "jumprelu":
        assert parts.threshold is not None
        tensors["threshold"] = parts.threshold
    config: dict[str, Any] = {
        "architecture": _ARCHITECTURE[parts.activation],
        "d_in": parts.d_in,
        "d_sae": parts.d_sae,
        "dtype": "float32",
        "device": "cpu",
        "apply_b_dec_to_input": parts.center_input,
        "normalize_activations": "none",
        "reshape_activations": "none",
        "metadata": {"sae_lens_version": LAYOUT_VERSION, "sae_lens_training_version": None},
    }
    if parts.activation == "topk":
        # Our TopK selects on the raw pre-activations, as SAELens does without rescaling.
        config["k"] = parts.k
        config["rescale_acts_by_decoder_norm"] = False
    config["sae_lightning"] = _provenance(sae, provenance)
    return write_sae_files(directory, FILES, config, tensors)


def _provenance(sae: torch.nn.Module, extra: dict[str, Any]) -> dict[str, Any]:
    from sae_lightning._version import __version__

    info: dict[str, Any] = {"version": __version__, "source": sae.config_dict()}
    info.update(extra)
    return info


def load_saelens(
    path: str | os.PathLike[str],
    device: str | torch.device = "cpu",
    dtype: torch.dtype | None = None,
) -> torch.nn.Module:
    """Load an SAELens SAE directory as a :class:`~sae_lightning.sae.SparseAutoencoder`.

    Reads the ``standard``, ``topk`` and ``jumprelu`` architectures, with or without
    ``apply_b_dec_to_input``. A TopK SAE saved with ``rescale_acts_by_decoder_norm`` has its
    decoder norms folded into the encoder (SAELens's own ``fold_W_dec_norm``), which leaves its
    outputs unchanged; a ``finetuning_scaling_factor`` tensor is folded into ``W_dec``.

    Args:
        path: the directory, or its ``cfg.json`` or weights file.
        device: where to put the weights.
        dtype: the weights' dtype; None keeps the file's.

    Raises:
        FileNotFoundError: a file is missing.
        UnsupportedArchitectureError: the architecture or a setting has no equivalent here.
        FormatError: the files are inconsistent.
    """
    return load_affine_sae(path, FILES, saelens_parts, device, dtype)


def _architecture(config: dict[str, Any]) -> str:
    """The architecture key, including configs written before SAELens 6."""
    arch = config.get("architecture")
    if arch is None:  # pre-6 configs name the activation instead
        activation = config.get("activation_fn", config.get("activation_fn_str", "relu"))
        arch = "topk" if activation == "topk" else "standard"
    return str(arch)


def _topk_k(config: dict[str, Any]) -> int:
    k = config.get("k")
    if k is None:
        k = (config.get("activation_fn_kwargs") or {}).get("k")
    return int(k) if k is not None else 100  # SAELens's TopKSAEConfig default


def saelens_parts(
    config: dict[str, Any], tensors: dict[str, torch.Tensor], *, where: str
) -> AffineSAE:
    """Interpret an SAELens config and state dict; refuse what cannot be reproduced exactly.

    Args:
        config: the parsed ``cfg.json``.
        tensors: the weights, by SAELens name.
        where: the directory, for error messages.
    """
    arch = _architecture(config)
    if arch not in _ACTIVATION:
        raise UnsupportedArchitectureError(
            f"{where}: SAELens architecture '{arch}' is not supported; sae-lightning reads "
            f"{', '.join(sorted(_ACTIVATION))}"
        )
    norm = config.get("normalize_activations") or "none"
    if norm is False:
        norm = "none"
    if norm != "none":
        raise UnsupportedArchitectureError(
            f"{where}: normalize_activations='{norm}' rescales inputs at run time with a "
            "factor the files do not hold; fold it into the weights with SAELens "
            "(fold_activation_norm_scaling_factor) and save again"
        )
    try:
        d_in, d_sae = int(config["d_in"]), int(config["d_sae"])
    except KeyError as err:
        raise FormatError(f"{where}/{FILES.config}: missing key {err}") from None
    tensors = dict(tensors)
    if "log_threshold" in tensors and "threshold" not in tensors:  # older JumpReLU files
        tensors["threshold"] = tensors.pop("log_threshold").exp()
    expected = {"W_enc": (d_in, d_sae), "b_enc": (d_sae,), "W_dec": (d_sae, d_in), "b_dec": (d_in,)}
    if arch == "jumprelu":
        expected["threshold"] = (d_sae,)
    scales = [
        tensors.pop(n) for n in ("finetuning_scaling_factor", "scaling_factor") if n in tensors
    ]
    if len(scales) > 1:
        raise FormatError(
            f"{where}/{FILES.weights}: both finetuning_scaling_factor and "
            "scaling_factor are present; keep one"
        )
    scale = scales[0] if scales else None
    check_tensors(f"{where}/{FILES.weights}", tensors, expected, f"a '{arch}' SAE")
    W_dec = tensors["W_dec"]
    if scale is not None and tuple(scale.shape) != (d_sae,):
        raise FormatError(
            f"{where}/{FILES.weights}: the scaling factor has shape {tuple(scale.shape)}, "
            f"expected ({d_sae},)"
        )
    if scale is not None:  # decode(f) = (f * scale) @ W_dec = f @ (scale[:, None] * W_dec)
        W_dec = W_dec * scale.reshape(-1, 1)
    W_enc, b_enc = tensors["W_enc"].t().contiguous(), tensors["b_enc"]
    if arch == "topk" and config.get("rescale_acts_by_decoder_norm", False):
        # topk(h * n) decoded as (f / n) @ W_dec: fold n into the encoder (SAELens _fold_norm_topk).
        n = W_dec.double().norm(dim=1).clamp_min(1e-8)
        W_enc = (W_enc.double() * n[:, None]).float()
        b_enc = (b_enc.double() * n).float()
        W_dec = (W_dec.double() / n[:, None]).float()
    return AffineSAE(
        W_enc,
        b_enc,
        W_dec.contiguous(),
        tensors["b_dec"],
        bool(config.get("apply_b_dec_to_input", True)),
        _ACTIVATION[arch],
        _topk_k(config) if arch == "topk" else None,
        tensors["threshold"].clamp_min(0) if arch == "jumprelu" else None,
    )
