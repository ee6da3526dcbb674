"""Built-in encoders, decoders and sparsity functions, registered through entry points."""
