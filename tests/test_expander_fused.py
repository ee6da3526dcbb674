"""The expander's fused encode + selection against the dense-masked path, its reference.

The dense-masked path (``sae.fused = False``) is itself checked against the dense matrix
formulas in float64 (tests/test_expander.py); here the fused path must agree with it for every
sparsity it fuses, with ties and all-zero rows, over several blocks of rows, and must never
hold a ``(batch, d_sae)`` tensor.
"""

from __future__ import annotations

import pytest
import torch
from sae_expander import fused
from sae_expander.fused import ExpanderInputs, encode_select, select_above, select_topk
from torch.autograd import gradcheck
from torch.testing import assert_close
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils._pytree import tree_flatten

from sae_lightning.sae import SparseAutoencoder

D_IN, D_SAE, D, K, B = 24, 96, 4, 5, 40

SPECS = {
    "signed_topk": {"name": "signed_topk", "k": K, "aux_k": 7, "aux_coefficient": 0.5},
    "topk": {"name": "topk", "k": K, "aux_coefficient": 0.0},
    "batchtopk": {"name": "batchtopk", "k": K, "aux_coefficient": 0.0},
}


@pytest.fixture(autouse=True, params=[3, 20], ids=["groups-of-1", "groups-of-2"])
def small_blocks(monkeypatch: pytest.MonkeyPatch, request: pytest.FixtureRequest) -> None:
    """Groups of at most 3 or 20 rows in float32 (half as many in float64), in blocks of at
    most 8 rows, so every batch spans many blocks and groups (and ragged last ones)."""
    monkeypatch.setattr(fused, "WORKSPACE_BYTES", request.param * D_SAE * 4)
    monkeypatch.setattr(fused, "_TABLE_ELEMENTS", 1)


def tied_sae(spec: dict, dtype: torch.dtype, seed: int) -> SparseAutoencoder:
    """An SAE whose latents come in identical pairs (same rows, values, bias): every
    pre-activation is tied with its twin, so odd ``k`` splits a tie at the boundary."""
    torch.manual_seed(seed)
    sae = SparseAutoencoder(
        D_IN, D_SAE, {"name": "expander", "d": D, "seed": seed}, {"name": "expander"}, spec
    )
    state = sae.state_dict()
    for key in ("encoder.indices", "encoder.values"):
        state[key][1::2] = state[key][0::2]
    state["encoder.b_enc"] = torch.randn(D_SAE).repeat_interleave(2)[:D_SAE] * 0.3
    state["encoder.b_enc"][1::2] = state["encoder.b_enc"][0::2]
    state["decoder.b_dec"] = torch.randn(D_IN) * 0.1
    sae.load_state_dict(state)
    return sae.to(dtype)


def inputs(sae: SparseAutoencoder, dtype: torch.dtype) -> torch.Tensor:
    x = torch.randn(B, D_IN, dtype=dtype)
    x[:3] = sae.decoder.b_dec.detach()  # all-zero rows once centred: pre = b_enc, all tied
    return x


def step(sae: SparseAutoencoder, x: torch.Tensor, dead: torch.Tensor, fused_path: bool):
    """One training forward + AuxK + backward; returns what both paths must agree on."""
    sae.fused = fused_path
    sae.zero_grad()
    out = sae.run(x)
    assert (out.pre_acts is None) == fused_path
    residual = x - out.x_hat.detach()
    aux = sae.auxiliary_losses(out.aux_source, x, residual, dead)
    loss = (x - out.x_hat).pow(2).sum() + sum(aux.values(), x.new_zeros(()))
    loss.backward()
    grads = {n: p.grad.clone() for n, p in sae.named_parameters()}
    return out.x_hat.detach(), out.codes, loss.detach(), grads


def close(a: torch.Tensor, b: torch.Tensor, dtype: torch.dtype, what: str) -> None:
    if dtype == torch.float64:
        assert_close(a, b, rtol=1e-10, atol=1e-12, msg=lambda m: f"{what}: {m}")
    else:  # 1e-5 relative to the reference's scale
        atol = 1e-5 * float(b.abs().max().clamp_min(1e-30))
        assert_close(a, b, rtol=1e-5, atol=atol, msg=lambda m: f"{what}: {m}")


