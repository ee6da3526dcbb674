"""e2e training (loss.mode e2e / e2e_ds) on a tiny random GPT-2, against lm/e2e.py in float64."""

from __future__ import annotations

from pathlib import Path

import lightning.pytorch as pl
import pytest
import torch
import yaml

pytest.importorskip("transformers")

from lm_scripts.tiny_lm import D_MODEL, make_corpus, make_model, make_tiny_lm

from sae_lightning import runner
from sae_lightning.config import LossConfig
from sae_lightning.data.activations import TokenBatch
from sae_lightning.errors import ConfigError
from sae_lightning.lm.e2e import e2e_loss
from sae_lightning.lm.e2e_module import E2ESAEModule, E2ETarget, downstream_hooks
from sae_lightning.lm.evaluation import splice_metrics, spliced_loss_sums
from sae_lightning.recipe import load_recipe
from sae_lightning.runner import build_run

HOOK = "transformer.h.0"
LINEAR = {"name": "linear"}


@pytest.fixture(scope="module")
def lm():
    return make_model(seed=0, dtype=torch.float64).requires_grad_(False)  # frozen, as loaded


def batch(seed: int, n: int = 4, seq: int = 12) -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    ids = torch.randint(4, 44, (n, seq), generator=g)
    keep = torch.rand(n, seq, generator=g) > 0.2
    keep[:, 0] = False  # BOS: stays clean
    return ids, keep


def relu_l1_reference(sae, x: torch.Tensor, coefficient: float) -> torch.Tensor:
    """The relu plugin's decoder-norm-weighted L1, written out."""
    acts = torch.relu((x - sae.decoder.b_dec) @ sae.encoder.W_enc.T + sae.encoder.b_enc)
    return coefficient * (acts * sae.decoder.W_dec.norm(dim=1)).sum(dim=1).mean()


@pytest.mark.parametrize("mode", ["e2e", "e2e_ds"])
def test_training_step_loss_is_the_e2e_loss_in_float64(lm, mode):
    torch.manual_seed(0)
    coefficient = 0.003
    sparsity = {"name": "relu", "l1_coefficient": coefficient}
    module = E2ESAEModule(D_MODEL, 48, LINEAR, LINEAR, sparsity, loss={"mode": mode}).double()
    with torch.no_grad():  # unit-norm atoms in float64, as the decoder assumes
        module.sae.decoder.W_dec /= module.sae.decoder.W_dec.norm(dim=1, keepdim=True)
    ds = downstream_hooks(lm, HOOK, "output", None) if mode == "e2e_ds" else []
    scale = 0.37
    target = E2ETarget(lm, HOOK, "output", scale, ds)
    ids, keep = batch(1)

    out = module.compute_e2e_step(target, ids, keep, step=0)

    sae = module.sae

    def reference(a: torch.Tensor) -> torch.Tensor:
        return torch.where(keep[..., None], sae(a * scale) / scale, a)

    ref = e2e_loss(lm, HOOK, "output", reference, ids, downstream=ds)
    with torch.no_grad():
        acts = lm(ids, output_hidden_states=True).hidden_states[1][keep] * scale
    l1 = relu_l1_reference(sae, acts, coefficient)
    if mode == "e2e":
        want = ref.kl + l1
    else:
        assert ds == ["transformer.h.1"]  # between block 0 and the last block (2)
        assert float(ref.downstream.detach()) > 0
        want = 0.5 * ref.kl + 2.5 * ref.downstream + l1
    assert out.loss.dtype == torch.float64
    torch.testing.assert_close(out.loss, want, rtol=1e-12, atol=1e-15)
    torch.testing.assert_close(out.terms["l1"], l1, rtol=1e-12, atol=1e-15)
    assert float(out.terms["kl"].detach()) > 0  # positions outside keep stay clean (reference)

    # Gradients reach every SAE parameter and nothing else.
    out.loss.backward()
    for name, p in module.named_parameters():
        assert p.grad is not None and p.grad.abs().sum() > 0, name
    assert all(p.grad is None for p in lm.parameters())
    lm_params = {id(p) for p in lm.parameters()}
    assert not any(id(p) in lm_params for p in module.parameters())
    assert all(k.startswith("sae.") or "_" in k for k in module.state_dict())
    assert not any(k.startswith(("transformer", "lm_head")) for k in module.state_dict())


