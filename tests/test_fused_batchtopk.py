"""BatchTopK on the sparse path (``BatchTopK.fused_encode``) against its dense reference path.

Fresh random inputs each seed, plus exact ties at the threshold and all-zero rows; float32 codes,
losses and gradients must match the dense path to 1e-5 relative, in training (global batch
selection, running threshold), at inference with a measured threshold and before one exists,
with AuxK on dead latents; the autograd path passes gradcheck in float64. Under DDP both paths
send the same values to the same all-gather (``test_fused_and_dense_sync_identically``); the
real two-process runs are in ``tests/test_ddp.py``.
"""

from __future__ import annotations

import copy

import pytest
import torch
from fused_paths import grads, run_both
from torch.testing import assert_close

from sae_lightning.components.sparsity import batchtopk
from sae_lightning.kernels import (
    EncoderInputs,
    batch_topk_encode,
    batch_topk_encode_with_dead,
    batch_topk_select,
    memory,
    select,
    threshold_encode,
    threshold_select,
)
from sae_lightning.sae import SparseAutoencoder

SEEDS = [0, 1, 2]
D_IN, D_SAE, B, K = 16, 512, 12, 4
F64 = torch.float64


def close(actual: torch.Tensor, expected: torch.Tensor) -> None:
    """float32 agreement of two computations of the same quantity (1e-5 relative)."""
    scale = expected.detach().abs().max().clamp_min(1e-30)
    assert_close(actual.detach(), expected.detach(), rtol=1e-5, atol=1e-6 * float(scale))


def scatter(values: torch.Tensor, indices: torch.Tensor, valid: torch.Tensor, n: int):
    """Dense ``(rows, n)`` from a padded selection; also checks the padding convention."""
    assert (values[~valid] == 0).all() and (indices[~valid] == 0).all()
    return torch.zeros(values.shape[0], n, dtype=values.dtype).scatter_add(
        1, indices, values * valid
    )


# ---- the selection kernels ----------------------------------------------------------------


