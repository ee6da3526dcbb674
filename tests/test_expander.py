"""Expander plugin: mask, compact storage, compact kernels against a dense masked float64 SAE."""

from __future__ import annotations

import pickle

import pytest
import torch
from sae_expander import kernels, mask, sample_mask
from torch.autograd import gradcheck
from torch.testing import assert_close

from sae_lightning.components.sparsity.auxk import auxk_loss
from sae_lightning.errors import ConfigError
from sae_lightning.sae import SparseAutoencoder

D_IN, D_SAE, D, K, B = 24, 96, 4, 5, 16
SEEDS = [0, 1, 2]


def expander_sae(sparsity: dict | None = None, d: int = D, seed: int = 0) -> SparseAutoencoder:
    return SparseAutoencoder(
        D_IN,
        D_SAE,
        {"name": "expander", "d": d, "seed": seed},
        {"name": "expander"},
        sparsity or {"name": "signed_topk", "k": K},
    )


# ---- mask -----------------------------------------------------------------------------------


@pytest.mark.parametrize(("d_in", "d_sae", "d"), [(24, 96, 4), (64, 20, 4), (128, 40, 4)])
def test_mask_is_left_d_regular_without_empty_rows(d_in: int, d_sae: int, d: int) -> None:
    rows = sample_mask(d_in, d_sae, d, seed=3)
    assert rows.shape == (d_sae, d)
    assert ((rows >= 0) & (rows < d_in)).all()
    assert (rows[:, 1:] > rows[:, :-1]).all()  # sorted, so d distinct rows per latent
    assert (torch.bincount(rows.flatten(), minlength=d_in) > 0).all()  # no empty input row


def test_mask_needs_repair_when_barely_covered() -> None:
    # 20 latents x 4 rows = 80 draws over 64 rows: uniform draws leave rows empty w.h.p.,
    # so this exercises the repair step (checked above to leave none empty).
    raw = mask._draw(64, 20, 4, torch.Generator().manual_seed(3 + mask.MASK_SEED_OFFSET))
    assert (torch.bincount(raw.flatten(), minlength=64) == 0).any()
    assert (torch.bincount(sample_mask(64, 20, 4, seed=3).flatten(), minlength=64) > 0).all()


def test_mask_is_a_function_of_the_seed() -> None:
    a = expander_sae(seed=5).encoder
    b = expander_sae(seed=5).encoder
    c = expander_sae(seed=6).encoder
    assert torch.equal(a.indices, b.indices)
    assert torch.equal(a.values, b.values)
    assert not torch.equal(a.indices, c.indices)
    assert torch.equal(a.indices.long(), sample_mask(D_IN, D_SAE, D, seed=5))


@pytest.mark.parametrize(
    ("d_in", "d_sae", "d", "message"),
    [(8, 32, 9, "exceeds d_in"), (64, 8, 4, "would be reached by no latent")],
)
def test_impossible_degree_names_the_field(d_in: int, d_sae: int, d: int, message: str) -> None:
    with pytest.raises(ConfigError, match=message) as err:
        SparseAutoencoder(
            d_in, d_sae, {"name": "expander", "d": d}, {"name": "expander"}, {"name": "relu"}
        )
    assert err.value.field == "model.encoder.d"


def test_decoder_rejects_another_encoder() -> None:
    with pytest.raises(ConfigError, match="shares the values and mask") as err:
        SparseAutoencoder(D_IN, D_SAE, {"name": "linear"}, {"name": "expander"}, {"name": "relu"})
    assert err.value.field == "model.decoder.name"


# ---- storage --------------------------------------------------------------------------------