@pytest.mark.parametrize("dtype", [torch.float64, torch.float32], ids=["f64", "f32"])
@pytest.mark.parametrize("sparsity", list(SPECS))
@pytest.mark.parametrize("seed", [0, 1])
def test_fused_training_step_equals_dense_masked(
    sparsity: str, dtype: torch.dtype, seed: int
) -> None:
    sae = tied_sae(SPECS[sparsity], dtype, seed)
    x = inputs(sae, dtype)
    dead = torch.rand(D_SAE) < 0.4
    ref = step(sae, x, dead, fused_path=False)
    threshold_ref = getattr(sae.sparsity, "threshold", torch.zeros(())).clone()
    if sparsity == "batchtopk":
        sae.sparsity.threshold.fill_(-1.0)  # both paths start from "not measured yet"
    got = step(sae, x, dead, fused_path=True)
    codes, codes_ref = got[1].dense().detach(), ref[1].dense().detach()
    close(got[0], ref[0], dtype, "x_hat")
    close(codes, codes_ref, dtype, "codes")
    close(got[2], ref[2], dtype, "loss")
    # The same latents were selected, ties and zero rows included: same support.
    assert torch.equal(codes != 0, codes_ref != 0)
    for name in ref[3]:
        close(got[3][name], ref[3][name], dtype, f"grad {name}")
    if sparsity == "batchtopk":  # the running inference threshold moved identically
        assert_close(sae.sparsity.threshold, threshold_ref, rtol=0, atol=0)


@pytest.mark.parametrize("sparsity", list(SPECS))
def test_fused_inference_equals_dense_masked(sparsity: str) -> None:
    sae = tied_sae({**SPECS[sparsity], "aux_coefficient": 1 / 32}, torch.float64, 3).eval()
    x = inputs(sae, torch.float64)
    if sparsity == "batchtopk":
        sae.sparsity.threshold.fill_(0.2)  # a measured threshold: one pass, per row
    with torch.no_grad():
        sae.fused = False
        ref = sae.encode(x)
        sae.fused = True
        got = sae.encode(x)
    assert_close(got, ref, rtol=1e-12, atol=1e-14)
    assert torch.equal(got != 0, ref != 0)


def test_core_topk_with_auxk_trains_on_the_dense_path() -> None:
    # The core AuxK term reads dead latents' pre-activations through the linear fused
    # interface, so with AuxK on in training the expander declines and the dense path runs.
    sae = tied_sae({"name": "topk", "k": K}, torch.float64, 0)
    x = inputs(sae, torch.float64)
    assert sae.run(x).pre_acts is not None
    with torch.no_grad():
        assert sae.run(x).pre_acts is None


def test_encode_select_gradcheck() -> None:
    d_in, d_sae = 12, 32
    sae = SparseAutoencoder(
        d_in, d_sae, {"name": "expander", "d": 3}, {"name": "expander"}, {"name": "relu"}
    )
    layout = sae.encoder.layout
    x = torch.randn(4, d_in, dtype=torch.float64, requires_grad=True)
    shift = torch.randn(d_in, dtype=torch.float64, requires_grad=True)
    w = torch.randn(d_sae, 3, dtype=torch.float64, requires_grad=True)
    b = torch.randn(d_sae, dtype=torch.float64, requires_grad=True)
    for select in (select_topk(K), select_above(0.5, inclusive=True)):

        def values(x, shift, w, b, select=select):
            return encode_select(ExpanderInputs(x, shift, w, b, layout), select)[0]

        assert gradcheck(values, (x, shift, w, b))


class LargestTensor(TorchDispatchMode):
    """Records the largest number of elements any op produced."""

    def __init__(self) -> None:
        super().__init__()
        self.largest = 0

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):  # type: ignore[no-untyped-def]
        out = func(*args, **(kwargs or {}))
        for t in tree_flatten(out)[0]:
            if isinstance(t, torch.Tensor):
                self.largest = max(self.largest, t.numel())
        return out


@pytest.mark.parametrize("sparsity", list(SPECS))
def test_fused_step_never_holds_batch_by_d_sae(sparsity: str) -> None:
    batch = 128
    sae = tied_sae(SPECS[sparsity], torch.float32, 0)
    x = torch.randn(batch, D_IN)
    dead = torch.rand(D_SAE) < 0.4
    sizes, widths = {}, {}
    for fused_path in (False, True):
        with LargestTensor() as rec:
            codes = step(sae, x, dead, fused_path)[1]
        sizes[fused_path], widths[fused_path] = rec.largest, codes.values.shape[1]
    assert sizes[False] >= batch * D_SAE  # the dense path does hold them: the probe works
    # Blocks of 3 rows x d_sae; (batch, width) codes and their (batch, width, d) products,
    # width = k, k_aux or BatchTopK's widest row; (batch, d_in) inputs and reconstructions.
    width = max(widths[True], 7)
    assert sizes[True] <= max(3 * D_SAE, batch * width * D, batch * D_IN)
    if sparsity != "batchtopk":  # BatchTopK's widest row here is a sizeable part of d_sae
        assert sizes[True] < batch * D_SAE / 2
