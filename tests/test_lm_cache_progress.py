"""`sae-lightning cache`: shards written off the LM thread, progress lines in a log file."""

from __future__ import annotations

import re
import threading
import time

import pytest
import yaml

pytest.importorskip("transformers")

from lm_scripts.tiny_lm import make_corpus, make_tiny_lm

from sae_lightning.cli import main
from sae_lightning.data import cache_writer
from sae_lightning.data.cache import open_cache
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
