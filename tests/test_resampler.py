"""The dead-latent resampler: who is chosen, how they are re-initialised, what the optimizer
keeps, and that a resumed run resamples exactly as an uninterrupted one."""

from __future__ import annotations

import math
from pathlib import Path

import lightning.pytorch as pl
import pytest
import torch
from lightning.pytorch.demos.boring_classes import BoringModel
from safetensors.torch import load_file

from sae_lightning.callbacks import resampling
from sae_lightning.callbacks.resampling import DeadFeatureResampler, DeadFeatureResamplerConfig
from sae_lightning.components.base import Encoder
from sae_lightning.components.encoders.linear import LinearEncoder
from sae_lightning.data.synthetic import SyntheticConfig, SyntheticDataModule
from sae_lightning.errors import ConfigError
from sae_lightning.module import SAEModule
from sae_lightning.recipe import load_recipe
from sae_lightning.registry import registry
from sae_lightning.runner import build_run, fit

D_IN, D_SAE, BATCH = 16, 32, 64
RECIPE = Path(__file__).resolve().parents[1] / "recipes" / "quickstart.yaml"
KILLED = [3, 7, 11, 20]


def module(sparsity: dict | None = None, decoder: str = "linear", window: int = 128) -> SAEModule:
    torch.manual_seed(0)
    return SAEModule(
        D_IN,
        D_SAE,
        {"name": "linear"},
        {"name": decoder},
        sparsity or {"name": "topk", "k": 3, "aux_coefficient": 0.0},
        optimizer={"lr": 1e-2, "decay": "constant"},
        loss={"dead_window_tokens": window},
    )


def datamodule() -> SyntheticDataModule:
    return SyntheticDataModule(
        SyntheticConfig(d=D_IN, n_atoms=64, n_active=3, batch_size=BATCH, val_samples=16), seed=0
    )


def trainer(steps: int, *callbacks: pl.Callback) -> pl.Trainer:
    return pl.Trainer(
        max_steps=steps,
        accelerator="cpu",
        logger=False,
        enable_checkpointing=False,
        enable_progress_bar=False,
        enable_model_summary=False,
        limit_val_batches=0,
        num_sanity_val_steps=0,
        callbacks=list(callbacks),
    )


def kill(m: SAEModule) -> None:
    with torch.no_grad():
        m.sae.encoder.b_enc[KILLED] = -10.0  # these latents stop firing


class KillAfterFirstStep(pl.Callback):
    """The KILLED latents fire (and gather Adam moments) in step 1, then never again."""

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx) -> None:
        if trainer.global_step == 1:
            kill(pl_module)


def resampler(**overrides) -> DeadFeatureResampler:
    cfg = {"every_n_steps": 3, "max_resamples": 1, "n_candidates": 2 * BATCH, **overrides}
    return DeadFeatureResampler(DeadFeatureResamplerConfig(**cfg))


# ---- choosing ------------------------------------------------------------------------------


def test_dead_latents_are_those_past_the_window() -> None:
    m = module(window=100)
    with torch.no_grad():
        m.tokens_since_fired.copy_(torch.arange(D_SAE) * 10)  # latents >= 10 are past 100
    ids, directions, norm = resampler().choose(
        m, torch.randn(50, D_IN), torch.Generator().manual_seed(0)
    )
    assert ids.tolist() == list(range(10, D_SAE))
    torch.testing.assert_close(directions.norm(dim=1), torch.ones(len(ids)))
    alive_mean = m.sae.encoder.W_enc.detach()[:10].norm(dim=1).mean()
    torch.testing.assert_close(norm, 0.2 * alive_mean)
    # The callback's own window overrides the model's.
    ids, _, _ = resampler(dead_window_tokens=250).choose(
        m, torch.randn(50, D_IN), torch.Generator().manual_seed(0)
    )
    assert ids.tolist() == list(range(25, D_SAE))


