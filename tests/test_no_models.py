"""Neural-operator SAE models: spectral convolution, the five encoder/decoder pairs, training.

References are float64 and written from the definitions: circular convolution by direct
summation over shifts, kernels from the Hermitian extension of the stored Fourier weights.
"""

from __future__ import annotations

import itertools
import math

import pytest
import torch
from sae_neural_operator.spectral import SpectralConv
from torch.testing import assert_close

from sae_lightning.components.base import Codes
from sae_lightning.errors import ConfigError
from sae_lightning.sae import SparseAutoencoder

pytestmark = pytest.mark.filterwarnings("ignore::UserWarning")


# ---- references ------------------------------------------------------------------------------


def circular_conv(u: torch.Tensor, kappa: torch.Tensor) -> torch.Tensor:
    """``out[b, o, n] = sum_{i, m} kappa[i, o, m] u[b, i, n - m mod N]`` by direct summation."""
    grid = tuple(u.shape[2:])
    dims = tuple(range(2, 2 + len(grid)))
    out = u.new_zeros(u.shape[0], kappa.shape[1], *grid)
    for m in itertools.product(*(range(n) for n in grid)):
        shifted = torch.roll(u, shifts=m, dims=dims)  # shifted[n] = u[n - m]
        out += torch.einsum("bi...,io->bo...", shifted, kappa[(slice(None), slice(None), *m)])
    return out


