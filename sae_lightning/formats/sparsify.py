"""EleutherAI sparsify's on-disk format: ``cfg.json`` + ``sae.safetensors`` (``SparseCoder``).

``SparseCoder.save_to_disk`` writes the module's state dict, ``encoder.weight (d_sae, d_in)``,
``encoder.bias (d_sae,)``, ``W_dec (d_sae, d_in)`` and ``b_dec (d_in,)``, and a config holding
the ``SparseCoderConfig`` fields plus ``d_in``. sparsify encodes
``topk(ReLU((x - b_dec) @ encoder.weight.T + encoder.bias), k)`` and decodes
``f @ W_dec + b_dec``; see ``sparsify/sparse_coder.py`` and ``sparsify/fused_encoder.py``.

Only TopK SAEs exist in sparsify, and its encoder always subtracts ``b_dec``; an SAE that does
not centre its inputs is exported with that centring folded into ``encoder.bias``.
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

FILES = SAEFiles(
    "cfg.json",
    "sae.safetensors",
    "a sparsify SAE directory (pass the hookpoint folder, e.g. layers.6)",
)


def export_sparsify(sae: torch.nn.Module, directory: str | os.PathLike[str]) -> Path:
    """Write a TopK ``sae`` as a sparsify ``SparseCoder``: ``cfg.json`` and ``sae.safetensors``.

    Args:
        sae: a :class:`~sae_lightning.sae.SparseAutoencoder` with ``topk`` sparsity.
        directory: created if missing; the two files are written atomically.

    Raises:
        UnsupportedArchitectureError: the SAE is not a TopK SAE with affine maps.
    """
    parts = affine_parts(sae, "sparsify")
    if parts.activation != "topk":
        raise UnsupportedArchitectureError(
            f"sparsify stores TopK SAEs only (activation 'topk'); this SAE's sparsity is "
            f"'{sae.specs['sparsity'].get('name')}'; export it with --format saelens instead"
        )
    parts = parts.centered()  # sparsify always encodes x - b_dec
    unit = bool(((parts.W_dec.norm(dim=1) - 1).abs() < 1e-5).all())
    config: dict[str, Any] = {
        "activation": "topk",
        "expansion_factor": max(parts.d_sae // parts.d_in, 1),
        "normalize_decoder": unit,
        "num_latents": parts.d_sae,  # non-zero: overrides expansion_factor
        "k": parts.k,
        "multi_topk": False,
        "skip_connection": False,
        "transcode": False,
        "d_in": parts.d_in,
    }
    tensors = {
        "encoder.weight": parts.W_enc,
        "encoder.bias": parts.b_enc,
        "W_dec": parts.W_dec,
        "b_dec": parts.b_dec,
    }
    return write_sae_files(directory, FILES, config, tensors)


def load_sparsify(
    path: str | os.PathLike[str],
    device: str | torch.device = "cpu",
    dtype: torch.dtype | None = None,
) -> torch.nn.Module:
    """Load a sparsify ``SparseCoder`` directory as a :class:`~sae_lightning.sae.SparseAutoencoder`.

    Args:
        path: the hookpoint directory (holding ``cfg.json`` and ``sae.safetensors``), or a file
            in it.
        device: where to put the weights.
        dtype: the weights' dtype; None keeps the file's.

    Raises:
        FileNotFoundError: a file is missing.
        UnsupportedArchitectureError: a transcoder, a skip connection or the ``groupmax``
            activation, which have no equivalent here.
        FormatError: the files are inconsistent.
    """
    return load_affine_sae(path, FILES, sparsify_parts, device, dtype)


def sparsify_parts(
    config: dict[str, Any], tensors: dict[str, torch.Tensor], *, where: str
) -> AffineSAE:
    """Interpret a sparsify config and state dict; refuse what cannot be reproduced exactly."""
    for key, allowed, why in (
        ("activation", "topk", "only the 'topk' activation has an equivalent here"),
        ("transcode", False, "a transcoder predicts another module's output, not its input"),
        ("skip_connection", False, "the W_skip skip connection has no equivalent here"),
        ("embed_skip", False, "the embedding skip connection has no equivalent here"),
        ("gram_lookup", False, "the n-gram lookup table is not part of these files"),
    ):
        value = config.get(key, allowed)
        if value != allowed:
            raise UnsupportedArchitectureError(f"{where}/{FILES.config}: {key}={value!r}: {why}")
    try:
        d_in = int(config["d_in"])
    except KeyError:
        raise FormatError(f"{where}/{FILES.config}: missing key 'd_in'") from None
    d_sae = int(config.get("num_latents") or 0) or d_in * int(config.get("expansion_factor", 32))
    expected = {
        "encoder.weight": (d_sae, d_in),
        "encoder.bias": (d_sae,),
        "W_dec": (d_sae, d_in),
        "b_dec": (d_in,),
    }
    check_tensors(f"{where}/{FILES.weights}", tensors, expected, "a sparsify TopK SAE")
    return AffineSAE(
        tensors["encoder.weight"].contiguous(),
        tensors["encoder.bias"],
        tensors["W_dec"].contiguous(),
        tensors["b_dec"],
        True,
        "topk",
        int(config.get("k", 32)),  # SparseCoderConfig's default
    )