def test_storage_is_d_by_d_sae() -> None:
    sae = expander_sae()
    shapes = {name: tuple(p.shape) for name, p in sae.named_parameters()}
    assert shapes == {
        "encoder.values": (D_SAE, D),
        "encoder.b_enc": (D_SAE,),
        "decoder.b_dec": (D_IN,),
    }
    state = sae.state_dict()
    assert set(state) == {"encoder.values", "encoder.b_enc", "encoder.indices", "decoder.b_dec"}
    assert state["encoder.indices"].dtype == torch.int32
    assert not any(t.numel() >= D_IN * D_SAE for t in state.values())


def test_atoms_are_unit_norm_and_d_sparse() -> None:
    sae = expander_sae()
    with torch.no_grad():
        sae.encoder.values.mul_(torch.rand(D_SAE, 1) * 5)
    atoms = sae.atoms()
    assert_close(atoms.norm(dim=1), torch.ones(D_SAE))
    assert ((atoms != 0).sum(dim=1) == D).all()
    assert_close(sae.decoder.atom_norms(), torch.ones(D_SAE))


def test_loading_corrupt_indices_fails() -> None:
    sae = expander_sae()
    state = sae.state_dict()
    state["encoder.indices"] = state["encoder.indices"].clone()
    state["encoder.indices"][0, 0] = D_IN
    with pytest.raises(Exception, match=r"must lie in \[0, 24\)"):
        expander_sae().load_state_dict(state)


def test_loaded_indices_replace_the_seeded_mask() -> None:
    src, dst = expander_sae(seed=1), expander_sae(seed=2)
    dst.load_state_dict(src.state_dict())
    x = torch.randn(B, D_IN)
    assert_close(dst(x), src(x))


# ---- compact kernels equal a dense masked SAE in float64 --------------------------------------


def dense_masked_forward(sae: SparseAutoencoder, x: torch.Tensor):
    """The paper's formulas with a dense masked matrix: ``W = colnorm(M * V)``, tied.

    Codes come from the SAE's own sparsity plugin applied to the reference pre-activations
    (the plugins have their own float64 tests); everything else is dense and obvious.
    """
    enc = sae.encoder
    v = torch.zeros(D_SAE, D_IN, dtype=x.dtype).scatter(1, enc.indices.long(), enc.values)
    w = v / v.norm(dim=1, keepdim=True)  # (d_sae, d_in) unit-norm atoms
    pre = (x - sae.decoder.b_dec) @ w.t() + enc.b_enc
    codes = sae.sparsity(pre, step=0, decoder=sae.decoder).codes.dense()
    return codes @ w + sae.decoder.b_dec, pre


SPARSITIES = {
    "signed_topk": {"name": "signed_topk", "k": K},  # sparse codes, sparse gradient path
    "topk": {"name": "topk", "k": K},  # the same with ReLU
    "relu": {"name": "relu"},  # dense codes: the A^T h kernel and the dense gradient path
    "batchtopk": {"name": "batchtopk", "k": K},  # dense codes, sparse gradient
}


