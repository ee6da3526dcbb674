"""Device check: the LM data, the cache and the KL callback with the LM and SAE on a GPU.

    python tests/lm_scripts/gpu_check.py OUT_DIR [cpu]     # cpu: a dry run of the script

Runs on CUDA what the CPU tests run on CPU: identity/zero splices in float64, streamed and
cached training with the KL callback, and writes the results to OUT_DIR/gpu_check.json.
"""

from __future__ import annotations

import json
import math
import sys
import tempfile
import time
from pathlib import Path

import torch
import yaml
from rich.console import Console

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from lm_scripts.tiny_lm import make_corpus, make_model, make_tiny_lm

from sae_lightning.data.cache import write_cache
from sae_lightning.lm.evaluation import splice_metrics, spliced_loss_sums
from sae_lightning.recipe import load_recipe
from sae_lightning.registry import registry
from sae_lightning.runner import build_run, finish


def main(out: Path, device: str = "cuda") -> None:
    gpu = device == "cuda"
    assert torch.cuda.is_available() or not gpu
    results: dict[str, object] = {"device": torch.cuda.get_device_name(0) if gpu else "cpu"}
    model = make_model(dtype=torch.float64).to(device).requires_grad_(False)
    ids = torch.randint(4, 44, (6, 24), generator=torch.Generator().manual_seed(0))
    ident = splice_metrics(spliced_loss_sums(model, "transformer.h.1", "output", lambda a: a, ids))
    zero = splice_metrics(
        spliced_loss_sums(model, "transformer.h.1", "output", torch.zeros_like, ids)
    )
    results["identity"] = ident._asdict()
    results["zero"] = zero._asdict()
    assert ident.kl == 0.0 and ident.ce_sae == ident.ce_clean
    assert zero.ce_sae == zero.ce_zero_ablation

    with tempfile.TemporaryDirectory() as tmp:
        root = Path(tmp)
        lm = make_tiny_lm(root / "model")
        make_corpus(root / "text")
        recipe = {
            "name": "gpu",
            "output_dir": str(root / "runs"),
            "data": {
                "name": "lm_activations",
                "model": str(lm),
                "hook": "transformer.h.1",
                "text": [str(root / "text")],
                "context_length": 32,
                "batch_size": 64,
                "buffer_size": 256,
                "val_sequences": 2,
                "stats_tokens": 256,
                "normalize": "unit",
            },
            "model": {"d_sae": 64, "sparsity": {"name": "topk", "k": 4}},
            "trainer": {
                "max_steps": 12,
                "val_check_interval": 6,
                "accelerator": "gpu" if gpu else "cpu",
            },
            "checkpoint": {"every_n_steps": 6},
            "callbacks": [{"name": "e2e_kl", "every_n_steps": 4}],
        }
        path = root / "r.yaml"
        path.write_text(yaml.safe_dump(recipe))
        for mode in ("stream", "cache"):
            over = [("name", mode)]
            if mode == "cache":
                over += [("data.cache_dir", str(root / "cache")), ("data.device", device)]
                r = load_recipe([path], over)
                dm = registry.build("datamodules", r.data, field="data", seed=0)
                write_cache(dm, Console(quiet=True))
                assert next(dm.model.parameters()).device.type == device
            run = build_run(load_recipe([path], over))
            start = time.perf_counter()
            run.trainer.fit(run.module, datamodule=run.datamodule)
            metrics = finish(run)
            lm_device = str(next(run.datamodule.language_model().model.parameters()).device)
            results[mode] = {
                "seconds": time.perf_counter() - start,
                "lm_device": lm_device,
                "sae_device": str(run.module.device),
                **{k: v for k, v in metrics.items() if k.startswith(("e2e/", "val/"))},
            }
            assert lm_device.startswith(device), lm_device
            assert all(math.isfinite(v) for k, v in metrics.items() if k.startswith("e2e/kl"))
    out.mkdir(parents=True, exist_ok=True)
    (out / "gpu_check.json").write_text(json.dumps(results, indent=2, default=str))
    print(json.dumps(results, indent=2, default=str))
    print("GPU CHECK OK")


if __name__ == "__main__":
    main(Path(sys.argv[1]), *sys.argv[2:])
