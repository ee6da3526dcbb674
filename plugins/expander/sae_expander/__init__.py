"""Expander sparse autoencoders (Mendoza-Smith 2026, arXiv 2607.01799) for sae-lightning.

Each latent's atom touches only ``d`` of the ``d_in`` input dimensions, chosen by a random
left-d-regular mask built from a seed. The dictionary is stored as ``(d_sae, d)`` values plus
``(d_sae, d)`` row indices, and every product runs in ``O(d * d_sae)`` per sample.
See docs/expander.md.
"""

from sae_expander.dense import to_dense
from sae_expander.mask import sample_mask
from sae_expander.omp import encode_omp

__all__ = ["encode_omp", "sample_mask", "to_dense"]