@pytest.mark.parametrize("seed", SEEDS)
@pytest.mark.parametrize("sparsity", list(SPARSITIES))
@pytest.mark.parametrize("probe", [False, True], ids=["loss", "loss+probe"])
def test_compact_equals_dense_masked_float64(
    seed: int, sparsity: str, probe: bool, monkeypatch: pytest.MonkeyPatch
) -> None:
    paths = []
    real = kernels.sparse_entries
    monkeypatch.setattr(
        kernels, "sparse_entries", lambda g: paths.append(real(g) is not None) or real(g)
    )
    torch.manual_seed(seed)
    sae = expander_sae(SPARSITIES[sparsity], seed=seed).double()
    sae.fused = False  # the dense-masked path: the reference of the fused one (test_expander_fused)
    with torch.no_grad():  # move off the all-zero bias init so every gradient is exercised
        sae.encoder.b_enc.normal_(0, 0.1)
        sae.decoder.b_dec.normal_(0, 0.1)
    x = torch.randn(B, D_IN, dtype=torch.float64)  # fresh inputs for every case
    weights = torch.randn(B, D_SAE, dtype=torch.float64)  # a dense gradient, with the probe

    def loss_of(x_hat: torch.Tensor, pre: torch.Tensor) -> torch.Tensor:
        loss = (x - x_hat).pow(2).sum()
        return loss + 1e-2 * (weights * pre).sum() if probe else loss

    out = sae.run(x)
    grads = torch.autograd.grad(loss_of(out.x_hat, out.pre_acts), list(sae.parameters()))
    ref = expander_sae(SPARSITIES[sparsity], seed=seed).double()
    ref.load_state_dict(sae.state_dict())
    x_hat_ref, pre_ref = dense_masked_forward(ref, x)
    grads_ref = torch.autograd.grad(loss_of(x_hat_ref, pre_ref), list(ref.parameters()))

    assert_close(out.pre_acts, pre_ref, rtol=1e-10, atol=1e-12)
    assert_close(out.x_hat, x_hat_ref, rtol=1e-10, atol=1e-12)
    for (name, _), g, g_ref in zip(sae.named_parameters(), grads, grads_ref, strict=True):
        assert_close(g, g_ref, rtol=1e-9, atol=1e-11, msg=lambda m, n=name: f"{n}: {m}")
    # Every backward path is covered. signed_topk recomputes its k values from the input, so
    # without the probe no gradient reaches the dense pre-activations at all; otherwise the
    # encoder's backward (which runs last) takes the sparse path for sparse gradients.
    if sparsity == "signed_topk" and not probe:
        assert paths == []
    else:
        assert paths[-1] == (sparsity != "relu" and not probe)


