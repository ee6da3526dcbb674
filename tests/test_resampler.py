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

from sae_lightning.callbacks import resampling, resampling_init
from sae_lightning.callbacks.resampling import DeadFeatureResampler, DeadFeatureResamplerConfig
from sae_lightning.callbacks.resampling_view import LocalView
from sae_lightning.components.base import Encoder, Touched
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
    monkeypatch.setattr(resampling, "squared_errors", lambda view, x: errors)
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


# ---- the topk procedure ----------------------------------------------------------------------


def test_residual_clusters_recover_the_shared_direction() -> None:
    """Residuals that each mix one of three directions with noise: seeded with one noisy
    residual per direction, the centres move to the directions themselves."""
    g = torch.Generator().manual_seed(0)
    truth = torch.nn.functional.normalize(torch.randn(3, D_IN, generator=g), dim=1)
    which = torch.arange(300) % 3
    residuals = truth[which] * (1 + torch.rand(300, 1, generator=g))
    residuals += 0.5 * torch.randn(300, D_IN, generator=g) / math.sqrt(D_IN)
    errors = residuals.pow(2).sum(dim=1)
    seeds = residuals[:3]  # one per direction, each with its own noise
    centres = resampling.residual_clusters(residuals, errors, seeds)
    torch.testing.assert_close(centres.norm(dim=1), torch.ones(3))
    seed_cos = (torch.nn.functional.normalize(seeds, dim=1) * truth).sum(dim=1)
    centre_cos = (centres * truth).sum(dim=1)
    assert (centre_cos > 0.99).all(), centre_cos
    assert (centre_cos > seed_cos).all()  # the refinement, not the seed, found them


def test_threshold_norms_match_a_float64_reference() -> None:
    m = module({"name": "topk", "k": 3, "aux_coefficient": 0.0})
    with torch.no_grad():
        m.sae.decoder.b_dec.normal_(0, 0.1)  # centring matters
    x = torch.randn(200, D_IN)
    residuals = x - resampling_init.reconstruct(m.sae, x)
    directions = torch.nn.functional.normalize(torch.randn(5, D_IN), dim=1)
    mean_alive = torch.tensor(1.3)
    got = resampling.threshold_norms(LocalView(m), x, residuals, directions, mean_alive)

    # Reference: each input joins the direction its residual is most aligned with (if > 0);
    # its threshold is its smallest active latent (0 if none); the norm is the lower median
    # over the cluster of threshold / (u . (x - b_dec)), clamped to [0.05, 20] x mean_alive.
    x64, r64, u64 = x.double(), residuals.double(), directions.double()
    w = m.sae.encoder.W_enc.detach().double()
    b = m.sae.encoder.b_enc.detach().double()
    centred = x64 - m.sae.decoder.b_dec.detach().double()
    top = (centred @ w.T + b).topk(3, dim=1).values.clamp_min(0)  # the selected, ReLU'd
    kth = top.masked_fill(top == 0, math.inf).min(dim=1).values  # smallest active
    kth = torch.where(torch.isfinite(kth), kth, 0.0)
    cos = torch.nn.functional.normalize(r64, dim=1) @ u64.T
    expected = []
    for j in range(5):
        ratios = sorted(
            float(kth[i] / (centred[i] @ u64[j]))
            for i in range(200)
            if cos[i].argmax() == j and cos[i, j] > 0 and centred[i] @ u64[j] > 0
        )
        median = ratios[(len(ratios) - 1) // 2] if ratios else 1.3
        expected.append(min(max(median, 0.05 * 1.3), 20 * 1.3))
    torch.testing.assert_close(got.double(), torch.tensor(expected, dtype=torch.float64))


def test_live_mean_second_moment() -> None:
    p = torch.nn.Parameter(torch.randn(6, 4))
    opt = torch.optim.Adam([p], lr=1e-2)
    for _ in range(3):
        opt.zero_grad()
        (p.pow(3).sum() * torch.arange(1.0, 7).unsqueeze(1)).sum().backward()
        opt.step()
    before = {k: v.clone() for k, v in opt.state[p].items()}
    ids = torch.tensor([1, 4])
    resampling_init.reset_optimizer_state([opt], [Touched(p, ids)], second_moment="live_mean")
    state, keep = opt.state[p], torch.tensor([0, 2, 3, 5])
    assert (state["exp_avg"][ids] == 0).all()
    expected = before["exp_avg_sq"][keep].mean(dim=0)  # per column, over the rows kept
    torch.testing.assert_close(state["exp_avg_sq"][ids], expected.expand(2, -1))
    for key in ("exp_avg", "exp_avg_sq"):
        assert torch.equal(state[key][keep], before[key][keep])
    assert torch.equal(state["step"], before["step"])


@pytest.mark.parametrize(("procedure", "fires"), [("anthropic", False), ("topk", True)])
def test_topk_procedure_latents_fire_where_anthropics_do_not(procedure: str, fires: bool) -> None:
    """After a resample of a TopK SAE, the topk procedure's new latents are selected on the
    next batch; Anthropic's (encoder rows at 0.2 x the live norm) are not."""
    dm = datamodule()
    m = module({"name": "topk", "k": 3, "aux_coefficient": 0.0})
    callback = resampler(procedure=procedure)
    trainer(3, KillAfterFirstStep(), callback).fit(m, datamodule=dm)
    ids = torch.tensor(KILLED)
    assert (m.tokens_since_fired[ids] == 0).all()  # resampled at step 3
    enc, dec = m.sae.encoder, m.sae.decoder
    atoms = dec.W_dec.detach()[ids]
    torch.testing.assert_close(atoms.norm(dim=1), torch.ones(len(ids)))
    rows = enc.W_enc.detach()[ids]
    torch.testing.assert_close(rows / rows.norm(dim=1, keepdim=True), atoms)  # same direction
    assert (enc.b_enc.detach()[ids] == 0).all()
    if procedure == "topk":  # one norm per latent, not one for all
        assert rows.norm(dim=1).std() > 0
    with torch.no_grad():
        counts = m.sae.encode_codes(dm.generative.batch(3)).fire_counts()[ids]
    assert bool((counts > 0).all()) is fires, counts


def test_procedure_defaults_and_overrides() -> None:
    assert DeadFeatureResamplerConfig().choices == ("input", "mean_live", "zero")
    topk = DeadFeatureResamplerConfig(procedure="topk")
    assert topk.choices == ("residual_clusters", "threshold", "live_mean")
    mixed = DeadFeatureResamplerConfig(procedure="topk", adam_second_moment="zero")
    assert mixed.choices == ("residual_clusters", "threshold", "zero")
    with pytest.raises(ConfigError, match=r"callbacks\.0\.procedure"):
        registry.build("callbacks", {"name": "resampler", "procedure": "relu"}, field="callbacks.0")
