"""Numerics of the sparsity plugins and AuxK against float64 references on fresh random inputs."""

from __future__ import annotations

import math

import pytest
import torch
from torch.func import functional_call
from torch.testing import assert_close

from sae_lightning.components.base import Codes
from sae_lightning.components.sparsity.auxk import auxk_loss
from sae_lightning.components.sparsity.jumprelu import JumpReLUFunction, StepFunction
from sae_lightning.errors import ConfigError
from sae_lightning.registry import registry

D_IN, D_SAE, B = 16, 32, 8
SEEDS = [0, 1, 2]
F64 = torch.float64


def build(group: str, spec: dict, **ctx):
    field = {"encoders": "model.encoder", "decoders": "model.decoder"}.get(group, "model.sparsity")
    return registry.build(group, spec, field=field, d_in=D_IN, d_sae=D_SAE, **ctx)


def linear_decoder(unit_norm: bool = True):
    """A linear decoder; with ``unit_norm`` False its atoms get norms in [0.5, 2.5)."""
    dec = build(
        "decoders",
        {"name": "linear", "unit_norm": unit_norm},
        encoder=build("encoders", {"name": "linear"}),
    )
    with torch.no_grad():
        if not unit_norm:
            dec.W_dec.mul_(0.5 + 2 * torch.rand(D_SAE, 1))
        dec.b_dec.copy_(torch.randn(D_IN))
    return dec


def close64(actual: torch.Tensor, expected: torch.Tensor) -> None:
    """A float32 result against its float64 reference."""
    assert_close(actual.detach().double(), expected.detach().double(), rtol=1e-5, atol=1e-5)


# ---- ReLU + L1 ------------------------------------------------------------------------------


@pytest.mark.parametrize("seed", SEEDS)
@pytest.mark.parametrize("weighted", [True, False])
def test_relu_codes_penalty_and_gradients(seed: int, weighted: bool) -> None:
    torch.manual_seed(seed)
    dec = linear_decoder(unit_norm=False)
    coeff = 0.3
    sp = build(
        "sparsity", {"name": "relu", "l1_coefficient": coeff, "weight_by_decoder_norm": weighted}
    )
    pre = torch.randn(B, D_SAE, requires_grad=True)
    g = torch.randn(B, D_SAE)
    out = sp(pre, step=0, decoder=dec)
    ((out.codes.values * g).sum() + out.losses["l1"]).backward()

    # float64 reference: codes relu(z); penalty coeff * mean_b sum_i relu(z)_i * ||atom_i||.
    pre64 = pre.detach().double().requires_grad_()
    w64 = dec.W_dec.detach().double().requires_grad_()
    z = torch.relu(pre64)
    norms = w64.norm(dim=1) if weighted else torch.ones(D_SAE, dtype=F64)
    l1_ref = coeff * (z * norms).sum(dim=1).mean()
    ((z * g.double()).sum() + l1_ref).backward()

    assert not out.codes.is_sparse
    assert_close(out.codes.values, torch.relu(pre))
    close64(out.losses["l1"], l1_ref)
    close64(pre.grad, pre64.grad)
    if weighted:
        close64(dec.W_dec.grad, w64.grad)
        # The atoms are far from unit norm, so weighting must matter.
        assert abs(l1_ref.item() - coeff * z.sum(1).mean().item()) > 1e-2
    else:
        assert dec.W_dec.grad is None


def test_relu_weighting_with_unit_norm_decoder_equals_plain_l1() -> None:
    torch.manual_seed(3)
    dec = linear_decoder(unit_norm=True)
    pre = torch.randn(B, D_SAE)
    w = build("sparsity", {"name": "relu", "l1_coefficient": 1.0})(pre, step=0, decoder=dec)
    ref = torch.relu(pre.double()).sum(1).mean()
    close64(w.losses["l1"], ref)