@pytest.mark.parametrize("path", ["sparse", "dense"])
def test_encode_gradcheck(path: str, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(kernels, "SPARSE_GRADIENT_DENSITY", 1.0 if path == "sparse" else 0.0)
    enc = expander_sae().encoder
    x = torch.randn(7, D_IN, dtype=torch.float64, requires_grad=True)
    w = torch.randn(D_SAE, D, dtype=torch.float64, requires_grad=True)
    b = torch.randn(D_SAE, dtype=torch.float64, requires_grad=True)
    layout = enc.layout
    assert gradcheck(lambda x, w, b: kernels.masked_encode(x, w, b, layout), (x, w, b))


def test_decode_gradcheck() -> None:
    layout = expander_sae().encoder.layout
    w = torch.randn(D_SAE, D, dtype=torch.float64, requires_grad=True)
    h = torch.randn(7, D_SAE, dtype=torch.float64, requires_grad=True)
    assert gradcheck(lambda h, w: kernels.masked_decode_dense(h, w, layout), (h, w))
    idx = torch.stack([torch.randperm(D_SAE)[:K] for _ in range(7)])
    vals = torch.randn(7, K, dtype=torch.float64, requires_grad=True)
    assert gradcheck(lambda v, w: kernels.masked_decode_sparse(v, idx, w, layout), (vals, w))


def test_selected_pre_activations_gradcheck() -> None:
    layout = expander_sae().encoder.layout
    x = torch.randn(7, D_IN, dtype=torch.float64, requires_grad=True)
    w = torch.randn(D_SAE, D, dtype=torch.float64, requires_grad=True)
    b = torch.randn(D_SAE, dtype=torch.float64, requires_grad=True)
    idx = torch.stack([torch.randperm(D_SAE)[:K] for _ in range(7)])
    full = kernels.apply_a(x.detach(), w.detach(), layout, b.detach())
    assert_close(kernels.selected_pre_activations(x, w, b, idx, layout), full.gather(1, idx))
    assert gradcheck(
        lambda x, w, b: kernels.selected_pre_activations(x, w, b, idx, layout), (x, w, b)
    )


def test_chunked_kernels_match_one_chunk(monkeypatch: pytest.MonkeyPatch) -> None:
    # Tiny chunk budgets force one row per chunk; results must not depend on chunking.
    layout = expander_sae().encoder.layout
    x = torch.randn(50, D_IN, dtype=torch.float64)
    h = torch.randn(50, D_SAE, dtype=torch.float64)
    w = torch.randn(D_SAE, D, dtype=torch.float64)
    sparse_h = torch.zeros_like(h).scatter(1, torch.randint(D_SAE, (50, 2)), h[:, :2])
    idx = torch.randint(D_SAE, (50, K))

    def run():
        entries = kernels.sparse_entries(sparse_h)
        assert entries is not None
        return (
            kernels.apply_a(x, w, layout),
            kernels.apply_at(h, w, layout),
            kernels.sddmm(h, x, layout),
            torch.stack([entries.batch, entries.latent]),
            entries.value,
            kernels.sparse_apply_at(entries, w, layout, 50),
            kernels.sparse_sddmm(entries, x, layout),
            kernels.gather_selected(x, w, idx, layout),
            kernels.codes_decode(h[:, :K], idx, w, layout),
            kernels.codes_value_grad(idx, h[:, :K], x, layout),
        )

    whole = run()
    for name in ("_CPU_TABLE_ELEMENTS", "_SCAN_ELEMENTS", "_SDDMM_ELEMENTS", "_NNZ_ELEMENTS"):
        monkeypatch.setattr(kernels, name, 1)
    for a, b in zip(whole, run(), strict=True):
        assert_close(a, b, rtol=1e-12, atol=1e-12)
    assert torch.equal(whole[3], torch.stack(sparse_h.nonzero(as_tuple=True)))


# ---- signed TopK ----------------------------------------------------------------------------


@pytest.mark.parametrize("seed", SEEDS)
def test_signed_topk_auxk_equals_core_auxk_float64(seed: int) -> None:
    torch.manual_seed(seed)
    spec = {"name": "signed_topk", "k": K, "aux_k": 7, "aux_coefficient": 0.5}
    sae = expander_sae(spec, seed=seed).double()
    x = torch.randn(B, D_IN, dtype=torch.float64)
    dead = torch.rand(D_SAE) < 0.5
    dead[:3] = True
    residual = torch.randn(B, D_IN, dtype=torch.float64)

    pre = sae.pre_activations(x)
    ours = sae.sparsity.auxiliary_losses(pre, x, residual, sae.decoder, dead)["auxk"]
    g_ours = torch.autograd.grad(ours, list(sae.parameters()), allow_unused=True)
    pre = sae.pre_activations(x)
    core = 0.5 * auxk_loss(pre, x, residual, sae.decoder, dead, 7)
    g_core = torch.autograd.grad(core, list(sae.parameters()), allow_unused=True)
    assert_close(ours, core, rtol=1e-12, atol=1e-14)
    for a, b in zip(g_ours, g_core, strict=True):
        assert (a is None) == (b is None)
        if a is not None:
            assert_close(a, b, rtol=1e-9, atol=1e-12)


def test_signed_topk_keeps_negative_values_that_topk_rectifies() -> None:
    sae = expander_sae({"name": "signed_topk", "k": K})
    pre = -torch.rand(B, D_SAE) - 0.1  # every pre-activation negative
    signed = sae.sparsity(pre, step=0, decoder=sae.decoder).codes
    expected = pre.topk(K, dim=1).values
    assert_close(signed.values.sort(dim=1).values, expected.sort(dim=1).values)
    assert (signed.l0() == K).all()
    relu = SparseAutoencoder(
        D_IN, D_SAE, {"name": "expander"}, {"name": "expander"}, {"name": "topk", "k": K}
    )
    assert (relu.sparsity(pre, step=0, decoder=relu.decoder).codes.l0() == 0).all()


def test_pickles_after_a_forward_pass() -> None:
    sae = expander_sae()
    x = torch.randn(B, D_IN)
    y = sae(x)
    assert_close(pickle.loads(pickle.dumps(sae))(x), y)
