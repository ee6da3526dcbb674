"""Hand-written training kernels: sparse TopK encoding whose backward touches only k latents.

Nothing here knows about plugins; the sparsity plugins call these functions from their
``fused_encode`` method (see ``docs/architecture.md``, "The sparse TopK hot path").
"""

from sae_lightning.kernels.topk_encoder import (
    DEFAULT_CHUNK_BYTES,
    EncoderInputs,
    SparseDecode,
    TopKEncoder,
    batch_topk_encode,
    batch_topk_select,
    release_workspace,
    sampled_dots,
    sparse_decode,
    sparse_weight_grad,
    topk_encode,
    topk_select,
)

__all__ = [
    "DEFAULT_CHUNK_BYTES",
    "EncoderInputs",
    "SparseDecode",
    "TopKEncoder",
    "batch_topk_encode",
    "batch_topk_select",
    "release_workspace",
    "sampled_dots",
    "sparse_decode",
    "sparse_weight_grad",
    "topk_encode",
    "topk_select",
]