def test_inputs_are_drawn_in_proportion_to_squared_loss(monkeypatch) -> None:
    m = module(window=1)
    with torch.no_grad():
        m.tokens_since_fired.fill_(0)
        m.tokens_since_fired[[0, 1]] = 5  # two dead latents
    candidates = torch.eye(4, D_IN)
    errors = torch.tensor([0.0, 1.0, 0.0, 2.0])  # weights (loss^2): 0, 1, 0, 4
    monkeypatch.setattr(resampling, "squared_errors", lambda sae, x: errors)
    ids, directions, _ = resampler().choose(m, candidates, torch.Generator().manual_seed(0))
    assert ids.tolist() == [0, 1]
    # Without replacement: the two inputs with a nonzero loss, never a zero-loss one.
    assert sorted(directions.argmax(dim=1).tolist()) == [1, 3]

    with torch.no_grad():
        m.tokens_since_fired[1] = 0  # one dead latent: count its draws
    draws = [
        int(resampler().choose(m, candidates, torch.Generator().manual_seed(s))[1].argmax())
        for s in range(2000)
    ]
    share = draws.count(3) / len(draws)
    assert set(draws) == {1, 3}
    assert abs(share - 0.8) < 0.04, share  # 4 / (1 + 4), not 2 / (1 + 2)


# ---- applying, end to end ------------------------------------------------------------------


def test_resampling_reinitialises_dead_latents_and_their_adam_state_only() -> None:
    """Resample after step 3, the last step: the state is what the resample left."""
    dm = datamodule()
    plain, resampled = module(), module()
    plain_trainer = trainer(3, KillAfterFirstStep())
    plain_trainer.fit(plain, datamodule=datamodule())
    t = trainer(3, KillAfterFirstStep(), callback := resampler())
    t.fit(resampled, datamodule=dm)
    assert callback.total_resampled >= len(KILLED)
    assert t.callback_metrics["train/resampled"] == callback.total_resampled

    dead = (plain.tokens_since_fired >= 128).nonzero().squeeze(1)
    assert set(KILLED) <= set(dead.tolist())
    alive = torch.ones(D_SAE, dtype=torch.bool)
    alive[dead] = False
    enc, dec = resampled.sae.encoder, resampled.sae.decoder

    # Decoder atoms: unit-norm copies of inputs from the last two batches (the candidates).
    pool = torch.cat([dm.generative.batch(t) for t in (1, 2)])
    pool = pool / pool.norm(dim=1, keepdim=True)
    atoms = dec.W_dec.detach()[dead]
    torch.testing.assert_close(atoms.norm(dim=1), torch.ones(len(dead)))
    assert ((atoms @ pool.T).max(dim=1).values > 1 - 1e-5).all()
    # Encoder rows: the same direction at 0.2 x the mean norm of the live rows; bias 0.
    norm = 0.2 * enc.W_enc.detach()[alive].norm(dim=1).mean()
    torch.testing.assert_close(enc.W_enc.detach()[dead], atoms * norm)
    assert (enc.b_enc.detach()[dead] == 0).all()
    assert (resampled.tokens_since_fired[dead] == 0).all()

    # Adam: the touched rows start over; every other entry is exactly as without resampling.
    opt_r, opt_p = t.optimizers[0], plain_trainer.optimizers[0]
    pairs = [
        (enc.W_enc, plain.sae.encoder.W_enc),
        (enc.b_enc, plain.sae.encoder.b_enc),
        (dec.W_dec, plain.sae.decoder.W_dec),
    ]
    for p_r, p_p in pairs:
        for key in ("exp_avg", "exp_avg_sq"):
            s_r, s_p = opt_r.state[p_r][key], opt_p.state[p_p][key]
            assert (s_r[dead] == 0).all(), key
            had = (s_p[KILLED].reshape(len(KILLED), -1) != 0).any(dim=1)
            assert had.all(), key  # without the reset these rows would keep their moments
            assert torch.equal(s_r[alive], s_p[alive]), key
            assert (s_p[alive] != 0).any()  # the comparison is not between zeros
        assert torch.equal(opt_r.state[p_r]["step"], opt_p.state[p_p]["step"])
    b_dec_r, b_dec_p = opt_r.state[dec.b_dec], opt_p.state[plain.sae.decoder.b_dec]
    assert torch.equal(b_dec_r["exp_avg"], b_dec_p["exp_avg"])  # not a per-latent parameter


