"""Decoders (linear, tied) and the SparseAutoencoder composition, against float64 references."""

from __future__ import annotations

import pytest
import torch
from torch.testing import assert_close

from sae_lightning.components.base import Codes, Encoder
from sae_lightning.config import PluginConfig
from sae_lightning.errors import ConfigError
from sae_lightning.registry import registry
from sae_lightning.sae import SparseAutoencoder

D_IN, D_SAE, B = 16, 32, 8
SEEDS = [0, 1, 2]


def encoder():
    return registry.build(
        "encoders", {"name": "linear"}, field="model.encoder", d_in=D_IN, d_sae=D_SAE
    )


def decoder(spec: dict, enc=None):
    enc = enc if enc is not None else encoder()
    return registry.build(
        "decoders", spec, field="model.decoder", d_in=D_IN, d_sae=D_SAE, encoder=enc
    )


def close64(actual: torch.Tensor, expected: torch.Tensor) -> None:
    assert_close(actual.detach().double(), expected.detach().double(), rtol=1e-5, atol=1e-5)


# ---- linear ---------------------------------------------------------------------------------


@pytest.mark.parametrize("seed", SEEDS)
def test_linear_after_step_renormalises_atoms(seed: int) -> None:
    torch.manual_seed(seed)
    dec = decoder({"name": "linear"})
    with torch.no_grad():
        dec.W_dec.mul_(0.2 + 3 * torch.rand(D_SAE, 1)).add_(0.1 * torch.randn(D_SAE, D_IN))
    w64 = dec.W_dec.detach().double()
    assert (w64.norm(dim=1) - 1).abs().max() > 0.1
    dec.after_optimizer_step()
    close64(dec.W_dec.norm(dim=1), torch.ones(D_SAE, dtype=torch.float64))
    close64(dec.W_dec, w64 / w64.norm(dim=1, keepdim=True))  # directions are kept


@pytest.mark.parametrize("seed", SEEDS)
def test_linear_before_step_projects_out_radial_gradient(seed: int) -> None:
    torch.manual_seed(seed)
    dec = decoder({"name": "linear"})
    g = torch.randn(D_SAE, D_IN)
    dec.W_dec.grad = g.clone()
    w64, g64 = dec.W_dec.detach().double(), g.double()
    w64 = w64 / w64.norm(dim=1, keepdim=True)
    tangential = g64 - (g64 * w64).sum(dim=1, keepdim=True) * w64
    assert (g64 * w64).sum(dim=1).abs().max() > 0.1  # there was a radial part to remove

    w_before = dec.W_dec.detach().clone()
    dec.before_optimizer_step()
    close64((dec.W_dec.grad * dec.W_dec).sum(dim=1), torch.zeros(D_SAE, dtype=torch.float64))
    close64(dec.W_dec.grad, tangential)
    assert torch.equal(dec.W_dec.detach(), w_before)  # only the gradient changes


def test_linear_without_unit_norm_changes_nothing() -> None:
    torch.manual_seed(0)
    dec = decoder({"name": "linear", "unit_norm": False})
    with torch.no_grad():
        dec.W_dec.mul_(0.2 + 3 * torch.rand(D_SAE, 1))
    g = torch.randn(D_SAE, D_IN)
    dec.W_dec.grad = g.clone()
    w = dec.W_dec.detach().clone()
    dec.before_optimizer_step()
    dec.after_optimizer_step()
    assert torch.equal(dec.W_dec.grad, g)
    assert torch.equal(dec.W_dec.detach(), w)
    close64(dec.atom_norms(), w.double().norm(dim=1))


def test_linear_without_projection_keeps_gradient_but_renormalises() -> None:
    torch.manual_seed(1)
    dec = decoder({"name": "linear", "project_gradients": False})
    g = torch.randn(D_SAE, D_IN)
    dec.W_dec.grad = g.clone()
    dec.before_optimizer_step()
    assert torch.equal(dec.W_dec.grad, g)
    with torch.no_grad():
        dec.W_dec.mul_(3.0)
    dec.after_optimizer_step()
    close64(dec.W_dec.norm(dim=1), torch.ones(D_SAE, dtype=torch.float64))


@pytest.mark.parametrize("seed", SEEDS)
def test_linear_initialised_from_encoder(seed: int) -> None:
    torch.manual_seed(seed)
    enc = registry.build(
        "encoders", {"name": "linear", "init_scale": 3.0}, field="e", d_in=D_IN, d_sae=D_SAE
    )
    w = enc.W_enc.detach().double()
    close64(decoder({"name": "linear"}, enc).W_dec, w / w.norm(dim=1, keepdim=True))
    fresh = decoder({"name": "linear", "init_from_encoder": False}, enc).W_dec.detach().double()
    close64(fresh.norm(dim=1), torch.ones(D_SAE, dtype=torch.float64))
    assert not torch.allclose(fresh, w / w.norm(dim=1, keepdim=True))


