"""The core's function-valued batches: quadrature helpers, concept-map codes, point-wise sparsity
and the module's losses and metrics on ``(batch, channels, *grid)`` tensors (float64 references)."""

from __future__ import annotations

import math

import pytest
import torch
from torch import Tensor, nn

from sae_lightning.components.base import Codes, Decoder, Encoder
from sae_lightning.config import PluginConfig
from sae_lightning.data.validation import BadBatchError, BatchValidator
from sae_lightning.errors import ConfigError
from sae_lightning.functional import (
    as_points,
    from_points,
    inner_products,
    l2_norm_sq,
    quadrature_weight,
    relative_l2,
)
from sae_lightning.module import SAEModule


def _grid(n: int) -> Tensor:
    return torch.arange(n, dtype=torch.float64) / n


@pytest.mark.parametrize("n", [8, 16, 64])
def test_l2_norm_of_a_resolved_sine_is_resolution_independent(n: int) -> None:
    x = _grid(n)
    u = torch.stack([torch.sin(2 * math.pi * 3 * x), 2 * torch.cos(2 * math.pi * x)])
    u = u.unsqueeze(0)  # (1, 2 channels, n)
    # int sin^2 = 1/2, int (2 cos)^2 = 2 on [0, 1): exact for a band-limited function.
    assert l2_norm_sq(u).item() == pytest.approx(2.5, abs=1e-12)
    assert quadrature_weight((n,)) == 1 / n


def test_inner_products_and_relative_l2_against_loops() -> None:
    g = torch.Generator().manual_seed(0)
    a = torch.randn(3, 2, 5, 7, generator=g, dtype=torch.float64)
    b = torch.randn(4, 2, 5, 7, generator=g, dtype=torch.float64)
    ref = torch.tensor([[float((ai * bj).sum()) / 35 for bj in b] for ai in a])
    torch.testing.assert_close(inner_products(a, b), ref.double())
    u_hat = a + 0.1 * torch.randn(a.shape, generator=g, dtype=torch.float64)
    ref_rel = torch.stack([((a[i] - u_hat[i]).norm() / a[i].norm()) for i in range(3)])
    torch.testing.assert_close(relative_l2(a, u_hat), ref_rel)
    with pytest.raises(ValueError, match="same grid"):
        inner_products(a, b[:, :, :4])


def test_points_view_round_trip() -> None:
    u = torch.randn(3, 4, 5, 6)
    rows = as_points(u)
    assert rows.shape == (90, 4)
    torch.testing.assert_close(rows[7], u[0, :, 1, 1])  # row = (sample, h, w) in C order
    torch.testing.assert_close(from_points(rows, 3, (5, 6)), u)
    v = torch.randn(3, 4)
    assert as_points(v) is v


def test_codes_on_concept_maps() -> None:
    values = torch.zeros(2, 3, 4)
    values[0, 1, 2] = 2.0
    values[0, 2, 0] = -1.0
    values[0, 2, 3] = 3.0
    values[1, 2, 1] = 1.0
    codes = Codes(values, None, 3)
    assert codes.is_map and not codes.is_sparse
    assert codes.l0().tolist() == [2, 1]  # concepts active anywhere, per sample
    assert codes.fire_counts().tolist() == [0, 1, 2]  # samples in which each concept fires
    # sum over concepts of int |z_j| (weight 1/4 per point)
    torch.testing.assert_close(codes.l1(), torch.tensor([(2 + 1 + 3) / 4, 1 / 4]))


class PointwiseEncoder(Encoder):
    """A 1x1 'operator': the same linear map C -> p at every grid point (test double)."""

    functional = True

    def __init__(self, c: int, p: int) -> None:
        super().__init__(PluginConfig(), d_in=c, d_sae=p)
        self.w = nn.Parameter(torch.randn(p, c, dtype=torch.float64))
        self.b_enc = nn.Parameter(torch.zeros(p, dtype=torch.float64))

    def forward(self, u: Tensor) -> Tensor:
        shape = (1, -1) + (1,) * (u.ndim - 2)
        return torch.einsum("pc,bc...->bp...", self.w, u) + self.b_enc.view(shape)


class PointwiseDecoder(Decoder):
    """A 1x1 decoder p -> C with a per-channel bias (test double)."""

    def __init__(self, c: int, p: int) -> None:
        super().__init__(PluginConfig(), d_in=c, d_sae=p, encoder=None)  # type: ignore[arg-type]
        self.w = nn.Parameter(torch.randn(p, c, dtype=torch.float64))
        self.b_dec = nn.Parameter(torch.zeros(c, dtype=torch.float64))

    def forward(self, codes: Codes) -> Tensor:
        z = codes.dense()
        shape = (1, -1) + (1,) * (z.ndim - 2)
        return torch.einsum("pc,bp...->bc...", self.w, z) + self.b_dec.view(shape)

    def atoms(self) -> Tensor:
        return self.w


