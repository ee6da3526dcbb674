"""Export an expander SAE as a plain dense SAE, for tools that expect dense weight matrices."""

from __future__ import annotations

import torch

from sae_expander.decoder import ExpanderDecoder
from sae_expander.encoder import ExpanderEncoder
from sae_lightning.sae import SparseAutoencoder


def to_dense(sae: SparseAutoencoder) -> SparseAutoencoder:
    """The same SAE with the core ``linear`` encoder and decoder holding the dense matrices.

    ``W_enc = W_dec = atoms()`` (tied, unit-norm), biases copied, same sparsity spec; outputs
    match the expander SAE up to float rounding. Costs ``2 * d_in * d_sae`` values.

    Raises:
        TypeError: when ``sae`` does not use the ``expander`` encoder and decoder.
    """
    enc, dec = sae.encoder, sae.decoder
    if not (isinstance(enc, ExpanderEncoder) and isinstance(dec, ExpanderDecoder)):
        raise TypeError(
            "to_dense expects an SAE built with encoder 'expander' and decoder 'expander', got "
            f"{type(enc).__name__} and {type(dec).__name__}"
        )
    dense = SparseAutoencoder(
        sae.d_in,
        sae.d_sae,
        {"name": "linear", "center_input": enc.center_input},
        {"name": "linear", "init_from_encoder": False},
        sae.specs["sparsity"],
    )
    weight = enc.dense_weight()  # (d_sae, d_in), unit-norm rows
    dense = dense.to(device=weight.device, dtype=weight.dtype)
    with torch.no_grad():
        dense.encoder.W_enc.copy_(weight)
        dense.encoder.b_enc.copy_(enc.b_enc)
        dense.decoder.W_dec.copy_(weight)
        dense.decoder.b_dec.copy_(dec.b_dec)
    return dense
