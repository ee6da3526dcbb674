"""The feature browser: what each latent of a trained SAE responds to (``sae-lightning inspect``).

Streams text (or cached activations) through the SAE, keeps per latent its top activating
contexts, histogram, density and mean in bounded memory, and writes a static HTML browser.
"""