@pytest.mark.parametrize(("step", "factor"), [(0, 0.0), (3, 0.3), (5, 0.5), (10, 1.0), (50, 1.0)])
@pytest.mark.parametrize("plugin", ["relu", "jumprelu"])
def test_penalty_warmup(plugin: str, step: int, factor: float) -> None:
    torch.manual_seed(step)
    dec = linear_decoder()
    key, coeff_name = ("l1", "l1_coefficient") if plugin == "relu" else ("l0", "l0_coefficient")
    pre = torch.randn(B, D_SAE)
    warm = build("sparsity", {"name": plugin, coeff_name: 0.2, "warmup_steps": 10})
    flat = build("sparsity", {"name": plugin, coeff_name: 0.2})
    full = flat(pre, step=step, decoder=dec).losses[key]
    assert full.item() > 0
    got = warm(pre, step=step, decoder=dec).losses[key]
    assert_close(got, full * factor)
    if step == 0:
        assert got.item() == 0.0


# ---- TopK -----------------------------------------------------------------------------------


def topk_reference(pre64: torch.Tensor, k: int) -> torch.Tensor:
    """Dense (batch, d_sae) float64 TopK codes: the k largest per row, ReLU'd."""
    values, indices = pre64.topk(k, dim=1)
    return torch.zeros_like(pre64).scatter(1, indices, torch.relu(values))


def topk_inputs(kind: str, k: int) -> torch.Tensor:
    pre = torch.randn(B, D_SAE)
    if kind == "ties":  # repeated values among the top k and among the rest, none across the cut
        pre = -torch.rand(B, D_SAE)
        pre[:, ::3] = -0.5
        for row in pre:
            top = torch.randperm(D_SAE)[:k]
            row[top] = torch.tensor([1.0, 2.0])[torch.randint(0, 2, (k,))]
    elif kind == "zero_rows":
        pre[::2] = 0.0
    elif kind == "negative_rows":
        pre[1::2] = -pre[1::2].abs() - 0.1
    return pre


