"""The sparse TopK path (sae_lightning/kernels/) against the dense reference path.

Fresh random inputs each seed, plus exact ties and all-zero rows; float32 results must match the
dense path to 1e-5 relative, and the custom autograd function passes gradcheck in float64.
"""

from __future__ import annotations

import copy

import pytest
import torch
from fused_paths import run_both
from torch.testing import assert_close

from sae_lightning.components.base import Codes, DeadLatents
from sae_lightning.components.sparsity import auxk
from sae_lightning.components.sparsity.auxk import auxk_loss
from sae_lightning.kernels import (
    DeadSelection,
    EncoderInputs,
    batch_topk_encode,
    batch_topk_select,
    decode,
    memory,
    sampled_dots,
    sparse_decode,
    sparse_weight_grad,
    topk_encode,
    topk_encode_with_dead,
    topk_select,
    weight_grad,
)
from sae_lightning.sae import SparseAutoencoder

SEEDS = [0, 1, 2]
D_IN, D_SAE, B, K = 16, 512, 12, 4  # d_sae wide enough for the hierarchical selection
F64 = torch.float64


def close(actual: torch.Tensor, expected: torch.Tensor) -> None:
    """float32 agreement of two computations of the same quantity (1e-5 relative)."""
    scale = expected.detach().abs().max().clamp_min(1e-30)
    assert_close(actual.detach(), expected.detach(), rtol=1e-5, atol=1e-6 * float(scale))


# ---- selection --------------------------------------------------------------------------------


def assert_valid_topk(pre: torch.Tensor, values: torch.Tensor, indices: torch.Tensor, k: int):
    """``values``/``indices`` are a top-k of each row: right values, distinct ids, consistent."""
    expected = pre.topk(k, dim=1).values
    assert torch.equal(values.sort(dim=1, descending=True).values, expected)
    assert torch.equal(pre.gather(1, indices), values)
    assert (indices.sort(dim=1).values.diff(dim=1) > 0).all()


