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

from sae_lightning.components.base import Codes
from sae_lightning.components.decoders.linear import LinearDecoder
from sae_lightning.components.sparsity import batchtopk
from sae_lightning.kernels import (
    EncoderInputs,
    batch_topk_encode,
    batch_topk_encode_with_dead,
    batch_topk_select,
    memory,
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


def expected_positions(pre: torch.Tensor, n_keep: int) -> torch.Tensor:
    """Flat positions of the ``n_keep`` largest entries, ties by position: a stable sort's."""
    order = pre.flatten().sort(descending=True, stable=True).indices
    return order[: min(n_keep, pre.numel())].sort().values


def check_flat(sel, pre: torch.Tensor, positions: torch.Tensor, capacity: int) -> None:
    """``sel`` holds exactly the entries of ``pre`` at the flat ``positions``, row-major, in a
    list of ``capacity`` slots padded at the end (value 0, latent 0, last row)."""
    rows, n = pre.shape
    assert sel.values.shape == sel.indices.shape == sel.valid.shape == (capacity,)
    kept = int(sel.valid.sum())
    assert kept == positions.numel() and bool(sel.valid[:kept].all())
    flat = sel.rows[:kept] * n + sel.indices[:kept]
    assert torch.equal(flat, positions)  # row-major: sorted by row, then latent
    assert torch.equal(sel.values[:kept], pre.flatten()[positions])
    pad = ~sel.valid
    assert (sel.values[pad] == 0).all() and (sel.indices[pad] == 0).all()
    assert (sel.rows[pad] == rows - 1).all()
    starts = torch.searchsorted(sel.rows, torch.arange(rows))
    assert torch.equal(sel.offsets, starts)


@pytest.mark.parametrize("seed", SEEDS)
@pytest.mark.parametrize(
    ("rows", "n", "k"), [(7, 40, 4), (6, 512, 3), (5, 64, 20), (4, 8, 2), (4, 8, 10)]
)
def test_batch_topk_select_keeps_the_n_keep_largest_ties_by_position(seed, rows, n, k) -> None:
    for pre in (torch.randn(rows, n), tied_pre(seed, rows, n)):
        n_keep = k * rows
        sel = batch_topk_select(pre, n_keep)
        check_flat(sel, pre, expected_positions(pre, n_keep), min(n_keep, pre.numel()))


def test_batch_topk_select_ties_beyond_the_candidates_go_by_position() -> None:
    pre = torch.zeros(3, 16)
    pre[0, :5] = 2.0
    pre[1, :] = 1.0  # the 8th largest is 1.0, tied 16 times: the first three are kept
    sel = batch_topk_select(pre, 8)
    assert sel.rows.tolist() == [0] * 5 + [1] * 3
    assert sel.indices.tolist() == [0, 1, 2, 3, 4, 0, 1, 2]
    assert sel.values.tolist() == [2.0] * 5 + [1.0] * 3


@pytest.mark.parametrize("seed", SEEDS)
def test_batch_topk_select_uses_the_threshold_and_quota_it_is_given(seed) -> None:
    torch.manual_seed(seed)
    pre = torch.randn(5, 64)
    seen = []
    given = pre.flatten().topk(20).values[13]  # the 14th largest

    def threshold_of(top: torch.Tensor) -> torch.Tensor:
        seen.append(top.sort().values)
        return given

    sel = batch_topk_select(pre, 20, threshold_of=threshold_of)
    assert torch.equal(seen[0], pre.flatten().topk(20).values.sort().values)
    check_flat(sel, pre, (pre.flatten() >= given).nonzero().flatten(), 20)
    # a quota of 0 leaves out the entry equal to the threshold
    sel = batch_topk_select(
        pre, 20, threshold_of=lambda top: given, quota_of=lambda above, tied: above * 0
    )
    check_flat(sel, pre, (pre.flatten() > given).nonzero().flatten(), 20)


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
            values, indices, offsets = batch_topk_encode(inputs, 3 * x.shape[0])
            return Codes(torch.relu(values), indices, w.shape[0], offsets).dense()
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
        values, indices, offsets, sel = batch_topk_encode_with_dead(
            EncoderInputs(x, s, w, b), 3 * x.shape[0], dead, 7
        )
        assert (sel.values == 0).sum() == 2 * x.shape[0] and dead[
            sel.indices[sel.values != 0]
        ].all()
        return Codes(torch.relu(values), indices, w.shape[0], offsets).dense(), sel.values

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
    assert fused.codes.is_flat  # k * B pairs in one list
    close(fused.codes.dense(), dense.codes.dense())
    assert torch.equal(fused.codes.l0(), dense.codes.l0())
    close(fused.x_hat, dense.x_hat)
    close(loss_f, loss_d)
    assert grads_f.keys() == grads_d.keys() and len(grads_d) >= 3
    for name in grads_d:
        close(grads_f[name], grads_d[name])
    assert torch.equal(thr_f, thr_d) and thr_f > 0  # the running threshold moved identically
    assert int(dense.codes.l0().sum()) == K * B  # exactly k * batch, ties or not
    acts = torch.relu(dense.pre_acts.detach())  # the tied entries kept are the first by position
    expected = torch.zeros(B * D_SAE, dtype=torch.bool)
    expected[expected_positions(acts, K * B)] = True
    assert torch.equal(dense.codes.dense() != 0, expected.view(B, D_SAE) & (acts > 0))


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

    sent: dict[tuple[bool, int, str], torch.Tensor] = {}
    state = {"rank": 0, "path": True, "replay": False}

    def all_gather(out: list[torch.Tensor], mine: torch.Tensor) -> None:
        kind = "counts" if mine.dtype == torch.long else "top"  # (above, tied) or values
        sent.setdefault((state["path"], state["rank"], kind), mine.clone())
        for r in range(2):  # the first pass sends its own values as both ranks'
            other = sent.get((state["path"], r, kind), mine) if state["replay"] else mine
            out[r].copy_(other)

    monkeypatch.setattr(batchtopk, "data_parallel_world_size", lambda: 2)
    monkeypatch.setattr(batchtopk.dist, "all_gather", all_gather)
    monkeypatch.setattr(batchtopk.dist, "get_rank", lambda: state["rank"])
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
        top_f, top_d = sent[True, rank, "top"], sent[False, rank, "top"]
        assert torch.equal(top_f.sort().values, top_d.sort().values)
        assert top_f.dtype == torch.float32 and top_f.numel() == 2 * K * B
        assert torch.equal(sent[True, rank, "counts"], sent[False, rank, "counts"])


# ---- decoders and flat codes --------------------------------------------------------------------


@pytest.mark.parametrize("declares", [False, True])
def test_a_decoder_that_overrides_decoding_gets_codes_padded_unless_it_takes_flat(
    declares,
) -> None:
    """A decoder overriding ``decode_without_bias`` may not know flat codes: the SAE pads them
    per row for it, unless it declares ``takes_flat_codes``; the reconstruction is the same."""
    seen: list[bool] = []

    class Recording(LinearDecoder):
        takes_flat_codes = declares

        def decode_without_bias(self, codes: Codes) -> torch.Tensor:
            seen.append(codes.is_flat)
            return super().decode_without_bias(codes)

    class Plain(LinearDecoder):  # overrides without declaring: padded codes
        def decode_without_bias(self, codes: Codes) -> torch.Tensor:
            return super().decode_without_bias(codes)

    assert LinearDecoder.takes_flat_codes and not Plain.takes_flat_codes
    sae = make_sae("linear", 0)
    x = torch.randn(B, D_IN)
    expected = copy.deepcopy(sae).run(x)
    assert expected.codes.is_flat
    sae.decoder.__class__ = Recording
    out = sae.run(x)
    assert seen == [declares] and out.codes.is_flat == declares
    close(out.x_hat, expected.x_hat)
    close(out.codes.dense(), expected.codes.dense())