def tied_pre(seed: int, rows: int, n: int) -> torch.Tensor:
    """Pre-activations with an all-zero row, a row of three values and a row of -inf."""
    torch.manual_seed(seed)
    pre = torch.randn(rows, n)
    pre[0] = 0.0
    pre[1] = torch.randint(0, 3, (n,)).float()  # ties across any cut
    pre[2, : n // 2] = -torch.inf
    return pre


@pytest.mark.parametrize("seed", SEEDS)
@pytest.mark.parametrize(
    ("rows", "n", "k"), [(7, 40, 4), (6, 512, 3), (5, 64, 20), (4, 8, 2), (4, 8, 10)]
)
@pytest.mark.parametrize("positive", [False, True])
def test_batch_topk_select_keeps_everything_at_or_above_the_kth_largest(
    seed, rows, n, k, positive
) -> None:
    for pre in (torch.randn(rows, n), tied_pre(seed, rows, n)):
        n_keep = k * rows
        values, indices, valid = batch_topk_select(pre, n_keep, positive=positive)
        threshold = pre.flatten().topk(min(n_keep, pre.numel())).values.min()
        expected = (pre >= threshold) & (pre > 0) if positive else pre >= threshold
        kept = torch.zeros_like(pre, dtype=torch.bool)
        kept[torch.arange(rows)[:, None].expand_as(indices)[valid], indices[valid]] = True
        assert torch.equal(kept, expected)
        assert torch.equal(pre.gather(1, indices)[valid], values[valid])
        assert valid.shape[1] == max(int(expected.sum(dim=1).max()), 1)


def test_batch_topk_select_ties_beyond_the_candidates_are_kept() -> None:
    pre = torch.zeros(3, 16)
    pre[0, :5] = 2.0
    pre[1, :] = 1.0  # the 8th largest is 1.0, tied 16 times
    values, indices, valid = batch_topk_select(pre, 8)
    assert int(valid.sum()) == 5 + 16  # not 8: all ties at the threshold are in
    assert torch.equal(scatter(values, indices, valid, 16), pre)


@pytest.mark.parametrize("seed", SEEDS)
def test_batch_topk_select_uses_the_threshold_it_is_given(seed) -> None:
    torch.manual_seed(seed)
    pre = torch.randn(5, 64)
    seen = []

    def threshold_of(top: torch.Tensor) -> torch.Tensor:
        seen.append(top.sort().values)
        return torch.tensor(0.5)

    values, indices, valid = batch_topk_select(pre, 20, threshold_of=threshold_of)
    assert torch.equal(seen[0], pre.flatten().topk(20).values.sort().values)
    assert torch.equal(scatter(values, indices, valid, 64) != 0, pre >= 0.5)


@pytest.mark.parametrize("seed", SEEDS)
@pytest.mark.parametrize("inclusive", [False, True])
def test_threshold_select_per_row(seed, inclusive) -> None:
    torch.manual_seed(seed)
    pre = tied_pre(seed, 6, 50)
    threshold = torch.tensor(1.0)
    values, indices, valid = threshold_select(pre, threshold, inclusive=inclusive)
    mask = pre >= 1.0 if inclusive else pre > 1.0
    assert torch.equal(scatter(values, indices, valid, 50), torch.where(mask, pre, 0.0))


# ---- the autograd path in float64 -----------------------------------------------------------


def f64_inputs(batch: int = 10, d_in: int = 6, n: int = 40):
    def leaf(*shape):
        return torch.randn(*shape, dtype=F64, requires_grad=True)

    return leaf(batch, d_in), leaf(d_in), leaf(n, d_in), leaf(n)


@pytest.mark.parametrize("mode", ["batch", "threshold", "threshold_chunked"])
def test_gradcheck_float64(mode) -> None:
    torch.manual_seed(0)
    x, s, w, b = f64_inputs()

    def encode(x, s, w, b):
        inputs = EncoderInputs(x, s, w, b)
        if mode == "batch":
            values, indices, valid = batch_topk_encode(inputs, 3 * x.shape[0], positive=True)
        else:
            chunk = 3 if mode == "threshold_chunked" else None
            values, indices, valid = threshold_encode(inputs, 0.8, chunk_rows=chunk)
        return scatter(torch.relu(values), indices, valid, w.shape[0])

    assert torch.autograd.gradcheck(encode, (x, s, w, b))


def test_gradcheck_float64_with_the_dead_selection() -> None:
    torch.manual_seed(3)
    x, s, w, b = f64_inputs()
    dead = torch.zeros(w.shape[0], dtype=torch.bool)
    dead[[2, 9, 11, 25, 38]] = True  # 5 dead, 7 slots: two per row stay empty

    def encode(x, s, w, b):
        values, indices, valid, sel = batch_topk_encode_with_dead(
            EncoderInputs(x, s, w, b), 3 * x.shape[0], dead, 7, positive=True
        )
        assert (sel.values == 0).sum() == 2 * x.shape[0] and dead[
            sel.indices[sel.values != 0]
        ].all()
        return scatter(torch.relu(values), indices, valid, w.shape[0]), sel.values

    assert torch.autograd.gradcheck(encode, (x, s, w, b))


@pytest.mark.parametrize("seed", SEEDS)
def test_fused_float64_matches_dense_float64(seed) -> None:
    sae = make_sae("linear", seed).double()
    x = torch.randn(B, D_IN, dtype=F64)
    (fused, loss_f, grads_f, _), (dense, loss_d, grads_d, _) = run_both(sae, x)
    assert_close(fused.codes.dense(), dense.codes.dense(), rtol=1e-12, atol=1e-12)
    assert_close(loss_f, loss_d, rtol=1e-12, atol=0)
    for name in grads_d:
        assert_close(grads_f[name], grads_d[name], rtol=1e-10, atol=1e-12)


# ---- the SAE: fused against dense -------------------------------------------------------------


def make_sae(decoder: str, seed: int, **sparsity) -> SparseAutoencoder:
    torch.manual_seed(seed)
    spec = {"name": "batchtopk", "k": K, "aux_k": 6, **sparsity}
    sae = SparseAutoencoder(D_IN, D_SAE, {"name": "linear"}, {"name": decoder}, spec)
    with torch.no_grad():
        sae.encoder.b_enc.copy_(0.1 * torch.randn(D_SAE))
        sae.decoder.b_dec.copy_(0.1 * torch.randn(D_IN))
    return sae


def batch_of(kind: str, sae: SparseAutoencoder) -> torch.Tensor:
    x = torch.randn(B, D_IN)
    if kind == "zero_rows":  # all-zero rows, and ties at the threshold
        x[::3] = 0.0
        with torch.no_grad():  # 20 latents equal 10.0 in every row: 20 * B > k * B tied
            sae.encoder.W_enc[:20] = 0.0
            sae.encoder.b_enc[:20] = 10.0
    return x


@pytest.mark.parametrize("seed", SEEDS)
@pytest.mark.parametrize("kind", ["random", "zero_rows"])
@pytest.mark.parametrize("decoder", ["linear", "tied"])
def test_fused_training_matches_dense(seed, kind, decoder, monkeypatch) -> None:
    sae = make_sae(decoder, seed)
    x = batch_of(kind, sae)
    whole_batch_passes = []  # when ties reach past the candidates, the whole batch is compared
    real = select.threshold_select
    monkeypatch.setattr(
        select,
        "threshold_select",
        lambda *a, **kw: whole_batch_passes.append(1) or real(*a, **kw),
    )
    results = []
    for fused in (True, False):
        model = copy.deepcopy(sae)
        model.fused = fused
        out = model.run(x)
        loss = (x - out.x_hat).pow(2).sum(dim=1).mean()
        loss.backward()
        results.append((out, loss, grads(model), model.sparsity.threshold.clone()))
    (fused, loss_f, grads_f, thr_f), (dense, loss_d, grads_d, thr_d) = results

    assert fused.pre_acts is None and dense.pre_acts is not None
    assert fused.codes.indices is not None  # sparse codes, padded to the widest row
    close(fused.codes.dense(), dense.codes.dense())
    assert torch.equal(fused.codes.l0(), dense.codes.l0())
    close(fused.x_hat, dense.x_hat)
    close(loss_f, loss_d)
    assert grads_f.keys() == grads_d.keys() and len(grads_d) >= 3
    for name in grads_d:
        close(grads_f[name], grads_d[name])
    assert torch.equal(thr_f, thr_d) and thr_f > 0  # the running threshold moved identically
    if kind == "zero_rows":  # ties at the threshold: more than k * batch entries kept
        assert int(dense.codes.l0().sum()) > K * B and whole_batch_passes
    else:
        assert int(dense.codes.l0().sum()) == K * B and not whole_batch_passes


@pytest.mark.parametrize("seed", SEEDS)
@pytest.mark.parametrize("n_dead", [0, 3, 40, D_SAE])
@pytest.mark.parametrize("dead_at_forward", [False, True])
def test_fused_auxk_matches_dense(seed, n_dead, dead_at_forward) -> None:
    sae = make_sae("linear", seed)
    x = torch.randn(B, D_IN) * 2 + 1
    dead = torch.zeros(D_SAE, dtype=torch.bool)
    dead[torch.randperm(D_SAE)[:n_dead]] = True
    (_, loss_f, grads_f, _), (out_d, loss_d, grads_d, model_d) = run_both(
        sae, x, dead, dead_at_forward=dead_at_forward
    )
    close(loss_f, loss_d)
    for name in grads_d:
        close(grads_f[name], grads_d[name])
    aux = model_d.sparsity.auxiliary_losses(
        out_d.pre_acts, x, x - out_d.x_hat.detach(), model_d.decoder, dead
    )["auxk"]
    assert (aux.item() == 0.0) == (n_dead == 0)  # the term is live whenever latents are dead


@pytest.mark.parametrize("seed", SEEDS)
@pytest.mark.parametrize("measured", [True, False])
@pytest.mark.parametrize("chunk_bytes", [None, 5 * D_SAE * 4])
def test_fused_inference_matches_dense(seed, measured, chunk_bytes, monkeypatch) -> None:
    if chunk_bytes is not None:  # five rows per chunk: chunks of different widths
        monkeypatch.setattr(memory, "DEFAULT_CHUNK_BYTES", chunk_bytes)
    sae = make_sae("linear", seed)
    x = torch.randn(B, D_IN) * torch.linspace(0.2, 3.0, B).unsqueeze(1)
    if measured:
        sae.train()
        sae.run(torch.randn(4 * B, D_IN))  # measures the threshold
        assert sae.sparsity.threshold > 0
    sae.eval()
    threshold = sae.sparsity.threshold.clone()
    dense = copy.deepcopy(sae)
    dense.fused = False
    with torch.no_grad():
        codes_f, codes_d = sae.encode_codes(x), dense.encode_codes(x)
        assert codes_f.indices is not None
        close(codes_f.dense(), codes_d.dense())
        close(sae(x), dense(x))
    if measured:  # per row: more than one width, so the chunks were padded
        assert codes_f.l0().unique().numel() > 1
    assert torch.equal(sae.sparsity.threshold, threshold)  # inference leaves it alone
    # with gradients too (the inference rule is differentiable like the dense one)
    (_, loss_f, grads_f, _), (_, loss_d, grads_d, _) = run_both(sae, x)
    close(loss_f, loss_d)
    for name in grads_d:
        close(grads_f[name], grads_d[name])


def test_auxk_without_a_source_is_refused() -> None:
    sae = make_sae("linear", 0)
    x = torch.randn(B, D_IN)
    dead = torch.ones(D_SAE, dtype=torch.bool)
    with pytest.raises(ValueError, match="got no source"):
        sae.sparsity.auxiliary_losses(None, x, x, sae.decoder, dead)


# ---- data parallelism -------------------------------------------------------------------------


@pytest.mark.parametrize("seed", SEEDS)
def test_fused_and_dense_sync_identically(seed, monkeypatch) -> None:
    """Two emulated ranks: both paths send the same values to the one all-gather, and each
    rank's codes equal those one process selects on the whole batch."""
    sae = make_sae("linear", seed)
    x = torch.randn(2 * B, D_IN) * torch.linspace(0.2, 3.0, 2 * B).unsqueeze(1)
    one = copy.deepcopy(sae)
    one.fused = False
    whole = one.run(x).codes.dense()
    halves = (x[:B], x[B:])

    sent: dict[tuple[bool, int], torch.Tensor] = {}
    state = {"rank": 0, "path": True, "replay": False}

    def all_gather(out: list[torch.Tensor], top: torch.Tensor) -> None:
        sent.setdefault((state["path"], state["rank"]), top.clone())
        for r in range(2):  # the first pass sends its own values as both ranks'
            other = sent.get((state["path"], r), top) if state["replay"] else top
            out[r].copy_(other)

    monkeypatch.setattr(batchtopk, "data_parallel_world_size", lambda: 2)
    monkeypatch.setattr(batchtopk.dist, "all_gather", all_gather)
    for replay in (False, True):
        state["replay"] = replay
        for fused in (True, False):
            for rank in (0, 1):
                state["path"], state["rank"] = fused, rank
                model = copy.deepcopy(sae)
                model.fused = fused
                codes = model.run(halves[rank]).codes.dense()
                if replay:
                    close(codes, whole[rank * B : (rank + 1) * B])
                    assert torch.equal(model.sparsity.threshold, one.sparsity.threshold)
    for rank in (0, 1):
        assert torch.equal(sent[True, rank].sort().values, sent[False, rank].sort().values)
        assert sent[True, rank].dtype == torch.float32 and sent[True, rank].numel() == 2 * K * B