# ---- tied -----------------------------------------------------------------------------------


@pytest.mark.parametrize("seed", SEEDS)
@pytest.mark.parametrize("normalize", [True, False])
def test_tied_atoms_and_gradient_into_encoder(seed: int, normalize: bool) -> None:
    torch.manual_seed(seed)
    enc = registry.build(
        "encoders", {"name": "linear", "init_scale": 2.0}, field="e", d_in=D_IN, d_sae=D_SAE
    )
    with torch.no_grad():
        enc.W_enc.mul_(0.5 + torch.rand(D_SAE, 1))  # rows of different norms
    dec = decoder({"name": "tied", "normalize": normalize}, enc)
    with torch.no_grad():
        dec.b_dec.copy_(torch.randn(D_IN))
    assert [n for n, _ in dec.named_parameters()] == ["b_dec"]  # W_enc is not registered twice

    codes = torch.relu(torch.randn(B, D_SAE))
    g = torch.randn(B, D_IN)
    x_hat = dec(Codes(codes, None, D_SAE))
    (x_hat * g).sum().backward()

    w64 = enc.W_enc.detach().double().requires_grad_()
    atoms = w64 / w64.norm(dim=1, keepdim=True) if normalize else w64
    x_ref = codes.double() @ atoms + dec.b_dec.detach().double()
    (x_ref * g.double()).sum().backward()
    close64(dec.atoms(), atoms)
    close64(dec.atom_norms(), atoms.norm(dim=1))
    close64(x_hat, x_ref)
    close64(enc.W_enc.grad, w64.grad)
    assert enc.W_enc.grad.abs().max() > 0


class NoWeightEncoder(Encoder):
    """A non-linear encoder that exposes no weight matrix."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return torch.zeros(x.shape[0], self.d_sae)


def test_tied_needs_an_encoder_weight() -> None:
    enc = NoWeightEncoder(PluginConfig(), d_in=D_IN, d_sae=D_SAE)
    with pytest.raises(ConfigError) as err:
        decoder({"name": "tied"}, enc)
    assert err.value.field.endswith("decoder.name")
    assert err.value.field == "model.decoder.name"
    assert "NoWeightEncoder" in str(err.value)


# ---- SparseAutoencoder ----------------------------------------------------------------------


def sae(sparsity: dict | None = None, center: bool = True) -> SparseAutoencoder:
    model = SparseAutoencoder(
        D_IN,
        D_SAE,
        {"name": "linear", "center_input": center},
        {"name": "linear"},
        sparsity or {"name": "topk", "k": 4},
    )
    with torch.no_grad():
        model.decoder.b_dec.copy_(torch.randn(D_IN))
        model.encoder.b_enc.copy_(0.1 * torch.randn(D_SAE))
    return model


@pytest.mark.parametrize("seed", SEEDS)
@pytest.mark.parametrize("sparsity", [{"name": "topk", "k": 4}, {"name": "relu"}])
def test_sae_shapes_and_leading_dims(seed: int, sparsity: dict) -> None:
    torch.manual_seed(seed)
    model = sae(sparsity)
    x = torch.randn(B, D_IN)
    feats = model.encode(x)
    assert feats.shape == (B, D_SAE)
    assert model.decode(feats).shape == (B, D_IN)
    assert model(x).shape == (B, D_IN)
    assert_close(model.decode(feats), model(x))
    assert_close(model.decode(model.encode_codes(x)), model(x))
    if sparsity["name"] == "topk":
        assert (model.encode_codes(x).l0() <= 4).all()

    x3 = torch.randn(2, 5, D_IN)
    y3 = model(x3)
    assert y3.shape == (2, 5, D_IN)
    assert_close(y3, model(x3.reshape(10, D_IN)).reshape(2, 5, D_IN))


@pytest.mark.parametrize("seed", SEEDS)
@pytest.mark.parametrize("center", [True, False])
def test_sae_centre_input_subtracts_decoder_bias(seed: int, center: bool) -> None:
    torch.manual_seed(seed)
    model = sae({"name": "relu"}, center=center)
    x = torch.randn(B, D_IN)
    w, b_enc, b_dec = (
        t.detach().double() for t in (model.encoder.W_enc, model.encoder.b_enc, model.decoder.b_dec)
    )
    x64 = x.double() - b_dec if center else x.double()
    pre_ref = x64 @ w.t() + b_enc
    close64(model.pre_activations(x), pre_ref)
    out = model.run(x)
    close64(out.pre_acts, pre_ref)
    close64(out.x_hat, torch.relu(pre_ref) @ model.decoder.W_dec.detach().double() + b_dec)