@pytest.mark.parametrize("seed", SEEDS)
@pytest.mark.parametrize("kind", ["random", "ties", "zero_rows", "negative_rows"])
def test_topk_codes_and_sparse_decoding_match_dense_reference(seed: int, kind: str) -> None:
    torch.manual_seed(seed)
    k = 5
    dec = linear_decoder()
    sp = build("sparsity", {"name": "topk", "k": k})
    pre = topk_inputs(kind, k).requires_grad_()
    out = sp(pre, step=0, decoder=dec)
    x_hat = dec(out.codes)
    g = torch.randn(B, D_IN)
    (x_hat * g).sum().backward()

    pre64 = pre.detach().double().requires_grad_()
    w64 = dec.W_dec.detach().double().requires_grad_()
    b64 = dec.b_dec.detach().double().requires_grad_()
    codes_ref = topk_reference(pre64, k)
    x_ref = codes_ref @ w64 + b64
    (x_ref * g.double()).sum().backward()

    assert out.codes.is_sparse and out.codes.indices.shape == (B, k)
    close64(out.codes.dense(), codes_ref)
    close64(x_hat, x_ref)
    close64(pre.grad, pre64.grad)
    close64(dec.W_dec.grad, w64.grad)
    close64(dec.b_dec.grad, b64.grad)
    if kind == "zero_rows":
        assert (out.codes.l0()[::2] == 0).all() and (pre.grad[::2] == 0).all()
        assert_close(x_hat[::2].detach(), dec.b_dec.detach().expand(B // 2, -1))
    if kind == "negative_rows":
        assert (out.codes.values[1::2] == 0).all()


@pytest.mark.parametrize("seed", SEEDS)
def test_topk_ties_across_the_cut_pick_a_valid_topk(seed: int) -> None:
    """When the k-th and (k+1)-th values tie either may win; the result must still be a top-k."""
    torch.manual_seed(seed)
    k = 4
    dec = linear_decoder()
    pre = -torch.rand(B, D_SAE)
    for row in pre:
        perm = torch.randperm(D_SAE)
        row[perm[:3]] = torch.tensor([3.0, 2.0, 1.5])
        row[perm[3:6]] = 1.0  # one of three tied entries fills the last slot
    pre.requires_grad_()
    out = build("sparsity", {"name": "topk", "k": k})(pre, step=0, decoder=dec)
    values, indices = out.codes.values, out.codes.indices
    ref_sorted = topk_reference(pre.detach().double(), k).sort(dim=1, descending=True).values[:, :k]
    close64(values.sort(dim=1, descending=True).values, ref_sorted)
    assert_close(values, torch.relu(pre.gather(1, indices)))
    assert (indices.sort(dim=1).values.diff(dim=1) > 0).all()  # distinct latents

    # The sparse (embedding_bag) path equals the dense matmul of the same codes, values and grads.
    g = torch.randn(B, D_IN)
    (grad_sparse,) = torch.autograd.grad((dec(out.codes) * g).sum(), pre, retain_graph=True)
    (grad_dense,) = torch.autograd.grad(
        ((out.codes.dense() @ dec.W_dec + dec.b_dec) * g).sum(), pre
    )
    assert_close(dec(out.codes), out.codes.dense() @ dec.W_dec + dec.b_dec)
    assert_close(grad_sparse, grad_dense)


def test_sparse_decoding_gradcheck_float64() -> None:
    torch.manual_seed(0)
    dec = linear_decoder().double()
    k = 3
    indices = torch.stack([torch.randperm(D_SAE)[:k] for _ in range(4)])
    values = torch.rand(4, k, dtype=F64, requires_grad=True)
    w = dec.W_dec.detach().clone().requires_grad_()
    b = dec.b_dec.detach().clone().requires_grad_()

    def decode(values, w, b):
        return functional_call(dec, {"W_dec": w, "b_dec": b}, (Codes(values, indices, D_SAE),))

    assert torch.autograd.gradcheck(decode, (values, w, b))


@pytest.mark.parametrize("plugin", ["topk", "batchtopk"])
def test_k_larger_than_dictionary_is_a_config_error(plugin: str) -> None:
    with pytest.raises(ConfigError) as err:
        registry.build(
            "sparsity", {"name": plugin, "k": 99}, field="model.sparsity", d_in=16, d_sae=32
        )
    assert err.value.field == "model.sparsity.k"
    assert "99" in str(err.value)


# ---- BatchTopK ------------------------------------------------------------------------------


def batchtopk_reference(pre64: torch.Tensor, k: int) -> torch.Tensor:
    """Dense float64 codes: the k * batch largest entries of relu(pre) over the whole batch."""
    acts = torch.relu(pre64).reshape(-1)
    values, indices = acts.topk(k * pre64.shape[0])
    return torch.zeros_like(acts).scatter(0, indices, values).reshape(pre64.shape)


def varied_rows() -> torch.Tensor:
    """Rows of very different scales, so the batch-level selection gives them different L0."""
    return torch.randn(B, D_SAE) * torch.linspace(0.1, 3.0, B).unsqueeze(1)


@pytest.mark.parametrize("seed", SEEDS)
def test_batchtopk_training_selects_top_k_times_batch(seed: int) -> None:
    torch.manual_seed(seed)
    k = 4
    sp = build("sparsity", {"name": "batchtopk", "k": k}).train()
    pre = varied_rows()
    out = sp(pre, step=0, decoder=linear_decoder())
    ref = batchtopk_reference(pre.double(), k)
    close64(out.codes.dense(), ref)
    l0 = out.codes.l0()
    assert l0.sum().item() == k * B  # mean L0 exactly k
    assert l0.unique().numel() > 1  # rows differ
    assert l0[-1] > l0[0]  # the large-scale row keeps more latents


def test_batchtopk_with_too_few_positives_keeps_only_positives() -> None:
    torch.manual_seed(4)
    k = 4
    sp = build("sparsity", {"name": "batchtopk", "k": k}).train()
    pre = -torch.rand(B, D_SAE)
    pre[0, :5] = torch.rand(5) + 0.1  # 5 positives < k * B
    out = sp(pre, step=0, decoder=linear_decoder())
    close64(out.codes.dense(), torch.relu(pre.double()))
    assert out.codes.l0().sum().item() == 5
    assert_close(sp.threshold, pre[0, :5].min())


@pytest.mark.parametrize("seed", SEEDS)
def test_batchtopk_running_threshold_and_eval(seed: int) -> None:
    torch.manual_seed(seed)
    k, m = 3, 0.25
    dec = linear_decoder()
    sp = build("sparsity", {"name": "batchtopk", "k": k, "threshold_momentum": m}).train()
    assert sp.threshold.item() < 0  # not measured yet

    pre1, pre2 = varied_rows(), varied_rows() * 2
    sp(pre1, step=0, decoder=dec)
    min1 = batchtopk_reference(pre1.double(), k)
    min1 = min1[min1 > 0].min()
    close64(sp.threshold, min1)

    sp(pre2, step=1, decoder=dec)
    min2 = batchtopk_reference(pre2.double(), k)
    min2 = min2[min2 > 0].min()
    expected = min1 + m * (min2 - min1)
    close64(sp.threshold, expected)
    assert abs(expected - min1) > 1e-3  # the second step really moved it

    sp.eval()
    pre3 = varied_rows()
    pre3[0, 0] = sp.threshold  # exactly at the threshold: not active (strict >)
    acts = torch.relu(pre3.double())
    ref = acts * (acts > sp.threshold.double())
    out = sp(pre3, step=2, decoder=dec)
    close64(out.codes.dense(), ref)
    assert out.codes.values[0, 0] == 0
    close64(sp.threshold, expected)  # eval leaves the threshold alone
    # Inference is per-row: one row alone gets the same codes as within the batch.
    close64(sp(pre3[:1], step=2, decoder=dec).codes.dense(), ref[:1])


def test_batchtopk_eval_before_any_training_falls_back_to_batch_selection() -> None:
    torch.manual_seed(5)
    sp = build("sparsity", {"name": "batchtopk", "k": 3}).eval()
    pre = varied_rows()
    close64(
        sp(pre, step=0, decoder=linear_decoder()).codes.dense(),
        batchtopk_reference(pre.double(), 3),
    )


# ---- JumpReLU -------------------------------------------------------------------------------


def near_threshold(theta: torch.Tensor, eps: float, n: int) -> torch.Tensor:
    """(n, d) pre-activations: |z - theta| / eps in [0.001, 0.401) or [0.601, 1.001), a few far."""
    u = torch.rand(n, theta.shape[0], dtype=theta.dtype) * 0.8
    u = torch.where(u < 0.4, u, u + 0.2)
    sign = torch.where(torch.rand_like(u) < 0.5, -1.0, 1.0)
    z = theta + eps * (sign * u + 1e-3 * torch.sign(sign))  # never exactly theta
    far = torch.rand(n, theta.shape[0]) < 0.2
    return torch.where(far, torch.randn_like(z) * 2, z)


def jumprelu_reference_grads(z, theta, eps, g_act, g_step):
    """d/dz and d/dtheta of sum(g_act * JumpReLU(z)) + sum(g_step * H(z - theta))."""
    heaviside = (z > theta).to(z.dtype)
    kernel = ((z - theta).abs() < eps / 2).to(z.dtype)
    d_z = heaviside * g_act
    d_theta = (-(theta / eps) * kernel * g_act - (1 / eps) * kernel * g_step).sum(dim=0)
    return d_z, d_theta


@pytest.mark.parametrize("seed", SEEDS)
@pytest.mark.parametrize("fn", ["jumprelu", "step"])
def test_jumprelu_autograd_functions_match_ste_formulas(seed: int, fn: str) -> None:
    torch.manual_seed(seed)
    eps = 0.1
    theta = (0.3 + torch.rand(D_SAE, dtype=F64)).requires_grad_()
    z = near_threshold(theta.detach(), eps, B).requires_grad_()
    g = torch.randn(B, D_SAE, dtype=F64)
    func = JumpReLUFunction if fn == "jumprelu" else StepFunction
    y = func.apply(z, theta, eps)
    (y * g).sum().backward()

    heaviside = (z.detach() > theta.detach()).to(F64)
    zeros = torch.zeros_like(g)
    g_act, g_step = (g, zeros) if fn == "jumprelu" else (zeros, g)
    d_z, d_theta = jumprelu_reference_grads(z.detach(), theta.detach(), eps, g_act, g_step)
    assert_close(y, z.detach() * heaviside if fn == "jumprelu" else heaviside)
    assert_close(z.grad, d_z)
    assert_close(theta.grad, d_theta)
    assert (theta.grad != 0).any()  # some z fell inside the kernel


def test_jumprelu_z_gradient_gradcheck_away_from_threshold() -> None:
    """Away from theta the function is smooth in z, so finite differences must agree there."""
    torch.manual_seed(0)
    theta = torch.full((D_SAE,), 0.5, dtype=F64)
    z = theta + torch.where(torch.rand(4, D_SAE) < 0.5, -1.0, 1.0) * (0.1 + torch.rand(4, D_SAE))
    z.requires_grad_()
    assert torch.autograd.gradcheck(lambda z: JumpReLUFunction.apply(z, theta, 0.01), (z,))


@pytest.mark.parametrize("seed", SEEDS)
def test_jumprelu_plugin_forward_and_log_threshold_gradient(seed: int) -> None:
    torch.manual_seed(seed)
    eps, coeff = 0.1, 0.7
    sp = build("sparsity", {"name": "jumprelu", "bandwidth": eps, "l0_coefficient": coeff}).double()
    with torch.no_grad():
        sp.log_threshold.copy_(torch.log(0.3 + torch.rand(D_SAE, dtype=F64)))
    theta = sp.log_threshold.detach().exp()
    pre = near_threshold(theta, eps, B).requires_grad_()
    g = torch.randn(B, D_SAE, dtype=F64)
    out = sp(pre, step=0, decoder=linear_decoder().double())
    ((out.codes.values * g).sum() + out.losses["l0"]).backward()

    z = pre.detach()
    heaviside = (z > theta).to(F64)
    assert_close(out.codes.values, z * heaviside)
    assert_close(out.losses["l0"], coeff * heaviside.sum(dim=1).mean())
    # l0 = coeff * mean_b sum_i H: each H gets upstream gradient coeff / B.
    d_z, d_theta = jumprelu_reference_grads(z, theta, eps, g, torch.full_like(g, coeff / B))
    assert_close(pre.grad, d_z)
    assert_close(sp.log_threshold.grad, theta * d_theta)  # chain rule through theta = exp(log)
    assert (sp.log_threshold.grad != 0).sum() > D_SAE // 4


def test_jumprelu_initial_threshold() -> None:
    sp = build("sparsity", {"name": "jumprelu", "init_threshold": 0.05})
    assert_close(sp.threshold, torch.full((D_SAE,), 0.05))
    assert_close(sp.log_threshold.detach(), torch.full((D_SAE,), math.log(0.05)))


# ---- AuxK -----------------------------------------------------------------------------------


def auxk_reference(pre, x, residual, w, dead, k_aux, b_dec=None):
    """float64: top k_aux pre-acts among dead latents decode the residual, without the bias."""
    dead_ids = dead.nonzero().squeeze(1)
    values, j = pre[:, dead_ids].topk(min(k_aux, dead_ids.numel()), dim=1)
    codes = torch.zeros_like(pre).scatter(1, dead_ids[j], values)
    e_hat = codes @ w
    if b_dec is not None:  # the pre-fix sparsify behaviour (issue #132)
        e_hat = e_hat + b_dec
    scale = min(dead_ids.numel() / k_aux, 1.0)
    return scale * (e_hat - residual).pow(2).sum() / (x - x.mean(dim=0)).pow(2).sum()


def auxk_inputs(n_dead: int):
    dec = linear_decoder()
    pre = torch.randn(B, D_SAE, requires_grad=True)
    x = torch.randn(B, D_IN) * 2 + 1
    residual = x - torch.randn(B, D_IN)
    dead = torch.zeros(D_SAE, dtype=torch.bool)
    dead[torch.randperm(D_SAE)[:n_dead]] = True
    return dec, pre, x, residual, dead


@pytest.mark.parametrize("seed", SEEDS)
@pytest.mark.parametrize("n_dead", [3, 8, 20, D_SAE])
def test_auxk_matches_reference_and_only_dead_latents_get_gradient(seed: int, n_dead: int) -> None:
    torch.manual_seed(seed)
    k_aux = 8
    dec, pre, x, residual, dead = auxk_inputs(n_dead)
    loss = auxk_loss(pre, x, residual, dec, dead, k_aux)
    loss.backward()

    pre64 = pre.detach().double().requires_grad_()
    w64 = dec.W_dec.detach().double().requires_grad_()
    ref = auxk_reference(pre64, x.double(), residual.double(), w64, dead, k_aux)
    ref.backward()
    close64(loss, ref)
    close64(pre.grad, pre64.grad)
    close64(dec.W_dec.grad, w64.grad)
    assert (pre.grad[:, ~dead] == 0).all()
    assert (pre.grad[:, dead] != 0).any()
    assert (dec.W_dec.grad[~dead] == 0).all()
    assert dec.b_dec.grad is None or (dec.b_dec.grad == 0).all()


@pytest.mark.parametrize("seed", SEEDS)
def test_auxk_is_exactly_zero_without_dead_latents(seed: int) -> None:
    torch.manual_seed(seed)
    dec, pre, x, residual, _ = auxk_inputs(0)
    loss = auxk_loss(pre, x, residual, dec, torch.zeros(D_SAE, dtype=torch.bool), 8)
    assert loss.item() == 0.0
    loss.backward()
    assert (pre.grad == 0).all()


@pytest.mark.parametrize("seed", SEEDS)
def test_auxk_regression_decoder_bias_excluded(seed: int) -> None:
    """sparsify issue #132: e_hat once included b_dec, though the residual already excludes it."""
    torch.manual_seed(seed)
    k_aux = 8
    dec, pre, x, _, dead = auxk_inputs(12)
    # As in training: b_dec carries the data mean, the residual x - x_hat is small and bias-free.
    residual = 0.1 * torch.randn(B, D_IN)
    with torch.no_grad():
        dec.b_dec.copy_(x.mean(dim=0))
    got = auxk_loss(pre, x, residual, dec, dead, k_aux).double()
    args = (
        pre.detach().double(),
        x.double(),
        residual.double(),
        dec.W_dec.detach().double(),
        dead,
        k_aux,
    )
    correct = auxk_reference(*args)
    buggy = auxk_reference(*args, b_dec=dec.b_dec.detach().double())
    assert buggy > 2 * correct  # the bias would dominate the old formula
    close64(got, correct)


def test_topk_auxiliary_losses_use_coefficient_and_can_be_disabled() -> None:
    torch.manual_seed(0)
    dec, pre, x, residual, dead = auxk_inputs(12)
    sp = build("sparsity", {"name": "topk", "k": 4, "aux_coefficient": 0.5, "aux_k": 6})
    got = sp.auxiliary_losses(pre, x, residual, dec, dead)["auxk"]
    close64(
        got,
        0.5
        * auxk_reference(
            pre.detach().double(),
            x.double(),
            residual.double(),
            dec.W_dec.detach().double(),
            dead,
            6,
        ),
    )
    off = build("sparsity", {"name": "topk", "k": 4, "aux_coefficient": 0.0})
    assert off.auxiliary_losses(pre, x, residual, dec, dead) == {}
    assert build("sparsity", {"name": "topk", "k": 4}).k_aux == D_IN // 2


@pytest.mark.parametrize("name", ["relu", "topk", "batchtopk", "jumprelu"])
def test_an_empty_batch_encodes_and_decodes_to_nothing(name: str) -> None:
    # e2e training can hand the SAE no positions at all (every token special).
    from sae_lightning.sae import SparseAutoencoder

    spec = {"name": name, **({"k": 4} if "topk" in name else {})}
    sae = SparseAutoencoder(8, 32, {"name": "linear"}, {"name": "linear"}, spec)
    out = sae.run(torch.zeros(0, 8))
    assert out.x_hat.shape == (0, 8) and out.codes.l0().shape == (0,)
    out.x_hat.sum().backward()
    assert all(p.grad is None or not p.grad.any() for p in sae.parameters())
