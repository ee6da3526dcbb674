"""`sae-lightning cache`: shards written off the LM thread, progress lines in a log file."""

from __future__ import annotations

import re
import threading
import time

import pytest
import torch
import yaml

pytest.importorskip("transformers")

from lm_scripts.tiny_lm import make_corpus, make_tiny_lm

from sae_lightning.cli import main
from sae_lightning.data import cache_writer
from sae_lightning.data.cache import open_cache
from sae_lightning.data.forward_reference import ForwardReference
from sae_lightning.lm.harvest import Harvester


def test_cache_writes_in_the_background_and_prints_progress_lines(tmp_path, capsys, monkeypatch):
    data = {
        "name": "lm_activations",
        "model": str(make_tiny_lm(tmp_path / "model")),
        "hook": "transformer.h.0",
        "text": [str(tmp_path / "text")],
        "context_length": 32,
        "val_sequences": 2,
        "batch_size": 64,
        "buffer_size": 256,
        "harvest_batch_size": 4,
        "shard_tokens": 256,
        "cache_dir": str(tmp_path / "cache"),
    }
    make_corpus(tmp_path / "text")
    path = tmp_path / "r.yaml"
    path.write_text(yaml.safe_dump({"name": "progress", "data": data}))
    harvest, write = Harvester.__call__, cache_writer._write_shard
    writers: list[str] = []

    def slow_harvest(self, *args, **kwargs):
        time.sleep(0.05)  # long enough for the 0.02 s progress timer to tick in between
        return harvest(self, *args, **kwargs)

    def recorded_write(*args, **kwargs):
        writers.append(threading.current_thread().name)
        return write(*args, **kwargs)

    monkeypatch.setattr(Harvester, "__call__", slow_harvest)
    monkeypatch.setattr(cache_writer, "_write_shard", recorded_write)
    assert main(["cache", "--config", str(path), "--progress-seconds", "0.02"]) == 0
    out = capsys.readouterr().out  # captured: not a terminal
    lines = re.findall(r"harvesting: ([\d,]+)/([\d,]+) contexts, ([\d,]+) tokens", out)
    done = [int(c.replace(",", "")) for c, _, _ in lines]
    assert len(lines) >= 3 and done == sorted(done)
    total = int(lines[-1][1].replace(",", ""))
    assert done[-1] == total
    assert all(int(t.replace(",", "")) == 32 * int(c.replace(",", "")) for c, _, t in lines)
    assert re.search(r"harvest_over_forward=\d+\.\d+", out)
    cache = open_cache(tmp_path / "cache", expect={}, verify=True, field="data.cache_dir")
    assert len(writers) == len(cache.manifest["shards"]) > 2
    assert all(name.startswith("cache-writer") for name in writers)


def test_forward_reference_times_each_batch_once_half_before_and_half_after(tmp_path, monkeypatch):
    from sae_lightning.data import forward_reference
    from sae_lightning.lm.hooks import resolve_hooks
    from sae_lightning.lm.loading import LMSourceConfig, load_model
    from sae_lightning.lm.text import Contexts

    model = load_model(LMSourceConfig(model=str(make_tiny_lm(tmp_path / "model"))))
    hooks = resolve_hooks(model, "transformer.h.0")
    harvester = Harvester(model, hooks, "output", torch.float32, 4)
    contexts = Contexts(torch.randint(4, 20, (100, 16)), torch.ones(100, 16, dtype=torch.bool))
    seen: list[tuple[int, int]] = []  # (first context, contexts) of each forward pass
    run = forward_reference.run_to_hooks

    def counted(model, ids, *args):
        first = next(i for i in range(100) if torch.equal(contexts.ids[i : i + len(ids)], ids))
        seen.append((first, len(ids)))
        return run(model, ids, *args)

    reference = ForwardReference(harvester, contexts, harvesting=1000)
    assert reference.contexts == 64  # a tenth of 1000, at most 16 batches of 4
    monkeypatch.setattr(forward_reference, "run_to_hooks", counted)
    reference.run_half(0)
    assert reference.tokens == 8 * 4 * 16 and seen[0] == seen[1] == (0, 4)  # warm-up first
    reference.run_half(1)
    assert sorted(seen[1:]) == [(first, 4) for first in range(0, 64, 4)]
    assert reference.tokens == 64 * 16 and reference.tokens_per_second() > 0
    assert ForwardReference(harvester, contexts, harvesting=10).contexts == 16  # 4 batches