def test_default_downstream_hooks_follow_the_paper(lm):
    assert downstream_hooks(lm, "transformer.h.0", "output", None) == ["transformer.h.1"]
    # Inputs: the residual stream before each later block, the last block included.
    assert downstream_hooks(lm, "transformer.h.0", "input", None) == [
        "transformer.h.1",
        "transformer.h.2",
    ]
    with pytest.raises(ConfigError, match=r"model\.loss\.downstream_hooks: no residual stream"):
        downstream_hooks(lm, "transformer.h.1", "output", None)
    with pytest.raises(ConfigError, match=r"model\.loss\.downstream_hooks: cannot tell"):
        downstream_hooks(lm, "transformer.ln_f", "output", None)
    assert downstream_hooks(lm, HOOK, "output", "transformer.h.2") == ["transformer.h.2"]


def test_loss_config_checks_the_e2e_fields():
    assert LossConfig().mode == "local"
    assert LossConfig(mode="e2e").kl_weight == 1.0
    assert LossConfig(mode="e2e_ds").kl_weight == 0.5
    with pytest.raises(ValueError, match="set mode: e2e_ds"):
        LossConfig(mode="e2e", downstream_hooks="model.layers.*")
    with pytest.raises(ValueError, match="set mode: e2e or e2e_ds"):
        LossConfig(kl_coefficient=1.0)
    with pytest.raises(ConfigError, match=r"model\.loss\.mode: is 'local'"):
        E2ESAEModule(16, 32, LINEAR, LINEAR, {"name": "topk", "k": 4})


# ---- training through the recipe path ------------------------------------------------------


class CrashAt(pl.Callback):
    def __init__(self, step: int) -> None:
        self.step = step

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx):
        if trainer.global_step == self.step:
            raise RuntimeError("simulated crash")


class Recorder(pl.Callback):
    """Every training batch and loss by step."""

    def __init__(self) -> None:
        self.batches: dict[int, TokenBatch] = {}
        self.kl: dict[int, float] = {}

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx):
        self.batches[trainer.global_step] = batch

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx):
        self.kl[trainer.global_step - 1] = float(outputs["terms"]["kl"])


@pytest.fixture(scope="module")
def lm_files(tmp_path_factory) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("e2etrain")
    make_corpus(root / "text")
    return {"model": make_tiny_lm(root / "model"), "text": root / "text"}


def e2e_recipe(tmp_path: Path, files: dict[str, Path], name: str, steps: int = 12, **loss):
    path = tmp_path / "r.yaml"
    recipe = {
        "name": "e2e",
        "seed": 5,
        "output_dir": str(tmp_path / "runs"),
        "data": {
            "name": "lm_activations",
            "model": str(files["model"]),
            "hook": HOOK,
            "text": [str(files["text"])],
            "context_length": 16,
            "batch_size": 64,
            "buffer_size": 256,
            "token_batch_size": 4,
            "val_sequences": 4,
            "stats_tokens": 128,
            "normalize": "unit",
        },
        "model": {
            "d_sae": 64,
            "sparsity": {"name": "topk", "k": 4},
            "optimizer": {"lr": 0.02, "decay": "constant"},
            "loss": {"mode": "e2e", **loss},
        },
        "trainer": {
            "max_steps": steps,
            "val_check_interval": steps,
            "accelerator": "cpu",
            "enable_progress_bar": False,
        },
        "checkpoint": {"every_n_steps": 3},
    }
    path.write_text(yaml.safe_dump(recipe))
    return load_recipe([path], [("name", name)])


@pytest.fixture
def e2e_runner():
    """build_run, checking that it selected E2ESAEModule for the e2e modes."""

    def build(*args, **kwargs):
        run = build_run(*args, **kwargs)
        assert isinstance(run.module, E2ESAEModule)
        return run

    return build


def heldout_kl(run) -> float:
    lm = run.datamodule.language_model()
    sae, scale = run.module.sae, lm.scale

    def reconstruct(a):
        return sae(a * scale) / scale

    sums = spliced_loss_sums(lm.model, lm.hooks[0], lm.io, reconstruct, lm.heldout_ids, None, 4)
    return splice_metrics(sums).kl


