"""LM activation data: packing, streaming, the cache, validation at the door, normalisation."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from rich.console import Console

pytest.importorskip("transformers")

from lm_scripts.tiny_lm import D_MODEL, make_corpus, make_tiny_lm

from sae_lightning.data.activations import ActivationDataModule
from sae_lightning.data.cache import CacheCorruptError, permute, write_cache
from sae_lightning.data.cache_format import load_tensor
from sae_lightning.data.cached import ActivationCacheDataModule
from sae_lightning.data.lm_config import ActivationCacheConfig, LMActivationsConfig
from sae_lightning.data.normalization import fold_input_scale
from sae_lightning.errors import ConfigError
from sae_lightning.lm.text import read_documents
from sae_lightning.sae import SparseAutoencoder

HOOK = "transformer.h.1"
QUIET = Console(quiet=True)


@pytest.fixture(scope="module")
def files(tmp_path_factory) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("lm")
    model = make_tiny_lm(root / "model")
    make_corpus(root / "text")
    cache = root / "cache"
    write_cache(ActivationDataModule(config(model, root / "text", cache_dir=str(cache))), QUIET)
    return {"model": model, "text": root / "text", "cache": cache, "root": root}


def config(model: Path, text: Path, **extra) -> LMActivationsConfig:
    base = {
        "model": str(model),
        "hook": HOOK,
        "text": [str(text)],
        "context_length": 32,
        "batch_size": 64,
        "buffer_size": 256,
        "val_sequences": 2,
        "stats_tokens": 200,
        "shard_tokens": 500,
    }
    return LMActivationsConfig(**{**base, **extra})


def ready(files, **extra) -> ActivationDataModule:
    dm = ActivationDataModule(config(files["model"], files["text"], **extra), seed=0)
    dm.setup("fit")
    return dm


def rows_sorted(x: torch.Tensor) -> torch.Tensor:
    """A canonical order of the rows (a multiset representation)."""
    key = x.double() @ torch.linspace(1.0, 2.0, x.shape[1], dtype=torch.float64)
    return x[key.argsort()]


def test_text_is_packed_with_bos_and_special_tokens_are_excluded(files, tmp_path):
    dm = ActivationDataModule(config(files["model"], files["text"]))
    dm.load()
    train = dm.corpus.train
    assert train.ids.shape[1] == 32 and (train.ids[:, 0] == 1).all()  # <bos>
    assert not train.keep[:, 0].any()  # BOS gives no activation
    eos = train.ids == 2
    assert eos.any() and not train.keep[eos].any()
    assert len(dm.corpus.val) == 2

    (tmp_path / "a.jsonl").write_text(json.dumps({"body": "def x"}) + "\n\n")
    assert read_documents([str(tmp_path / "*.jsonl")], "body") == ["def x"]
    with pytest.raises(ConfigError, match=r"data.text_field: line 1 .* has no key 'text'"):
        read_documents([str(tmp_path / "a.jsonl")])
    with pytest.raises(ConfigError, match=r"data.text: .*nope.txt' does not exist"):
        read_documents([str(tmp_path / "nope.txt")])


def test_streaming_batches_are_a_pure_function_of_the_step(files):
    a = ready(files)
    first = [a.rank_batch(t).clone() for t in range(9)]
    b = ready(files, prefetch=False)
    torch.testing.assert_close(b.rank_batch(7), first[7], rtol=0, atol=0)  # cold start at 7
    torch.testing.assert_close(b.rank_batch(2), first[2], rtol=0, atol=0)
    other = ready(files, seed=5)
    assert not torch.equal(other.rank_batch(0), first[0])
    a.teardown()


def test_cached_and_streaming_deliver_the_same_activations(files):
    stream = ready(files)
    cached = ready(files, cache_dir=str(files["cache"]))
    n = stream.stream.per_epoch
    assert cached.cache.rows == n
    steps = -(-n // 64)
    s = torch.cat([stream.rank_batch(t) for t in range(steps)])[:n]
    c = torch.cat([cached.rank_batch(t) for t in range(steps)])[:n]
    assert not torch.equal(s[:64], c[:64])  # shuffled differently...
    torch.testing.assert_close(rows_sorted(s), rows_sorted(c))  # ...but the same multiset
    # ...which is every kept token of every training context, once.
    everything = stream.harvester(stream.corpus.train)
    torch.testing.assert_close(rows_sorted(s), rows_sorted(everything))
    torch.testing.assert_close(stream._val, cached._val)
    stream.teardown()


def test_ddp_ranks_read_disjoint_parts_of_one_global_batch(files, monkeypatch):
    dm = ready(files, cache_dir=str(files["cache"]))
    whole = dm.rank_batch(3)
    parts = []
    for rank in range(2):
        monkeypatch.setattr(dm, "rank_and_world", lambda rank=rank: (rank, 2))
        parts.append(dm.rank_batch(3))
    torch.testing.assert_close(torch.cat(parts), whole, rtol=0, atol=0)
    positions = dm.cache.batch_positions(3, 64, dm.seed)
    assert len(set(positions[:32].tolist()) & set(positions[32:].tolist())) == 0


def test_cache_reads_rows_in_the_order_asked_within_and_across_shards(files):
    dm = ready(files, cache_dir=str(files["cache"]))
    cache = dm.cache
    assert len(cache.train) > 2
    whole = torch.cat([load_tensor(cache.path / s["file"], "activations") for s in cache.train])
    inside = torch.randperm(int(cache.starts[1]))[:50]  # all in the first shard
    across = torch.randperm(cache.rows)[:300]
    repeated = torch.tensor([7, cache.rows - 1, 7, 0])
    for rows in (inside, across, repeated, torch.zeros(0, dtype=torch.long)):
        got = cache.read(rows)
        assert got.shape == (len(rows), cache.d_in)
        assert torch.equal(got, whole[rows])


@pytest.mark.parametrize("n", [1, 2, 5, 64, 1000, 4097])
def test_feistel_permutation_is_a_bijection(n):
    out = permute(torch.arange(n), n, key=1234)
    assert sorted(out.tolist()) == list(range(n))
    if n > 5:
        assert not torch.equal(out, torch.arange(n))
        assert not torch.equal(out, permute(torch.arange(n), n, key=99))


def test_cache_is_validated_at_the_door(files, tmp_path):
    with pytest.raises(ConfigError, match=r"data.hook: is 'transformer.h.0', but the cache"):
        ready(files, cache_dir=str(files["cache"]), hook="transformer.h.0")
    with pytest.raises(ConfigError, match=r"data.model: is 'other/model', but the cache"):
        ActivationCacheDataModule(
            ActivationCacheConfig(path=str(files["cache"]), model="other/model", hook=HOOK)
        ).setup()
    with pytest.raises(ConfigError, match=r"data.cache_dir: no complete activation cache"):
        ready(files, cache_dir=str(tmp_path / "missing"))

    broken = tmp_path / "broken"
    broken.mkdir()
    for f in files["cache"].iterdir():
        (broken / f.name).write_bytes(f.read_bytes())
    shard = broken / "train_00001.safetensors"
    data = bytearray(shard.read_bytes())
    data[-5] ^= 0xFF
    shard.write_bytes(bytes(data))
    with pytest.raises(CacheCorruptError, match=r"train_00001.safetensors does not match"):
        ready(files, cache_dir=str(broken))
    ready(files, cache_dir=str(broken), verify_checksums=False)  # opt out, e.g. on a slow disk

    dm = ActivationCacheDataModule(
        ActivationCacheConfig(
            path=str(files["cache"]), model=str(files["model"]), hook=HOOK, batch_size=64
        )
    )
    assert dm.d_in == D_MODEL
    dm.setup()
    same = ready(files, cache_dir=str(files["cache"]))
    torch.testing.assert_close(dm.rank_batch(5), same.rank_batch(5), rtol=0, atol=0)


def test_rewriting_a_cache_is_a_no_op_and_another_recipe_is_refused(files):
    before = json.loads((files["cache"] / "manifest.json").read_text())
    dm = ActivationDataModule(config(files["model"], files["text"], cache_dir=str(files["cache"])))
    assert write_cache(dm, QUIET) == before
    other = config(files["model"], files["text"], cache_dir=str(files["cache"]), io="input")
    with pytest.raises(ConfigError, match=r"data.cache_dir: .* another recipe or corpus"):
        write_cache(ActivationDataModule(other), QUIET)


def test_missing_model_and_wrong_width_are_explained(files, tmp_path):
    with pytest.raises(ConfigError, match=r"sae-lightning models prepare smollm2"):
        ActivationDataModule(config(tmp_path / "smollm2-135m", files["text"]))
    with pytest.raises(ConfigError, match=r"data.d_in: the output of transformer.h.1 has width"):
        ready(files, d_in=32)


def test_normalisation_and_outliers(files):
    dm = ready(files, normalize="unit", stats_tokens=2000)
    x = torch.cat([dm.rank_batch(t) for t in range(30)])
    assert float(x.pow(2).sum(1).mean()) == pytest.approx(1.0, rel=0.1)
    assert dm.state_dict()["scale"] == dm.scale != 1.0
    saelens = ready(files, normalize="sqrt_d_in", stats_tokens=2000)
    y = torch.cat([saelens.rank_batch(t) for t in range(30)])
    assert float(y.norm(dim=1).mean()) == pytest.approx(D_MODEL**0.5, rel=0.1)

    raw = ready(files)
    median = raw.stats.median_norm
    clipped = ready(files, outlier_factor=1.0)
    assert float(clipped.rank_batch(0).norm(dim=1).max()) <= median * (1 + 1e-5)
    dropped = ready(files, outlier_factor=1.0, outlier_action="drop")
    batch = dropped.rank_batch(0)
    assert 0 < len(batch) < 64 and float(batch.norm(dim=1).max()) <= median
    for m in (dm, saelens, raw, clipped, dropped):
        m.teardown()


@pytest.mark.parametrize("center", [True, False])
def test_folded_sae_reconstructs_raw_activations(center):
    torch.manual_seed(0)
    sae = SparseAutoencoder(
        D_MODEL,
        64,
        {"name": "linear", "center_input": center},
        {"name": "linear"},
        {"name": "topk", "k": 6},
    ).double()
    with torch.no_grad():
        sae.decoder.b_dec.normal_()
        sae.encoder.b_enc.normal_()
    scale = 0.037
    folded = fold_input_scale(sae, scale)
    x = 30 * torch.randn(50, D_MODEL, dtype=torch.float64)  # raw scale
    reference = sae(scale * x) / scale  # the trained SAE on scaled inputs, scaled back
    torch.testing.assert_close(folded(x), reference, rtol=1e-12, atol=1e-12)
    torch.testing.assert_close(folded.encode(x), sae.encode(scale * x), rtol=1e-12, atol=1e-12)
    torch.testing.assert_close(sae(scale * x), sae(scale * x))  # the original is untouched

    tied = SparseAutoencoder(D_MODEL, 64, {"name": "linear"}, {"name": "tied"}, {"name": "topk"})
    with pytest.raises(ConfigError, match=r"data\.normalize: cannot fold"):
        fold_input_scale(tied, scale)