@pytest.mark.parametrize("seed", SEEDS)
@pytest.mark.parametrize(
    ("rows", "n", "k"), [(9, 512, 4), (5, 4096, 8), (3, 4096, 32), (4, 1000, 5), (6, 64, 3)]
)
def test_topk_select_is_an_exact_topk_with_ties_and_zero_rows(seed, rows, n, k) -> None:
    torch.manual_seed(seed)
    pre = torch.randn(rows, n)
    pre[0] = 0.0  # an all-zero row: everything ties
    pre[1] = torch.randint(0, 3, (n,)).float()  # three values, ties across the cut
    pre[2, : n // 2] = -torch.inf
    values, indices = topk_select(pre, k)
    assert values.shape == indices.shape == (rows, k)
    assert_valid_topk(pre, values, indices, k)


def test_topk_select_is_differentiable_like_topk() -> None:
    torch.manual_seed(0)
    pre = torch.randn(6, 4096, requires_grad=True)
    values, indices = topk_select(pre, 8)
    g = torch.randn_like(values)
    (grad,) = torch.autograd.grad((values * g).sum(), pre)
    expected = torch.zeros_like(pre).scatter(1, indices, g)
    assert torch.equal(grad, expected)


# ---- the autograd function --------------------------------------------------------------------


def f64_inputs(batch: int = 10, d_in: int = 6, n: int = 40, shift: bool = True, bias: bool = True):
    def leaf(*shape):
        return torch.randn(*shape, dtype=F64, requires_grad=True)

    return (
        leaf(batch, d_in),
        leaf(d_in) if shift else None,
        leaf(n, d_in),
        leaf(n) if bias else None,
    )


@pytest.mark.parametrize("chunk_rows", [None, 3])
@pytest.mark.parametrize(("shift", "bias"), [(True, True), (False, False), (True, False)])
def test_topk_encoder_gradcheck_float64(chunk_rows, shift, bias) -> None:
    torch.manual_seed(0)
    x, s, w, b = f64_inputs(shift=shift, bias=bias)

    def encode(x, w, *rest):
        it = iter(rest)
        inputs = EncoderInputs(x, next(it) if shift else None, w, next(it) if bias else None)
        return topk_encode(inputs, 5, chunk_rows=chunk_rows)[0]

    args = tuple(t for t in (x, w, s, b) if t is not None)
    assert torch.autograd.gradcheck(encode, args)


def test_topk_encoder_gradcheck_float64_on_a_subset_of_latents() -> None:
    torch.manual_seed(1)
    x, s, w, b = f64_inputs()
    rows = torch.tensor([3, 7, 8, 20, 21, 33, 39])

    def encode(x, s, w, b):
        values, indices = topk_encode(EncoderInputs(x, s, w, b), 3, rows=rows, chunk_rows=4)
        assert torch.isin(indices, rows).all()
        return values

    assert torch.autograd.gradcheck(encode, (x, s, w, b))


@pytest.mark.parametrize("seed", SEEDS)
@pytest.mark.parametrize(
    "impl", ["sparse_weight_grad", "_weight_grad_dense_backward", "_weight_grad_by_index_add"]
)
def test_weight_gradient_implementations_match_dense(seed, impl) -> None:
    torch.manual_seed(seed)
    batch, k, d, n = 30, 5, 7, 50
    indices = torch.stack([torch.randperm(n)[:k] for _ in range(batch)])
    weights = torch.randn(batch, k)
    x = torch.randn(batch, d)
    dense_codes = torch.zeros(batch, n).scatter(1, indices, weights)
    rows = torch.arange(batch).repeat_interleave(k)
    shuffle = torch.randperm(batch * k)  # flat pairs in any order, each with its row
    flat = (indices.reshape(-1)[shuffle], weights.reshape(-1)[shuffle], x, n)
    if impl == "sparse_weight_grad":
        close(sparse_weight_grad(indices, weights, x, n), dense_codes.t() @ x)
        close(sparse_weight_grad(*flat, rows=rows[shuffle]), dense_codes.t() @ x)
    else:
        close(getattr(weight_grad, impl)(*flat, rows[shuffle]), dense_codes.t() @ x)


def test_pooled_gradients_are_reused_only_once_released() -> None:
    torch.manual_seed(0)
    indices = torch.stack([torch.randperm(50)[:5] for _ in range(30)])
    weights, x = torch.randn(30, 5), torch.randn(30, 7)
    first = sparse_weight_grad(indices, weights, x, 50)
    expected = first.clone()
    second = sparse_weight_grad(indices, 2 * weights, x, 50)  # `first` is still held
    assert first.data_ptr() != second.data_ptr()
    close(first, expected)  # untouched by the second call
    ptr = first.data_ptr()
    del first  # as optimizer.zero_grad(set_to_none=True) drops .grad
    third = sparse_weight_grad(indices, weights, x, 50)
    assert third.data_ptr() == ptr
    close(third, expected)
    close(second, 2 * expected)


def test_gradient_accumulation_over_steps_is_unaffected_by_the_pool() -> None:
    sae = make_sae("linear", 0)
    x1, x2 = torch.randn(B, D_IN), torch.randn(B, D_IN)
    reference = copy.deepcopy(sae)
    reference.fused = False
    for model in (sae, reference):  # two backward passes without zero_grad in between
        for x in (x1, x2):
            (x - model.run(x).x_hat).pow(2).sum().backward()
    for name, p in reference.named_parameters():
        close(dict(sae.named_parameters())[name].grad, p.grad)


def test_sparse_decode_gradcheck_float64() -> None:
    torch.manual_seed(0)
    indices = torch.stack([torch.randperm(30)[:4] for _ in range(9)])
    values = torch.randn(9, 4, dtype=F64, requires_grad=True)
    atoms = torch.randn(30, 7, dtype=F64, requires_grad=True)
    assert torch.autograd.gradcheck(lambda v, a: sparse_decode(indices, v, a), (values, atoms))


@pytest.mark.parametrize("seed", SEEDS)
def test_sparse_decode_matches_embedding_bag(seed, monkeypatch) -> None:
    torch.manual_seed(seed)
    indices = torch.stack([torch.randperm(50)[:5] for _ in range(20)])
    values = torch.randn(20, 5, requires_grad=True)
    atoms = torch.randn(50, 8, requires_grad=True)
    g = torch.randn(20, 8)
    out = sparse_decode(indices, values, atoms)
    mine = torch.autograd.grad((out * g).sum(), (values, atoms))
    ref_out = torch.nn.functional.embedding_bag(
        indices, atoms, per_sample_weights=values, mode="sum"
    )
    ref = torch.autograd.grad((ref_out * g).sum(), (values, atoms))
    close(out, ref_out)
    for a, b in zip(mine, ref, strict=True):
        close(a, b)
    # the accelerator formula (gathered atoms, chunked), forced here on the CPU
    monkeypatch.setattr(memory, "DEFAULT_CHUNK_BYTES", 3 * 5 * 8 * 4)  # three rows a chunk
    rows = torch.arange(indices.shape[0]).repeat_interleave(indices.shape[1])
    gathered = decode._sampled_dots_gathered(g, atoms, indices.reshape(-1), rows)
    close(gathered.view(indices.shape), sampled_dots(g, atoms, indices))


# ---- the SAE: fused against dense --------------------------------------------------------------


def make_sae(decoder: str, seed: int) -> SparseAutoencoder:
    torch.manual_seed(seed)
    sae = SparseAutoencoder(
        D_IN, D_SAE, {"name": "linear"}, {"name": decoder}, {"name": "topk", "k": K, "aux_k": 6}
    )
    with torch.no_grad():
        sae.encoder.b_enc.copy_(0.1 * torch.randn(D_SAE))
        sae.decoder.b_dec.copy_(0.1 * torch.randn(D_IN))
    return sae


def batch_of(kind: str, sae: SparseAutoencoder) -> torch.Tensor:
    x = torch.randn(B, D_IN)
    if kind == "zero_rows":  # pre-activations equal b_enc exactly, which holds ties
        x[::3] = 0.0
        with torch.no_grad():
            sae.decoder.b_dec.zero_()
            sae.encoder.b_enc.copy_(torch.randint(0, 4, (D_SAE,)).float() * 0.1)
    return x


@pytest.mark.parametrize("seed", SEEDS)
@pytest.mark.parametrize("kind", ["random", "zero_rows"])
@pytest.mark.parametrize("decoder", ["linear", "tied"])
@pytest.mark.parametrize("chunk_bytes", [None, 4 * D_SAE * 4])
def test_fused_run_matches_dense_values_and_gradients(
    seed, kind, decoder, chunk_bytes, monkeypatch
) -> None:
    if chunk_bytes is not None:  # four rows per chunk
        monkeypatch.setattr(memory, "DEFAULT_CHUNK_BYTES", chunk_bytes)
    sae = make_sae(decoder, seed)
    x = batch_of(kind, sae)
    (fused, loss_f, grads_f, _), (dense, loss_d, grads_d, _) = run_both(sae, x)

    assert fused.pre_acts is None and dense.pre_acts is not None
    assert fused.codes.indices is not None and fused.codes.values.shape == (B, K)
    assert torch.equal(
        fused.codes.indices.sort(dim=1).values, dense.codes.indices.sort(dim=1).values
    )
    close(fused.codes.dense(), dense.codes.dense())
    close(fused.x_hat, dense.x_hat)
    close(loss_f, loss_d)
    assert grads_f.keys() == grads_d.keys() and len(grads_d) >= 3
    for name in grads_d:
        close(grads_f[name], grads_d[name])
    if kind == "zero_rows":  # the zero rows selected the largest (tied) biases
        top_bias = sae.encoder.b_enc.detach().topk(K).values.sort().values
        assert_close(fused.codes.values[::3].detach().sort(dim=1).values, top_bias.expand(4, -1))


@pytest.mark.parametrize("seed", SEEDS)
@pytest.mark.parametrize("n_dead", [0, 3, 40, D_SAE])
@pytest.mark.parametrize("dead_at_forward", [False, True])
def test_fused_auxk_matches_dense(seed, n_dead, dead_at_forward) -> None:
    sae = make_sae("linear", seed)
    x = torch.randn(B, D_IN) * 2 + 1
    dead = torch.zeros(D_SAE, dtype=torch.bool)
    dead[torch.randperm(D_SAE)[:n_dead]] = True
    (_, loss_f, grads_f, _), (out_d, loss_d, grads_d, _) = run_both(
        sae, x, dead, dead_at_forward=dead_at_forward
    )
    close(loss_f, loss_d)
    for name in grads_d:
        close(grads_f[name], grads_d[name])
    # the reference term itself: AuxK over the dense pre-activations
    residual = x - out_d.x_hat.detach()
    aux = auxk_loss(out_d.pre_acts, x, residual, sae.decoder, dead, 6)
    if n_dead == 0:
        assert aux.item() == 0.0
    else:
        assert aux.item() > 0


@pytest.mark.parametrize("chunk_rows", [None, 3])
def test_topk_encode_with_dead_gradcheck_float64(chunk_rows) -> None:
    torch.manual_seed(2)
    x, s, w, b = f64_inputs()
    dead = torch.zeros(w.shape[0], dtype=torch.bool)
    dead[[1, 5, 17, 30]] = True  # 4 dead, 6 slots: two per row stay empty (0, no gradient)

    def encode(x, s, w, b):
        values, _, sel = topk_encode_with_dead(
            EncoderInputs(x, s, w, b), 5, dead, 6, chunk_rows=chunk_rows
        )
        assert sel.dead is dead and (sel.values == 0).sum() == 2 * x.shape[0]
        return values, sel.values

    assert torch.autograd.gradcheck(encode, (x, s, w, b))


@pytest.mark.parametrize("seed", SEEDS)
@pytest.mark.parametrize(("n_dead", "at_most"), [(40, None), (40, 100), (3, None), (3, 4), (3, 3)])
def test_auxk_selected_in_the_forward_pass_needs_no_second_product(
    seed, n_dead, at_most, monkeypatch
) -> None:
    sae = make_sae("linear", seed)
    x = torch.randn(B, D_IN) * 2 + 1
    dead = torch.zeros(D_SAE, dtype=torch.bool)
    dead[torch.randperm(D_SAE)[:n_dead]] = True
    out = sae.run(x, dead=DeadLatents(dead, at_most))
    width = 6 if at_most is None else min(6, at_most)  # k_aux 6, or the caller's bound
    assert isinstance(out.aux_source, DeadSelection) and out.aux_source.values.shape == (B, width)
    reference = auxk_loss(sae.pre_activations(x), x, x - out.x_hat, sae.decoder, dead, 6)
    recomputed = []
    real = auxk.dead_topk_encode
    monkeypatch.setattr(
        auxk, "dead_topk_encode", lambda *a, **kw: recomputed.append(1) or real(*a, **kw)
    )
    term = sae.sparsity.auxiliary_losses(out.aux_source, x, x - out.x_hat, sae.decoder, dead)
    close(term["auxk"], sae.sparsity.config.aux_coefficient * reference)
    assert not recomputed
    # asked with another mask tensor than the forward pass selected with: selected again
    term = sae.sparsity.auxiliary_losses(
        out.aux_source, x, x - out.x_hat, sae.decoder, dead.clone()
    )
    close(term["auxk"], sae.sparsity.config.aux_coefficient * reference)
    assert recomputed == [1]


def test_auxk_known_to_have_no_dead_latent_is_zero_without_work() -> None:
    sae = make_sae("linear", 0)
    x = torch.randn(B, D_IN)
    dead = torch.zeros(D_SAE, dtype=torch.bool)
    out = sae.run(x, dead=DeadLatents(dead, at_most=0))
    assert isinstance(out.aux_source, DeadSelection) and out.aux_source.values.shape == (B, 0)
    term = sae.sparsity.auxiliary_losses(out.aux_source, x, x - out.x_hat, sae.decoder, dead)
    assert term["auxk"].item() == 0.0
    assert auxk_loss(sae.pre_activations(x), x, x - out.x_hat, sae.decoder, dead, 6).item() == 0


def test_auxk_takes_its_source_from_the_run_output_not_from_plugin_state() -> None:
    sae = make_sae("linear", 0)
    x = torch.randn(B, D_IN)
    dead = torch.ones(D_SAE, dtype=torch.bool)
    with pytest.raises(ValueError, match="got no source"):
        sae.sparsity.auxiliary_losses(None, x, x, sae.decoder, dead)
    out = sae.run(x)
    assert isinstance(out.aux_source, EncoderInputs) and out.pre_acts is None
    assert not any(isinstance(v, EncoderInputs) for v in vars(sae.sparsity).values())  # no stash
    assert "auxk" in sae.sparsity.auxiliary_losses(out.aux_source, x, x, sae.decoder, dead)


def test_fused_inference_matches_dense() -> None:
    sae = make_sae("linear", 0)
    x = torch.randn(3, 5, D_IN)
    dense = copy.deepcopy(sae)
    dense.fused = False
    with torch.no_grad():
        close(sae(x), dense(x))
        close(sae.encode(x.reshape(-1, D_IN)), dense.encode(x.reshape(-1, D_IN)))


# ---- BatchTopK kernel (more in tests/test_fused_batchtopk.py) -----------------------------------


@pytest.mark.parametrize("seed", SEEDS)
def test_batch_topk_codes_are_flat_and_pad_to_the_widest_row(seed) -> None:
    torch.manual_seed(seed)
    pre = torch.randn(7, 40)
    pre[3] += 3.0  # one row holds many of the batch's largest entries
    pre[5] = -10.0  # and one row none
    k = 4
    sel = batch_topk_select(pre, k * 7)
    assert int(sel.valid.sum()) == k * 7 and sel.values.shape == (k * 7,)
    codes = Codes(sel.values, sel.indices, 40, sel.offsets)
    kept = codes.dense()
    flat_top = pre.flatten().topk(k * 7).values
    assert torch.equal(kept[kept != 0].sort().values, flat_top.sort().values)
    l0 = codes.l0()
    assert l0[5] == 0 and l0[3] > k and int(l0.sum()) == k * 7
    padded = codes.padded()  # (7, widest row): what a decoder without flat codes gets
    assert padded.values.shape == (7, int(l0.max())) and not padded.is_flat
    assert torch.equal(padded.dense(), kept) and torch.equal(padded.l0(), l0)
    assert torch.equal(padded.fire_counts(), codes.fire_counts())
    close(padded.l1(), codes.l1())  # summed in another order


@pytest.mark.parametrize("seed", SEEDS)
def test_batch_topk_encode_matches_dense_reference(seed) -> None:
    torch.manual_seed(seed)
    x, s, w, b = (t.float().detach().requires_grad_() for t in f64_inputs(n=64))
    k = 3
    values, indices, offsets = batch_topk_encode(EncoderInputs(x, s, w, b), k * x.shape[0])
    assert values.shape == (k * x.shape[0],)
    g = torch.randn(x.shape[0], 64)
    dense_codes = Codes(torch.relu(values), indices, 64, offsets).dense()
    ((dense_codes * g).sum()).backward()
    got = [t.grad.clone() for t in (x, s, w, b)]

    for t in (x, s, w, b):
        t.grad = None
    acts = torch.relu((x - s) @ w.t() + b)
    flat = acts.flatten()
    top = flat.topk(k * x.shape[0]).indices
    ref = torch.zeros_like(flat).scatter(0, top, flat[top]).view_as(acts)
    ((ref * g).sum()).backward()
    close(dense_codes, ref)
    for mine, theirs in zip(got, (t.grad for t in (x, s, w, b)), strict=True):
        close(mine, theirs)
