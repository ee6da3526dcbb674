"""SAE neural operators for sae-lightning: function-space encoders, decoders, sparsity and data."""
