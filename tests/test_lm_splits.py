"""Held-out data is held out by document, and named evaluation corpora are evaluated apart."""

from __future__ import annotations

import json
import random
import string
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch
from rich.console import Console

pytest.importorskip("transformers")

from lm_scripts.tiny_lm import make_tiny_lm
from safetensors.torch import load_file
from torch import nn

from sae_lightning.callbacks.e2e_kl import E2EKLConfig, E2EKLEvaluation
from sae_lightning.data.activations import ActivationDataModule
from sae_lightning.data.cache_writer import write_cache
from sae_lightning.data.lm_config import LMActivationsConfig
from sae_lightning.errors import ConfigError
from sae_lightning.lm.loading import load_tokenizer

QUIET = Console(quiet=True)
GRAM = 10


@pytest.fixture(scope="module")
def files(tmp_path_factory) -> dict[str, Path]:
    """A model and 30 documents of random letters (no 10-gram is shared by two documents)."""
    root = tmp_path_factory.mktemp("splits")
    rng = random.Random(0)
    text = root / "text"
    text.mkdir()
    for i in range(30):
        doc = "".join(rng.choice(string.ascii_lowercase) for _ in range(rng.randint(40, 90)))
        (text / f"doc{i:02d}.txt").write_text(doc)
    other = root / "other.txt"
    other.write_text(" ".join(str(i) for i in range(400)))
    return {"model": make_tiny_lm(root / "model"), "text": text, "other": other, "root": root}


def config(files, **extra) -> LMActivationsConfig:
    base = {
        "model": str(files["model"]),
        "hook": "transformer.h.1",
        "text": [str(files["text"])],
        "context_length": 24,
        "batch_size": 32,
        "buffer_size": 64,
        "val_sequences": 2,
        "stats_tokens": 64,
        "shard_tokens": 100,
    }
    return LMActivationsConfig(**{**base, **extra})


def grams(ids: torch.Tensor) -> set[tuple[int, ...]]:
    flat = ids.flatten().tolist()
    return {tuple(flat[i : i + GRAM]) for i in range(len(flat) - GRAM + 1)}


def test_no_token_of_a_heldout_document_is_in_a_training_context_of_the_cache(files):
    cache = files["root"] / "cache"
    dm = ActivationDataModule(config(files, val_fraction=0.2, cache_dir=str(cache)), seed=3)
    write_cache(dm, QUIET)
    manifest = json.loads((cache / "manifest.json").read_text())
    held = set(manifest["val_documents"])
    assert len(held) == 6 and manifest["documents"] == 30
    train_docs, val_docs, train_tokens = set(), set(), []
    for shard in manifest["shards"]:
        tensors = load_file(str(cache / shard["file"]))
        docs = set(tensors["documents"].flatten().tolist()) - {-1}
        (train_docs if shard["split"] == "train" else val_docs).update(docs)
        if shard["split"] == "train":
            train_tokens.append(tensors["token_ids"])
    assert train_docs and not train_docs & held
    assert val_docs <= held
    # Independently of the recorded ids: no stretch of a held-out document's tokens appears in
    # the training tokens (documents of random letters share no 10-gram by chance).
    tok = load_tokenizer(dm.config)
    texts = sorted(files["text"].glob("*.txt"))
    trained = grams(torch.cat(train_tokens))
    for i in held:
        ids = torch.tensor(tok(texts[i].read_text(), add_special_tokens=False)["input_ids"])
        assert not grams(ids) & trained, f"held-out document {i} leaked into training"
    for i in sorted(set(range(30)) - held)[:3]:  # the check can fail: training documents hit
        ids = torch.tensor(tok(texts[i].read_text(), add_special_tokens=False)["input_ids"])
        assert grams(ids) & trained


def test_split_is_seeded_and_sized_as_asked(files):
    def held(seed: int, **extra) -> list[int]:
        dm = ActivationDataModule(config(files, **extra), seed=seed)
        dm.load()
        assert dm.corpus is not None
        docs = dm.corpus.train.docs
        assert docs is not None and not set(docs.flatten().tolist()) & set(dm.corpus.val_documents)
        return dm.corpus.val_documents

    assert held(0, val_documents=4) == held(0, val_documents=4)
    assert len(held(0, val_documents=4)) == 4
    assert held(0, val_documents=4) != held(1, val_documents=4)
    default = ActivationDataModule(config(files, val_sequences=3), seed=0)
    default.load()
    assert len(default.corpus.val) == 3
    with pytest.raises(ConfigError, match=r"data\.val_sequences: .*leaves none to train on"):
        ActivationDataModule(config(files, val_documents=30), seed=0).load()
    with pytest.raises(ValueError, match="at most one of val_documents and val_fraction"):
        config(files, val_documents=2, val_fraction=0.1)


class Mean(nn.Module):
    """Reconstructs every activation as a fixed vector (FVU 1 when it is the data mean)."""

    def __init__(self, mean: torch.Tensor) -> None:
        super().__init__()
        self.mean = nn.Parameter(mean)
        self.d_in = len(mean)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.mean.expand_as(x)


def test_named_corpora_are_evaluated_apart_with_fvu_and_kl(files):
    dm = ActivationDataModule(
        config(files, eval_text={"digits": [str(files["other"])]}, eval_sequences=3), seed=0
    )
    dm.setup("fit")
    contexts = dm.eval_sets["digits"]
    tok = load_tokenizer(dm.config)
    allowed = set(tok("0123456789 ", add_special_tokens=False)["input_ids"]) | {tok.eos_token_id}
    assert len(contexts) == 3 and set(contexts.ids[:, 1:].flatten().tolist()) <= allowed
    x = dm.eval_activations(contexts).double()
    trainer = SimpleNamespace(
        datamodule=dm,
        global_rank=0,
        world_size=1,
        strategy=SimpleNamespace(reduce=lambda t, reduce_op: t),
    )
    sae = Mean(x.mean(0).float() + 0.5)
    module = SimpleNamespace(  # a TrainsSAEs with one unnamed member
        sae=sae,
        device=torch.device("cpu"),
        takes_token_batches=False,
        members=lambda: {"": SimpleNamespace(sae=sae)},
        configure_data_module=lambda datamodule: None,
    )
    out = E2EKLEvaluation(E2EKLConfig()).evaluate(trainer, module)
    centred = (x - x.mean(0)).pow(2).sum()
    ref = (x - sae.mean.detach().double()).pow(2).sum() / centred
    assert float(out["val/digits/fvu"]) == pytest.approx(float(ref), rel=1e-5)
    assert {"e2e/kl", "val/digits/kl", "val/digits/ce_recovered"} <= out.keys()
    assert float(out["val/digits/kl"]) > 0 and float(out["val/digits/kl"]) != float(out["e2e/kl"])
