"""Language-model side of sae-lightning: load a ``transformers`` causal LM, hook it, splice SAEs in.

Everything here imports ``transformers`` lazily (the ``[lm]`` extra), so ``import sae_lightning``
stays light.
"""
