"""SIGKILL `sae-lightning cache` mid-shard: only whole shards remain, and re-running completes."""

from __future__ import annotations

import json
import os
import random
import re
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
import yaml
from rich.console import Console

pytest.importorskip("transformers")

from lm_scripts.tiny_lm import make_corpus, make_tiny_lm
from safetensors.torch import load_file

from sae_lightning.cli import main
from sae_lightning.data.cache import MANIFEST, open_cache, write_cache
from sae_lightning.recipe import load_recipe
from sae_lightning.registry import registry

ROOT = Path(__file__).resolve().parents[1]
ENV = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONUNBUFFERED": "1"}


def recipe(tmp_path: Path, cache: Path) -> Path:
    model = make_tiny_lm(tmp_path / "model")
    make_corpus(tmp_path / "text", n_docs=60)
    path = tmp_path / f"{cache.name}.yaml"
    data = {
        "name": "lm_activations",
        "model": str(model),
        "hook": "transformer.h.*",  # two rows per token: both hooks are cached
        "text": [str(tmp_path / "text")],
        "context_length": 32,
        "val_sequences": 4,
        "batch_size": 64,
        "buffer_size": 256,
        "harvest_batch_size": 1,
        "shard_tokens": 64,  # one context per shard: many shards, each fsynced
        "cache_dir": str(cache),
    }
    path.write_text(yaml.safe_dump({"name": "kill", "data": data}))
    return path


def test_sigkill_mid_cache_then_rerun_gives_a_complete_valid_cache(tmp_path, capsys):
    cache = tmp_path / "cache"
    path = recipe(tmp_path, cache)
    cmd = [sys.executable, "-m", "sae_lightning.cli", "cache", "--config", str(path)]
    proc = subprocess.Popen(cmd, env=ENV, cwd=ROOT, stdout=subprocess.DEVNULL)
    deadline = time.time() + 120
    while time.time() < deadline and proc.poll() is None:
        if len(list(cache.glob("train_*.safetensors"))) >= 3:
            break
        time.sleep(0.005)
    time.sleep(random.uniform(0.0, 0.05))
    proc.send_signal(signal.SIGKILL)
    proc.wait(timeout=30)
    assert proc.returncode == -signal.SIGKILL, "the cache finished before it could be killed"
    assert not (cache / MANIFEST).exists()
    shards = sorted(cache.glob("train_*.safetensors"))
    assert len(shards) >= 3
    for shard in shards:  # every visible shard is whole
        assert load_file(str(shard))["activations"].shape[1] == 16

    assert main(["cache", "--config", str(path)]) == 0
    first = capsys.readouterr().out.splitlines()[0]  # the estimate comes before any writing
    estimate = float(re.search(r"in \d+ shards: about ([0-9.]+) MiB", first).group(1))
    assert not list(cache.glob(".*.tmp"))
    opened = open_cache(cache, expect={}, verify=True, field="data.cache_dir")
    assert opened.manifest["hooks"] == ["transformer.h.0", "transformer.h.1", "transformer.h.2"]
    assert opened.rows == 3 * opened.manifest["tokens"]
    on_disk = sum(f.stat().st_size for f in cache.glob("*.safetensors")) / 2**20
    assert on_disk == pytest.approx(estimate, rel=0.1)

    # The same tensors as a cache written in one go (the bytes may differ: safetensors writes
    # its metadata map in a per-process hash order).
    fresh = tmp_path / "fresh"
    again = load_recipe([path], [("data.cache_dir", str(fresh))])
    write_cache(
        registry.build("datamodules", again.data, field="data", seed=0), Console(quiet=True)
    )
    a = json.loads((cache / MANIFEST).read_text())["shards"]
    b = json.loads((fresh / MANIFEST).read_text())["shards"]
    assert [s["file"] for s in a] == [s["file"] for s in b]
    for shard in a:
        x, y = load_file(str(cache / shard["file"])), load_file(str(fresh / shard["file"]))
        assert x.keys() == y.keys()
        assert all(torch.equal(x[k], y[k]) for k in x), shard["file"]
