"""Hand-written training kernels: sparse encoding whose backward touches only the kept latents.

Nothing here knows about plugins; the sparsity plugins call these functions from their
``fused_encode`` method (see ``docs/architecture.md``, "The sparse TopK hot path"). One job a
module: :mod:`~sae_lightning.kernels.select` (which entries a sparsity keeps),
:mod:`~sae_lightning.kernels.encode` (the encoder product fused with a selection),
:mod:`~sae_lightning.kernels.decode` (the sparse decoder product),
:mod:`~sae_lightning.kernels.weight_grad` (the sparse weight gradient both backwards use) and
:mod:`~sae_lightning.kernels.memory` (buffers kept from step to step).
"""

from sae_lightning.kernels.decode import SparseDecode, sampled_dots, sparse_decode
from sae_lightning.kernels.encode import (
    DeadSelection,
    EncoderInputs,
    TopKEncoder,
    batch_topk_encode,
    batch_topk_encode_with_dead,
    dead_topk_encode,
    threshold_encode,
    topk_encode,
    topk_encode_with_dead,
)
from sae_lightning.kernels.memory import DEFAULT_CHUNK_BYTES
from sae_lightning.kernels.select import (
    FlatSelection,
    batch_topk_select,
    dead_topk_select,
    threshold_select,
    topk_select,
)
from sae_lightning.kernels.weight_grad import sparse_weight_grad

__all__ = [
    "DEFAULT_CHUNK_BYTES",
    "DeadSelection",
    "EncoderInputs",
    "FlatSelection",
    "SparseDecode",
    "TopKEncoder",
    "batch_topk_encode",
    "batch_topk_encode_with_dead",
    "batch_topk_select",
    "dead_topk_encode",
    "dead_topk_select",
    "sampled_dots",
    "sparse_decode",
    "sparse_weight_grad",
    "threshold_encode",
    "threshold_select",
    "topk_encode",
    "topk_encode_with_dead",
    "topk_select",
]
