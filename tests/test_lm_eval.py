"""Hooks, the spliced KL/CE evaluation and the e2e loss, on a tiny random GPT-2 in float64."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

pytest.importorskip("transformers")

from lm_scripts.tiny_lm import D_MODEL, make_model

from sae_lightning.errors import ConfigError
from sae_lightning.lm.e2e import e2e_loss
from sae_lightning.lm.evaluation import splice_metrics, spliced_loss_sums
from sae_lightning.lm.hooks import resolve_hooks, run_to_hooks, spliced

HOOK = "transformer.h.1"


@pytest.fixture(scope="module")
def model():
    return make_model(seed=0, dtype=torch.float64).requires_grad_(False)  # frozen, as loaded


@pytest.fixture(scope="module")
def ids():
    return torch.randint(4, 44, (5, 12), generator=torch.Generator().manual_seed(1))


def test_hooks_resolve_globs_and_explain_misses(model):
    assert resolve_hooks(model, "transformer.h.*") == [f"transformer.h.{i}" for i in range(3)]
    assert resolve_hooks(model, "transformer.h.2, transformer.h.0") == [
        "transformer.h.2",
        "transformer.h.0",
    ]
    with pytest.raises(ConfigError, match=r"data.hook: no module .* matches 'model.layers.1'"):
        resolve_hooks(model, "model.layers.1")


def test_harvest_stops_after_the_deepest_hook(model, ids):
    calls = []
    handle = model.transformer.h[2].register_forward_hook(lambda *a: calls.append(1))
    head = model.lm_head.register_forward_hook(lambda *a: calls.append(2))
    try:
        acts = run_to_hooks(model, ids, ["transformer.h.0", HOOK], "output")
    finally:
        handle.remove()
        head.remove()
    assert calls == []
    assert acts[HOOK].shape == (5, 12, D_MODEL)
    # The input of block 2 is the output of block 1: the residual stream between them.
    inputs = run_to_hooks(model, ids, ["transformer.h.2"], "input")
    torch.testing.assert_close(inputs["transformer.h.2"], acts[HOOK], rtol=0, atol=0)
    # The same activations as a full forward pass.
    out = model(ids, output_hidden_states=True)
    torch.testing.assert_close(acts[HOOK], out.hidden_states[2], rtol=0, atol=0)


@pytest.mark.parametrize("io", ["output", "input"])
def test_identity_and_zero_saes_give_the_reference_values(model, ids, io):
    identity = spliced_loss_sums(model, HOOK, io, lambda a: a.clone(), ids, chunk_size=2)
    m = splice_metrics(identity)
    assert m.kl == 0.0
    assert m.ce_sae == m.ce_clean
    assert m.ce_recovered == 1.0 and m.kl_score == 1.0
    # CE clean is the model's own next-token loss (which transformers computes in float32).
    with torch.no_grad():
        assert m.ce_clean == pytest.approx(float(model(ids, labels=ids).loss), rel=1e-6)

    zero = splice_metrics(spliced_loss_sums(model, HOOK, io, torch.zeros_like, ids))
    assert zero.ce_sae == zero.ce_zero_ablation
    assert zero.ce_recovered == 0.0 and zero.kl_score == 0.0
    assert zero.kl > 0 and zero.ce_zero_ablation != zero.ce_clean


def test_partial_reconstruction_matches_a_float64_reference(model, ids):
    def half(a):
        return 0.5 * a

    keep = torch.ones_like(ids, dtype=torch.bool)
    keep[:, 0] = False  # e.g. BOS: stays clean
    got = splice_metrics(spliced_loss_sums(model, HOOK, "output", half, ids, keep, chunk_size=3))

    clean = F.log_softmax(model(ids).logits[:, :-1], dim=-1)

    def patched(fn):
        def hook(module, args, out):
            a = out if isinstance(out, torch.Tensor) else out[0]
            new = torch.where(keep[..., None], fn(a), a)
            return new if isinstance(out, torch.Tensor) else (new, *out[1:])

        h = model.transformer.h[1].register_forward_hook(hook)
        try:
            return F.log_softmax(model(ids).logits[:, :-1], dim=-1)
        finally:
            h.remove()

    sae, zero = patched(half), patched(torch.zeros_like)
    t = ids[:, 1:, None]

    def ce(lp):
        return float(-lp.gather(-1, t).mean())

    def kl(lp):
        return float((clean.exp() * (clean - lp)).sum(-1).mean())

    assert got.kl == pytest.approx(kl(sae), rel=1e-10)
    assert got.ce_sae == pytest.approx(ce(sae), rel=1e-10)
    assert got.ce_zero_ablation == pytest.approx(ce(zero), rel=1e-10)
    want = (ce(zero) - ce(sae)) / (ce(zero) - ce(clean))
    assert got.ce_recovered == pytest.approx(want, rel=1e-9)
    assert got.kl_score == pytest.approx((kl(zero) - kl(sae)) / kl(zero), rel=1e-9)


def test_splice_restores_the_model(model, ids):
    before = model(ids).logits
    with spliced(model, HOOK, "output", torch.zeros_like):
        during = model(ids).logits
    assert not torch.equal(before, during)
    torch.testing.assert_close(model(ids).logits, before, rtol=0, atol=0)


def test_e2e_loss_is_zero_for_identity_and_trains_an_sae(model, ids):
    ds = ["transformer.h.2"]
    exact = e2e_loss(model, HOOK, "output", lambda a: a, ids, downstream=ds)
    assert float(exact.kl) == pytest.approx(0.0, abs=1e-15)
    assert float(exact.downstream) == 0.0

    torch.manual_seed(0)
    sae = torch.nn.Linear(D_MODEL, D_MODEL, dtype=torch.float64)  # random: far from identity
    out = e2e_loss(model, HOOK, "output", sae, ids, downstream=ds)

    # Reference: KL(P_clean || P_sae) per token, as e2e_sae's logits_kl computes it.
    with torch.no_grad():
        clean = F.log_softmax(model(ids).logits, dim=-1)
    h = model.transformer.h[1].register_forward_hook(
        lambda m, a, o: sae(o) if isinstance(o, torch.Tensor) else (sae(o[0]), *o[1:])
    )
    try:
        new = F.log_softmax(model(ids).logits, dim=-1)
    finally:
        h.remove()
    ref = (clean.exp() * (clean - new)).sum(-1).mean()
    torch.testing.assert_close(out.kl, ref, rtol=1e-10, atol=1e-14)
    assert float(out.downstream) > 0

    out.kl.backward()
    assert sae.weight.grad is not None and sae.weight.grad.abs().sum() > 0
    assert all(p.grad is None for p in model.parameters())

    opt = torch.optim.Adam(sae.parameters(), lr=0.02)
    first = float(out.kl)
    for _ in range(30):
        opt.zero_grad()
        loss = e2e_loss(model, HOOK, "output", sae, ids).kl
        loss.backward()
        opt.step()
    assert float(loss) < 0.5 * first