def test_tied_decoder_and_jumprelu_threshold() -> None:
    m = module({"name": "jumprelu", "init_threshold": 0.01}, decoder="tied")
    with torch.no_grad():
        m.sae.sparsity.log_threshold.fill_(math.log(0.5))
    ids = torch.tensor([2, 5])
    directions = torch.nn.functional.normalize(torch.randn(2, D_IN), dim=1)
    touched = m.resample_latents(ids, directions, torch.tensor(0.3))
    torch.testing.assert_close(m.sae.encoder.W_enc.detach()[ids], directions * 0.3)
    torch.testing.assert_close(m.sae.atoms().detach()[ids], directions)  # tied: W_enc rows
    torch.testing.assert_close(m.sae.sparsity.threshold.detach()[ids], torch.full((2,), 0.01))
    assert m.sae.sparsity.threshold.detach()[0] == pytest.approx(0.5)
    assert {id(t.param) for t in touched} == {
        id(m.sae.encoder.W_enc),
        id(m.sae.encoder.b_enc),
        id(m.sae.sparsity.log_threshold),
    }


def test_nothing_dead_nothing_changes() -> None:
    m = module(window=10**9)
    before = {k: v.clone() for k, v in m.state_dict().items()}
    t = trainer(3, callback := resampler())
    reference = module(window=10**9)
    trainer(3).fit(reference, datamodule=datamodule())
    t.fit(m, datamodule=datamodule())
    assert callback.n_resamples == 1 and callback.total_resampled == 0
    for key, value in reference.state_dict().items():
        assert torch.equal(value, m.state_dict()[key]), key
    assert any(not torch.equal(before[k], v) for k, v in m.state_dict().items())


# ---- setup errors --------------------------------------------------------------------------


class NoResampleEncoder(LinearEncoder):
    resample_rows = Encoder.resample_rows  # opts out of the resampling interface


def test_plugin_without_the_interface_fails_at_setup() -> None:
    m = module()
    m.sae.encoder.__class__ = NoResampleEncoder
    with pytest.raises(ConfigError, match=r"NoResampleEncoder\.resample_rows not implemented"):
        trainer(2, resampler()).fit(m, datamodule=datamodule())


def test_module_without_members_fails_at_setup() -> None:
    with pytest.raises(ConfigError, match="needs a module with members"):
        trainer(2, resampler()).fit(BoringModel())


def test_registered_as_callback_plugin() -> None:
    cb = registry.build("callbacks", {"name": "resampler", "every_n_steps": 7}, field="callbacks.0")
    assert isinstance(cb, DeadFeatureResampler) and cb.config.every_n_steps == 7
    with pytest.raises(ConfigError, match=r"callbacks\.0\.every_n_step"):
        registry.build("callbacks", {"name": "resampler", "every_n_step": 7}, field="callbacks.0")


# ---- resume --------------------------------------------------------------------------------


class CrashAt(pl.Callback):
    def __init__(self, step: int) -> None:
        self.step = step

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx):
        if trainer.global_step == self.step:
            raise RuntimeError("simulated crash")


def test_resume_inside_the_collection_window_is_exact(tmp_path: Path) -> None:
    """Crash after step 5 of 12: the resample at step 6 draws from batches 3-5, one of which
    only the checkpointed candidate pool still holds."""
    over = {
        "output_dir": str(tmp_path / "runs"),
        "data.d": "16",
        "data.n_atoms": "64",
        "data.batch_size": "128",
        "data.val_samples": "256",
        "model.d_sae": "64",
        "model.optimizer.decay": "constant",
        "model.loss.dead_window_tokens": "128",
        "trainer.max_steps": "12",
        "trainer.val_check_interval": "12",
        "trainer.enable_progress_bar": "false",
        "checkpoint.every_n_steps": "5",
        "callbacks": "[{name: resampler, every_n_steps: 6, max_resamples: 1, n_candidates: 384}]",
    }
    full = load_recipe([RECIPE], [*over.items(), ("name", "full")])
    metrics = fit(full)
    assert metrics["train/resampled"] > 0  # the comparison covers a real resample
    crashed = load_recipe([RECIPE], [*over.items(), ("name", "crashed")])
    run = build_run(crashed)
    run.trainer.callbacks.insert(0, CrashAt(5))
    with pytest.raises(RuntimeError, match="simulated crash"):
        run.trainer.fit(run.module, datamodule=run.datamodule)
    fit(crashed, ckpt_path="last")
    a = load_file(str(tmp_path / "runs" / "full" / "version_0" / "sae.safetensors"))
    b = load_file(str(tmp_path / "runs" / "crashed" / "version_0" / "sae.safetensors"))
    for key in a:
        assert torch.equal(a[key], b[key]), f"{key}: max diff {(a[key] - b[key]).abs().max()}"
