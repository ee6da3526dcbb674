"""The five function-space SAE architectures, one file each: encoder, decoder and their configs.

``sae_mlp``, ``lifted``, ``fno``, ``lifted_fno`` and ``cnn`` are registered under these names in
the ``sae_lightning.encoders`` and ``sae_lightning.decoders`` entry-point groups; the shared
types, shape checks, lifting and base classes are in :mod:`.common`.

Notation: ``u: [0,1)^d -> R^C`` sampled on a grid ``N`` (``|N|`` points, quadrature weight
``w = 1/|N|``), ``p = d_sae`` concepts, ``<f, g> = w sum_n f(n/N) . g(n/N)`` the L2 inner
product by quadrature. ``SC^M_{a->b}`` is :class:`~sae_neural_operator.spectral.SpectralConv`
keeping frequencies ``|k| < M``.

Encoders map ``(B, C, *grid)`` functions to pre-activations of two kinds:

* vector codes ``(B, p)`` (``sae_mlp``, ``lifted``): one scalar per concept; these models are
  tied to their training grid;
* concept maps ``(B, p, *grid)`` (``fno``, ``lifted_fno``, ``cnn``): one function ``z_j`` per
  concept, saying where and how strongly concept ``j`` is expressed.

All encoders set ``functional = True`` and ``center_input = False`` and declare no linear
encoder matrix (so the core never takes its fused linear path). Input centring by ``b_dec`` is
omitted: ``b_dec`` is a constant per channel and the encoder bias absorbs its effect.

Decoders map codes to reconstructed functions ``(B, C, *grid)``. Every decoder has a bias
``b_dec`` of shape ``(C,)``, a constant function per channel (the same at every resolution), and
a dictionary of ``p`` *concept functions* ``d_j: [0,1)^d -> R^C``:

* vector codes (``sae_mlp``, ``lifted``): ``u_hat = sum_j z_j d_j + b_dec``, with ``d_j``
  stored on the training grid;
* concept maps (``fno``, ``lifted_fno``, ``cnn``): ``u_hat = sum_j d_j * z_j + b_dec``, a
  circular convolution of each code map with its concept's kernel (``convolutional = True``:
  a concept is defined up to translation).

:meth:`~.common.FunctionDecoder.concept_functions` samples the ``d_j`` on a grid: for
convolutional decoders, the response to a unit-mass impulse code at the origin (value ``|N|`` at
point 0).

Atom normalisation. With ``unit_norm`` (default) every concept function is rescaled to unit L2
norm (quadrature; for ``cnn`` the kernel's Euclidean norm) after each optimizer step, as the
core's linear decoder does. Why: ``(z_j, d_j) -> (c z_j, d_j / c)`` leaves the reconstruction
unchanged, so without a norm constraint an L1 penalty is minimised by shrinking codes and
inflating atoms, TopK selection by ``|z_j|`` compares latents on arbitrary scales, and recovery
metrics and pictures compare functions whose scale means nothing. For the spectral decoders
the norm is exact and resolution-free (Parseval on the stored modes), so the constraint does
not favour any grid. The radial gradient projection of the core decoder is not done: the
factored and spectral parameterisations have no per-atom tangent space in the parameters.
"""