def _function_module(sparsity: dict, reconstruction: str = "mse", c: int = 2, p: int = 6):
    module = SAEModule(
        c,
        p,
        {"name": "linear"},
        {"name": "linear"},
        sparsity,
        optimizer={"lr": 1e-2},
        loss={"reconstruction": reconstruction},
    ).double()
    torch.manual_seed(1)
    module.sae.encoder = PointwiseEncoder(c, p)
    module.sae.decoder = PointwiseDecoder(c, p)
    return module


def test_pointwise_topk_on_concept_maps_matches_per_point_reference() -> None:
    module = _function_module({"name": "topk", "k": 2, "aux_coefficient": 0.0})
    u = torch.randn(3, 2, 5, 4, dtype=torch.float64)
    out = module.sae.run(u)
    pre = module.sae.encoder(u)  # (3, 6, 5, 4)
    ref = torch.zeros_like(pre)
    for b in range(3):
        for i in range(5):
            for j in range(4):
                vals, ids = pre[b, :, i, j].topk(2)
                ref[b, ids, i, j] = vals.relu()
    torch.testing.assert_close(out.codes.values, ref)
    assert out.codes.values.shape == (3, 6, 5, 4)
    torch.testing.assert_close(out.x_hat, module.sae.decoder(Codes(ref, None, 6)))
    torch.testing.assert_close(module.sae(u), out.x_hat)


def test_relu_l1_on_maps_is_the_quadrature_mean() -> None:
    module = _function_module(
        {"name": "relu", "l1_coefficient": 0.5, "weight_by_decoder_norm": False}
    )
    u = torch.randn(2, 2, 8, dtype=torch.float64)
    out = module.sae.run(u)
    z = torch.relu(module.sae.encoder(u))
    ref = 0.5 * (z.sum(dim=1).mean(dim=-1)).mean()  # mean over samples of int sum_j z_j
    torch.testing.assert_close(out.penalties["l1"], ref)


@pytest.mark.parametrize("reconstruction", ["mse", "fvu", "rel_l2"])
def test_reconstruction_losses_on_function_batches(reconstruction: str) -> None:
    module = _function_module({"name": "relu", "l1_coefficient": 0.0}, reconstruction)
    u = torch.randn(4, 2, 6, 5, dtype=torch.float64)
    x_hat = u + 0.3 * torch.randn_like(u)
    got = module.reconstruction_loss(u, x_hat)
    err = (u - x_hat).pow(2)
    if reconstruction == "mse":  # mean over grid points (and samples) of the channel sum
        ref = err.sum(dim=1).mean()
    elif reconstruction == "fvu":
        mean = u.mean(dim=(0, 2, 3), keepdim=True)
        ref = err.sum() / (u - mean).pow(2).sum()
    else:
        ref = (err.flatten(1).sum(1) / u.pow(2).flatten(1).sum(1)).mean()
    torch.testing.assert_close(got, ref)


def test_compute_step_metrics_and_training_on_function_batches() -> None:
    module = _function_module({"name": "relu", "l1_coefficient": 1e-3}, "rel_l2")
    g = torch.Generator().manual_seed(3)
    u = torch.randn(16, 2, 12, generator=g, dtype=torch.float64)
    out = module.compute_step(u, step=0)
    x_hat = module.sae.run(u).x_hat
    torch.testing.assert_close(out.metrics["train/rel_l2"], relative_l2(u, x_hat).mean())
    assert out.metrics["train/l0"].item() <= 6
    assert int(module.tokens_seen) == 16  # samples, not grid points
    opt = torch.optim.Adam(module.parameters(), lr=1e-2)
    first = float(out.loss.detach())
    for step in range(60):
        opt.zero_grad()
        module.compute_step(u, step=step).loss.backward()
        opt.step()
    assert float(module.compute_step(u, step=60).loss.detach()) < 0.5 * first

    module.update_validation(u, step=0)
    results, density = module.validation_results()
    x_hat = module.sae.run(u).x_hat
    torch.testing.assert_close(
        results["val/rel_l2"].double(), relative_l2(u, x_hat).mean(), rtol=1e-5, atol=1e-6
    )
    assert density.shape == (6,)
    vector = SAEModule(4, 8, {"name": "linear"}, {"name": "linear"}, {"name": "relu"})
    vector.update_validation(torch.randn(5, 4), step=0)
    assert "val/rel_l2" not in vector.validation_results()[0]  # vectors: no function metric


def test_auxk_on_concept_maps_is_refused_naming_the_field() -> None:
    module = _function_module({"name": "topk", "k": 2})  # default aux_coefficient 1/32
    with pytest.raises(ConfigError, match=r"model\.sparsity\.aux_coefficient"):
        module.compute_step(torch.randn(2, 2, 8, dtype=torch.float64), step=0)


def test_batch_validator_accepts_functions_and_names_the_channels() -> None:
    check = BatchValidator(3, "drop")
    u = torch.randn(4, 3, 5, 5)
    u[1, 2, 3, 3] = float("nan")
    kept = check(u, 0)
    assert kept.shape == (3, 3, 5, 5) and check.dropped_rows == 1
    with pytest.raises(BadBatchError, match=r"\(batch, 3, \*grid\)"):
        check(torch.randn(4, 2, 5), 1)