def stored_frequencies(layer: SpectralConv) -> list[tuple[tuple[int, ...], tuple[int, ...]]]:
    """``(stored index, frequency)`` pairs of the layer's weight layout, from its docstring."""
    if layer.full_grid is not None:
        grid = layer.full_grid
        axes = [range(n) for n in grid[:-1]] + [range(grid[-1] // 2 + 1)]
        return [(idx, idx) for idx in itertools.product(*axes)]
    axes = [range(2 * m - 1) for m in layer.modes[:-1]] + [range(layer.modes[-1])]
    pairs = []
    for idx in itertools.product(*axes):
        freq = tuple(j - (m - 1) for j, m in zip(idx[:-1], layer.modes[:-1], strict=True))
        pairs.append((idx, (*freq, idx[-1])))
    return pairs


def reference_kernel(layer: SpectralConv, grid: tuple[int, ...]) -> torch.Tensor:
    """``(in, out, *grid)`` discrete kernel ``ifft(W_full)`` of the Hermitian-extended weights."""
    w = torch.view_as_complex(layer.weight.detach().double().contiguous())
    full = torch.zeros(*w.shape[:2], *grid, dtype=torch.complex128)
    count = torch.zeros(*grid)
    for idx, freq in stored_frequencies(layer):
        pos = tuple(f % n for f, n in zip(freq, grid, strict=True))
        neg = tuple(-f % n for f, n in zip(freq, grid, strict=True))
        full[(slice(None), slice(None), *pos)] += w[(slice(None), slice(None), *idx)]
        full[(slice(None), slice(None), *neg)] += w[(slice(None), slice(None), *idx)].conj()
        count[pos] += 1
        count[neg] += 1
    # A bin reached from its own weight and from its mirror's (self-conjugate planes) averages.
    full = full / torch.where(count > 1, 2.0, 1.0)
    kappa = torch.fft.ifftn(full, dim=tuple(range(2, 2 + len(grid))))
    assert kappa.imag.abs().max() < 1e-12  # Hermitian: a real kernel
    return kappa.real


def band_limited(n_channels: int, grid: tuple[int, ...], coef: torch.Tensor) -> torch.Tensor:
    """``(C, *grid)`` samples of ``sum_k a_k cos(2 pi k.t) + b_k sin(2 pi k.t)``, ``|k_a| <= K``.

    ``coef`` is ``(C, 2K+1, .., 2K+1, 2)`` over frequencies ``-K..K`` per axis.
    """
    k_max = (coef.shape[1] - 1) // 2
    axes = [torch.arange(n, dtype=torch.float64) / n for n in grid]
    mesh = torch.meshgrid(*axes, indexing="ij")
    out = torch.zeros(n_channels, *grid, dtype=torch.float64)
    for freq in itertools.product(range(-k_max, k_max + 1), repeat=len(grid)):
        phase = 2 * math.pi * sum(f * t for f, t in zip(freq, mesh, strict=True))
        a = coef[(slice(None), *(f + k_max for f in freq))]  # (C, 2)
        shape = (n_channels, *([1] * len(grid)))
        out += a[:, 0].view(shape) * torch.cos(phase) + a[:, 1].view(shape) * torch.sin(phase)
    return out


def band_limited_batch(batch: int, channels: int, grid: tuple[int, ...], k_max: int, seed: int):
    gen = torch.Generator().manual_seed(seed)
    coefs = torch.randn(batch, channels, *([2 * k_max + 1] * len(grid)), 2, generator=gen)
    return coefs, torch.stack([band_limited(channels, grid, c) for c in coefs])


# ---- SpectralConv ----------------------------------------------------------------------------


GRIDS_FULL = [(8,), (7,), (6, 8), (5, 7), (6, 7)]


@pytest.mark.parametrize("grid", GRIDS_FULL)
def test_full_mode_spectral_conv_is_circular_convolution(grid: tuple[int, ...]) -> None:
    torch.manual_seed(sum(grid))
    layer = SpectralConv.full(2, 3, grid).double()
    u = torch.randn(4, 2, *grid, dtype=torch.float64)
    kappa = reference_kernel(layer, grid)
    assert_close(layer(u), circular_conv(u, kappa), rtol=0, atol=1e-12)
    # kernel(): the continuous kernel, i.e. |N| times the discrete one
    assert_close(layer.kernel(grid), kappa * math.prod(grid), rtol=0, atol=1e-12)


def test_full_mode_reaches_every_real_kernel() -> None:
    """Any real circular kernel is representable: weights = rfft of the kernel."""
    grid = (6, 5)
    kappa = torch.randn(2, 3, *grid, dtype=torch.float64)
    layer = SpectralConv.full(2, 3, grid).double()
    with torch.no_grad():
        layer.weight.copy_(torch.view_as_real(torch.fft.rfftn(kappa, dim=(2, 3))))
    u = torch.randn(3, 2, *grid, dtype=torch.float64)
    assert_close(layer(u), circular_conv(u, kappa), rtol=0, atol=1e-12)


@pytest.mark.parametrize(("modes", "grid"), [((4,), (9,)), ((3, 4), (7, 10)), ((2, 3), (8, 6))])
def test_truncated_spectral_conv_matches_reference_kernel(modes, grid) -> None:
    torch.manual_seed(0)
    layer = SpectralConv(2, 3, modes).double()
    u = torch.randn(2, 2, *grid, dtype=torch.float64)
    assert_close(layer(u), circular_conv(u, reference_kernel(layer, grid)), rtol=0, atol=1e-12)


@pytest.mark.parametrize(("modes", "grid", "k_max"), [((5,), (12,), 5), ((3, 4), (10, 12), 4)])
def test_spectral_conv_agrees_across_resolutions(modes, grid, k_max) -> None:
    """A band-limited function at N and 2N gives the same output at the shared points."""
    torch.manual_seed(1)
    layer = SpectralConv(3, 2, modes).double()
    coefs, coarse = band_limited_batch(2, 3, grid, k_max, seed=5)
    fine_grid = tuple(2 * n for n in grid)
    fine = torch.stack([band_limited(3, fine_grid, c) for c in coefs])
    shared = (slice(None), slice(None), *([slice(None, None, 2)] * len(grid)))
    out_coarse, out_fine = layer(coarse), layer(fine)
    assert out_coarse.abs().max() > 0.1  # not a vacuous agreement
    assert_close(out_fine[shared], out_coarse, rtol=0, atol=1e-10)
    assert_close(layer.kernel(fine_grid)[shared], layer.kernel(grid), rtol=0, atol=1e-10)


def test_flat_init_passes_every_input_spectrum_equally() -> None:
    """flat=True: one modulus everywhere, so ||kappa_j * u|| is the same for every concept j."""
    layer = SpectralConv(1, 5, (6,)).double()
    layer.reset_parameters(0.3, flat=True)
    modulus = torch.view_as_complex(layer.weight.detach().contiguous()).abs()
    assert_close(modulus, torch.full_like(modulus, 0.3 * math.sqrt(2)))
    _, u = band_limited_batch(3, 1, (16,), 4, seed=12)  # (3, 1, 16), frequencies < 5 < 6
    # the DC weight's imaginary part is dropped (a real kernel), so use mean-zero inputs
    u = u - u.mean(dim=-1, keepdim=True)
    norms = layer(u).pow(2).mean(dim=-1)  # (3, 5): per sample, per concept
    assert_close(norms, norms[:, :1].expand_as(norms), rtol=1e-10, atol=0)


def test_grid_too_small_raises_naming_axis_grid_modes_and_fix() -> None:
    layer = SpectralConv(1, 1, (3, 4))
    with pytest.raises(ValueError, match=r"axis 0 has 5 points.*modes \(3, 4\).*\(5, 8\)") as e:
        layer(torch.randn(1, 1, 5, 8))
    assert "lower modes[0]" in str(e.value)
    with pytest.raises(ValueError, match=r"axis 1 has 7 points"):
        layer(torch.randn(1, 1, 6, 7))
    layer(torch.randn(1, 1, 6, 8))  # exactly 2M per axis is enough
    full = SpectralConv.full(1, 1, (8,))
    with pytest.raises(ValueError, match=r"full-mode layer built for grid \(8,\) got grid \(16,\)"):
        full(torch.randn(1, 1, 16))


def test_spectral_conv_gradients_match_float64_reference() -> None:
    torch.manual_seed(2)
    layer = SpectralConv.full(2, 2, (5, 6)).double()
    u = torch.randn(2, 2, 5, 6, dtype=torch.float64, requires_grad=True)
    assert torch.autograd.gradcheck(layer, (u,))
    assert torch.autograd.gradcheck(SpectralConv(2, 1, (2, 3)).double(), (u,))


# ---- the SAE-FNO acceptance test ------------------------------------------------------------


@pytest.mark.parametrize("grid", [(8,), (9,), (6, 8), (5, 6)])
def test_full_mode_sae_fno_equals_circular_convolution_sae(grid: tuple[int, ...]) -> None:
    """Acceptance: SAE-FNO with full modes is a circular-convolution SAE on its grid (float64)."""
    torch.manual_seed(3)
    c, p = 2, 5
    sae = SparseAutoencoder(
        c,
        p,
        {"name": "fno", "full_grid": list(grid)},
        {"name": "fno"},
        {"name": "relu", "l1_coefficient": 0.0},
    ).double()
    with torch.no_grad():
        sae.encoder.b_enc.normal_()
        sae.decoder.b_dec.normal_()
    u = torch.randn(3, c, *grid, dtype=torch.float64)
    k_enc = reference_kernel(sae.encoder.spectral, grid)  # (C, p, *grid)
    k_dec = reference_kernel(sae.decoder.spectral, grid)  # (p, C, *grid)
    shape = (1, -1, *([1] * len(grid)))
    z = torch.relu(circular_conv(u, k_enc) + sae.encoder.b_enc.view(shape))
    u_hat = circular_conv(z, k_dec) + sae.decoder.b_dec.view(shape)
    out = sae.run(u)
    assert_close(out.codes.values, z, rtol=0, atol=1e-12)
    assert_close(out.x_hat, u_hat, rtol=0, atol=1e-12)


@pytest.mark.parametrize("grid", [(8,), (5, 6)])
def test_full_kernel_sae_cnn_equals_full_mode_sae_fno(grid: tuple[int, ...]) -> None:
    """A CNN whose kernel covers the grid, loaded with the FNO's kernels, is the same SAE."""
    torch.manual_seed(4)
    c, p = 2, 3
    fno = SparseAutoencoder(
        c, p, {"name": "fno", "full_grid": list(grid)}, {"name": "fno"}, {"name": "relu"}
    ).double()
    cnn = SparseAutoencoder(
        c, p, {"name": "cnn", "kernel_size": list(grid)}, {"name": "cnn"}, {"name": "relu"}
    ).double()
    k_enc = reference_kernel(fno.encoder.spectral, grid)  # (C, p, *grid)
    k_dec = reference_kernel(fno.decoder.spectral, grid)  # (p, C, *grid)
    # encoder correlates: W_enc[j, c, m] = k_enc[c, j, (K//2 - m) mod N];
    # decoder places:    W_dec[j, c, m] = k_dec[j, c, (m - K//2) mod N].
    idx_enc = [(n // 2 - torch.arange(n)) % n for n in grid]
    idx_dec = [(torch.arange(n) - n // 2) % n for n in grid]
    w_enc, w_dec = k_enc.transpose(0, 1), k_dec
    for a in range(len(grid)):
        w_enc = w_enc.index_select(2 + a, idx_enc[a])
        w_dec = w_dec.index_select(2 + a, idx_dec[a])
    with torch.no_grad():
        cnn.encoder.W_enc.copy_(w_enc)
        cnn.decoder.W_dec.copy_(w_dec)
    u = torch.randn(3, c, *grid, dtype=torch.float64)
    assert_close(cnn(u), fno(u), rtol=0, atol=1e-12)


# ---- every encoder/decoder pair through the registry ----------------------------------------

C, P = 2, 6
PAIRS = {
    "sae_mlp": ({"name": "sae_mlp", "grid": [16]}, {"name": "sae_mlp"}, (16,), False),
    "lifted": ({"name": "lifted", "grid": [4, 4]}, {"name": "lifted"}, (4, 4), False),
    "fno": ({"name": "fno", "modes": [4]}, {"name": "fno"}, (16,), True),
    "fno_2d": ({"name": "fno", "modes": [3, 4], "pointwise": True}, {"name": "fno"}, (8, 10), True),
    "lifted_fno": (
        {"name": "lifted_fno", "modes": [3, 3], "lifting_width": 5},
        {"name": "lifted_fno"},
        (6, 8),
        True,
    ),
    "cnn": ({"name": "cnn", "kernel_size": [5]}, {"name": "cnn"}, (16,), True),
    "cnn_2d": ({"name": "cnn", "kernel_size": [3, 4]}, {"name": "cnn"}, (6, 7), True),
}


def build(name: str, sparsity: dict | None = None) -> tuple[SparseAutoencoder, tuple[int, ...]]:
    enc, dec, grid, maps = PAIRS[name]
    default = {"name": "joint_topk", "k": 2} if maps else {"name": "topk", "k": 2}
    return SparseAutoencoder(C, P, enc, dec, sparsity or default), grid


@pytest.mark.parametrize("name", list(PAIRS))
def test_pair_builds_from_spec_and_reconstructs_function_batches(name: str) -> None:
    torch.manual_seed(5)
    sae, grid = build(name)
    maps = PAIRS[name][3]
    assert sae.encoder.functional and not sae.encoder.center_input
    assert sae.encoder.affine() is None
    assert sae.decoder.convolutional is maps
    u = torch.randn(3, C, *grid)
    out = sae.run(u)
    assert out.x_hat.shape == u.shape
    assert out.codes.dense().shape == ((3, P, *grid) if maps else (3, P))
    assert (out.codes.l0() <= 2).all() and (out.codes.l0() > 0).all()
    atoms = sae.atoms()
    assert atoms.ndim == 2 and atoms.shape[0] == P
    assert sae.decoder.b_dec.shape == (C,)
    assert sae.decoder.concept_functions(grid).shape == (P, C, *grid)
    assert_close(sae.decoder.atom_norms(), torch.ones(P), rtol=1e-5, atol=1e-5)
    loss = (out.x_hat - u).pow(2).mean()
    loss.backward()
    grads = [p.grad for p in sae.parameters() if p.requires_grad]
    assert all(g is not None and torch.isfinite(g).all() for g in grads)


@pytest.mark.parametrize("name", list(PAIRS))
def test_concept_function_is_response_to_unit_mass_impulse(name: str) -> None:
    """decode(impulse of mass 1 at the origin, concept j) - b_dec == concept_functions[j]."""
    torch.manual_seed(6)
    sae, grid = build(name)
    sae = sae.double()
    with torch.no_grad():
        sae.decoder.b_dec.normal_()
    maps = PAIRS[name][3]
    codes = torch.zeros(P, P, *grid, dtype=torch.float64) if maps else torch.eye(P).double()
    if maps:
        for j in range(P):
            codes[(j, j, *([0] * len(grid)))] = math.prod(grid)  # unit mass: |N| * (1/|N|)
    out = sae.decode(Codes(codes, None, P)) - sae.decoder.b_dec.view(1, -1, *([1] * len(grid)))
    assert_close(out, sae.decoder.concept_functions(grid), rtol=1e-12, atol=1e-12)


def test_fno_concept_functions_agree_across_grids_and_mlp_refuses_other_grids() -> None:
    sae, _ = build("fno_2d")
    sae = sae.double()
    coarse, fine = sae.decoder.concept_functions((8, 10)), sae.decoder.concept_functions((16, 20))
    assert_close(fine[..., ::2, ::2], coarse, rtol=0, atol=1e-12)
    mlp, _ = build("sae_mlp")
    with pytest.raises(ValueError, match=r"built for grid \(16,\) but got grid \(32,\)"):
        mlp.decoder.concept_functions((32,))
    with pytest.raises(ValueError, match=r"built for grid \(16,\) but got grid \(32,\)"):
        mlp(torch.randn(2, C, 32))


@pytest.mark.parametrize("name", list(PAIRS))
def test_after_optimizer_step_restores_unit_norm_concepts(name: str) -> None:
    torch.manual_seed(7)
    sae, _ = build(name)
    with torch.no_grad():
        for p in sae.decoder.parameters():
            p.mul_(1.0 + torch.rand_like(p))
    assert not torch.allclose(sae.decoder.atom_norms(), torch.ones(P), atol=1e-3)
    sae.after_optimizer_step()
    assert_close(sae.decoder.atom_norms(), torch.ones(P), rtol=1e-5, atol=1e-5)


def test_fno_decoder_starts_as_the_encoders_matched_filter() -> None:
    """Decoder kernel d_j(s) = encoder kernel kappa_{.->j}(-s), up to the normalisation."""
    sae, grid = build("fno")
    k_enc = sae.encoder.spectral.kernel(grid).transpose(0, 1)  # (p, C, N)
    k_dec = sae.decoder.concept_functions(grid)
    reflected = torch.roll(k_enc.flip(-1), 1, dims=-1)  # s -> -s mod N
    cos = torch.nn.functional.cosine_similarity(reflected.flatten(1), k_dec.flatten(1), dim=1)
    assert_close(cos, torch.ones(P), rtol=1e-5, atol=1e-5)


def test_lifted_models_start_as_their_unlifted_function_class() -> None:
    """The lifting is a reparameterisation: lifted = unlifted with the product weights."""
    torch.manual_seed(8)
    lifted, grid = build("lifted")
    lifted = lifted.double()
    u = torch.randn(3, C, *grid, dtype=torch.float64)
    enc = lifted.encoder
    pre = u.flatten(1) @ enc.effective_weight().t() / math.prod(grid) + enc.b_enc
    assert_close(enc(u), pre, rtol=1e-12, atol=1e-12)
    z = torch.randn(3, P, dtype=torch.float64)
    atoms = lifted.decoder.concept_functions(grid).flatten(1)  # (p, m)
    assert_close(
        lifted.decode(z), (z @ atoms).view(3, C, *grid) + lifted.decoder.b_dec.view(1, C, 1, 1)
    )
    # lifted_fno encoder == fno encoder with spectral weights sum_h W[h, j, k] P[h, c]
    lfno, grid = build("lifted_fno")
    lfno = lfno.double()
    fno = SparseAutoencoder(
        C, P, {"name": "fno", "modes": [3, 3]}, {"name": "fno"}, {"name": "relu"}
    ).double()
    w = torch.view_as_complex(lfno.encoder.spectral.weight.detach().contiguous())  # (h, p, ..)
    combined = torch.einsum("hp...,hc->cp...", w, lfno.encoder.P.detach().to(w.dtype))
    with torch.no_grad():
        fno.encoder.spectral.weight.copy_(torch.view_as_real(combined))
        fno.encoder.b_enc.copy_(lfno.encoder.b_enc)
    u = torch.randn(2, C, *grid, dtype=torch.float64)
    assert_close(lfno.encoder(u), fno.encoder(u), rtol=1e-12, atol=1e-12)


# ---- configuration errors name the field ----------------------------------------------------


@pytest.mark.parametrize(
    ("encoder", "decoder", "field"),
    [
        ({"name": "fno", "modes": [0]}, {"name": "fno"}, "model.encoder.modes"),
        ({"name": "fno", "modes": [2, 2, 2]}, {"name": "fno"}, "model.encoder.modes"),
        (
            {"name": "fno", "modes": [4], "full_grid": [8]},
            {"name": "fno"},
            "model.encoder.full_grid",
        ),
        ({"name": "fno", "modez": [4]}, {"name": "fno"}, "model.encoder.modez"),
        ({"name": "sae_mlp"}, {"name": "sae_mlp"}, "model.encoder.grid"),
        (
            {"name": "lifted", "grid": [8], "lifting_width": 10},
            {"name": "lifted"},
            "model.encoder.lifting_width",
        ),
        (
            {"name": "lifted_fno", "lifting_width": 1},
            {"name": "lifted_fno"},
            "model.encoder.lifting_width",
        ),
        ({"name": "cnn", "kernel_size": [3]}, {"name": "fno"}, "model.decoder.modes"),
        ({"name": "fno"}, {"name": "sae_mlp"}, "model.decoder.grid"),
        ({"name": "fno"}, {"name": "cnn"}, "model.decoder.kernel_size"),
        ({"name": "cnn", "kernel_size": [-1]}, {"name": "cnn"}, "model.encoder.kernel_size"),
    ],
)
def test_config_errors_name_the_field(encoder: dict, decoder: dict, field: str) -> None:
    with pytest.raises(ConfigError) as err:
        SparseAutoencoder(C, P, encoder, decoder, {"name": "relu"})
    assert err.value.field.startswith(field), err.value.field


def test_mismatched_code_kinds_are_refused_with_a_fix() -> None:
    sae = SparseAutoencoder(C, P, {"name": "fno", "modes": [4]}, {"name": "fno"}, {"name": "relu"})
    with pytest.raises(
        ValueError, match=r"expected dense concept maps.*pair it with a map encoder"
    ):
        sae.decode(torch.randn(2, P))
    with pytest.raises(ValueError, match=r"expected a function batch \(batch, 2, N1\)"):
        sae(torch.randn(2, 3, 16))
    cnn, _ = build("cnn")
    with pytest.raises(ValueError, match=r"kernel_size \(5,\) is larger than grid \(4,\)"):
        cnn(torch.randn(1, C, 4))


# ---- training -------------------------------------------------------------------------------


def _shifted_atom_data() -> torch.Tensor:
    """64 samples on 32 points: 2 of 4 smooth atoms each, at random shifts, amplitudes [1, 2]."""
    grid, n_atoms = (32,), 4
    _, atoms = band_limited_batch(n_atoms, 1, grid, 3, seed=10)  # (4, 1, 32)
    gen = torch.Generator().manual_seed(11)
    samples = []
    for _ in range(64):
        which = torch.randperm(n_atoms, generator=gen)[:2]
        shifts = torch.randint(0, grid[0], (2,), generator=gen)
        amps = 1 + torch.rand(2, generator=gen)
        parts = zip(which, shifts, amps, strict=True)
        samples.append(sum(a * torch.roll(atoms[j], int(s), -1) for j, s, a in parts))
    return torch.stack(samples).float()  # (64, 1, 32)


JOINT = {"name": "joint_topk", "k": 2, "domain_fraction": 0.1}
TOPK = {"name": "topk", "k": 4, "aux_coefficient": 0}
TRAINING = {
    "fno": ({"name": "fno", "modes": [6]}, {"name": "fno"}, JOINT, 8),
    "lifted_fno": ({"name": "lifted_fno", "modes": [6]}, {"name": "lifted_fno"}, JOINT, 8),
    "cnn": ({"name": "cnn", "kernel_size": [15]}, {"name": "cnn"}, JOINT, 8),
    "sae_mlp": ({"name": "sae_mlp", "grid": [32]}, {"name": "sae_mlp"}, TOPK, 64),
    "lifted": ({"name": "lifted", "grid": [32]}, {"name": "lifted"}, TOPK, 64),
}


@pytest.mark.parametrize("name", list(TRAINING))
def test_models_train_on_band_limited_functions(name: str) -> None:
    """60 Adam steps (plain torch, relative L2 loss) cut the relative L2 error clearly."""
    torch.manual_seed(9)
    data = _shifted_atom_data()
    encoder, decoder, sparsity, d_sae = TRAINING[name]
    sae = SparseAutoencoder(1, d_sae, encoder, decoder, sparsity)

    def rel_l2() -> float:
        with torch.no_grad():
            x_hat = sae(data)
        return float(((x_hat - data).pow(2).sum((1, 2)) / data.pow(2).sum((1, 2))).sqrt().mean())

    before = rel_l2()
    opt = torch.optim.Adam(sae.parameters(), lr=3e-2)
    for step in range(60):
        batch = data[(step * 16) % 64 :][:16]
        out = sae.run(batch, step=step)
        loss = ((out.x_hat - batch).pow(2).sum((1, 2)) / batch.pow(2).sum((1, 2))).mean()
        opt.zero_grad()
        loss.backward()
        opt.step()
        sae.after_optimizer_step()
    after = rel_l2()
    assert after < 0.6 * before, (before, after)