def test_e2e_training_reduces_kl_and_resumes_exactly(lm_files, tmp_path, e2e_runner):
    full = e2e_runner(e2e_recipe(tmp_path, lm_files, "full"))
    seen = Recorder()
    full.trainer.callbacks.insert(0, seen)
    runner.preflight(full)  # skips the token batches, checks the validation activations
    before = heldout_kl(full)
    full.trainer.fit(full.module, datamodule=full.datamodule)
    after = heldout_kl(full)
    # 12 steps take held-out KL from 1.7e-3 to 0.9e-3 (k=4 of 64 latents on a 16-d stream).
    assert after < 0.7 * before, (before, after)
    assert sum(seen.kl[s] for s in (9, 10, 11)) < 0.7 * sum(seen.kl[s] for s in (0, 1, 2))
    first = seen.batches[0]
    assert isinstance(first, TokenBatch) and first.ids.shape == (4, 16)
    assert full.trainer.callback_metrics["val/l0"] == 4  # validation still sees activations

    crashed = e2e_runner(e2e_recipe(tmp_path, lm_files, "crashed"))
    crashed.trainer.callbacks.insert(0, CrashAt(7))  # one step after the checkpoint at 6
    with pytest.raises(RuntimeError, match="simulated crash"):
        crashed.trainer.fit(crashed.module, datamodule=crashed.datamodule)
    resumed = e2e_runner(e2e_recipe(tmp_path, lm_files, "crashed"), version=0)
    resumed_seen = Recorder()
    resumed.trainer.callbacks.insert(0, resumed_seen)
    ckpt = tmp_path / "runs" / "crashed" / "version_0" / "checkpoints" / "last.ckpt"
    resumed.trainer.fit(resumed.module, datamodule=resumed.datamodule, ckpt_path=str(ckpt))

    assert sorted(resumed_seen.batches) == list(range(6, 12))
    for step, got in resumed_seen.batches.items():
        assert torch.equal(got.ids, seen.batches[step].ids), step
        assert torch.equal(got.keep, seen.batches[step].keep), step
    a, b = full.module.state_dict(), resumed.module.state_dict()
    assert a.keys() == b.keys()
    for key in a:
        assert torch.equal(a[key], b[key]), key


def test_e2e_modes_need_language_model_data(tmp_path, e2e_runner):
    recipe = load_recipe(
        [],
        [
            ("name", "syn"),
            ("output_dir", str(tmp_path)),
            ("data.name", "synthetic"),
            ("trainer.max_steps", "2"),
            ("trainer.enable_progress_bar", "false"),
            ("model.loss.mode", "e2e_ds"),
        ],
    )
    run = e2e_runner(recipe, log=False)
    with pytest.raises(ConfigError, match=r"model.loss.mode: e2e training runs the language"):
        runner.preflight(run)  # before any training step
    with pytest.raises(ConfigError, match=r"model.loss.mode: e2e training runs the language"):
        run.trainer.fit(run.module, datamodule=run.datamodule)


def test_token_batches_take_the_contexts_of_the_local_stream_in_order():
    """Step t of an e2e run and of a local run with one-batch mixing buffers see the same
    contexts (the benchmark's "same tokens"), and an epoch visits every context once."""
    from sae_lightning.data.activations import MixingStream, TokenStream
    from sae_lightning.lm.text import Contexts

    n, seq, per_step = 12, 6, 3
    ids = torch.arange(n * seq).view(n, seq)
    keep = torch.ones(n, seq, dtype=torch.bool)
    keep[:, 0] = False  # 5 kept positions per context
    contexts = Contexts(ids, keep)
    tokens = TokenStream(contexts, per_step, seed=7)

    def harvest(rows: torch.Tensor) -> torch.Tensor:  # one row per kept position: its context
        return rows.repeat_interleave(5).double()[:, None]

    rows = per_step * 5
    local = MixingStream(contexts, harvest, 1, rows, rows, seed=7, prefetch=False)
    epoch = []
    for t in range(2 * n // per_step):  # two epochs
        batch = tokens.batch(t)
        got = sorted({int(i) // seq for i in batch.ids[:, 0]})
        assert got == sorted({int(c) for c in local.batch(t)[:, 0]}), t
        assert batch.ids.shape == batch.keep.shape == (per_step, seq)
        epoch += got
    assert sorted(epoch[:n]) == list(range(n)) and sorted(epoch[n:]) == list(range(n))
    assert epoch[:n] != epoch[n:]  # a new order each epoch
    torch.testing.assert_close(tokens.batch(5).ids, TokenStream(contexts, 3, 7).batch(5).ids)
