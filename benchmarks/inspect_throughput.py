"""`sae-lightning inspect` against harvesting the same activations, on SmolLM2-135M.

The SAE is a TopK SAE with 4,608 latents (k 32) on the residual stream after block 15, built
from random initialisation: the time and memory of ``inspect`` do not depend on what the SAE
learned. Text: the SmolLM2 recipe's corpus (``builtin:python-docs``), 256-token contexts.

Each token count runs in its own subprocess, so its peak memory is its own:

1. ``inspect`` over N tokens through the same code as the command (LM forward passes to the
   hook, SAE encoding, running top-20 contexts and histograms, logit effects, nearest atoms,
   the browser files and the TensorBoard projector), timed and its peak resident set recorded;
2. then the harvest of the same contexts (the LM forward passes alone, what ``sae-lightning
   cache`` does), timed.

    sae-lightning models prepare smollm2                       # once
    nice -n 10 python benchmarks/inspect_throughput.py --tokens 25000 100000 --threads 2

Output: one ``key=value`` line per count (``inspect_s``, ``harvest_s``, ``peak_rss_mb``), then
``ratio=`` (inspect over harvest at the largest count; goal <= 1.5) and
``peak_rss_ratio=`` (largest count's peak over the smallest's; near 1 when memory does not grow
with the tokens).
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import subprocess
import sys
import tempfile
import time
from pathlib import Path

RECIPE = Path(__file__).resolve().parents[1] / "recipes" / "smollm2-resid-topk.yaml"


def worker(tokens: int, threads: int) -> dict[str, float]:
    import torch
    from rich.console import Console

    from sae_lightning.inspect.lm_run import inspect_lm
    from sae_lightning.inspect.options import InspectOptions
    from sae_lightning.inspect.source import take_tokens
    from sae_lightning.recipe import load_recipe
    from sae_lightning.registry import registry
    from sae_lightning.sae import SparseAutoencoder

    torch.set_num_threads(threads)
    torch.manual_seed(0)
    recipe = load_recipe([RECIPE], [("data.cache_dir", "null")])
    dm = registry.build("datamodules", recipe.data, field="data", seed=0)
    dm.load()  # the LM, tokenizer and corpus: loaded once, outside both timings
    sae = SparseAutoencoder(
        576, 4608, {"name": "linear"}, {"name": "linear"}, {"name": "topk", "k": 32}
    )
    sae.eval()
    with tempfile.TemporaryDirectory() as tmp:
        options = InspectOptions(tokens=tokens, source="lm", out=Path(tmp) / "inspect")
        start = time.perf_counter()
        inspect_lm(Path(tmp), sae, dm, options, Console(quiet=True))
        inspect_s = time.perf_counter() - start
    peak_mb = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    corpus = dm.corpus
    ids, keep = take_tokens(
        torch.cat([corpus.train.ids, corpus.val.ids]),
        torch.cat([corpus.train.keep, corpus.val.keep]),
        tokens,
    )
    from sae_lightning.lm.text import Contexts

    start = time.perf_counter()
    rows = dm.harvester(Contexts(ids, keep))
    harvest_s = time.perf_counter() - start
    return {
        "tokens": int(keep.sum()),
        "rows": int(rows.shape[0]),
        "inspect_s": inspect_s,
        "harvest_s": harvest_s,
        "peak_rss_mb": peak_mb,
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--tokens", type=int, nargs="+", default=[25_000, 100_000])
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--worker", type=int, default=None, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.worker is not None:
        print(json.dumps(worker(args.worker, args.threads)))
        return
    env = {**os.environ, "OMP_NUM_THREADS": str(args.threads)}
    results = []
    for tokens in sorted(args.tokens):
        cmd = [sys.executable, __file__, "--worker", str(tokens), "--threads", str(args.threads)]
        out = subprocess.run(cmd, env=env, capture_output=True, text=True, check=True).stdout
        result = json.loads(out.strip().splitlines()[-1])
        results.append(result)
        print(
            " ".join(
                f"{k}={v:.4g}" if isinstance(v, float) else f"{k}={v}" for k, v in result.items()
            )
        )
    last = results[-1]
    print(f"ratio={last['inspect_s'] / last['harvest_s']:.3f}")
    print(f"peak_rss_ratio={last['peak_rss_mb'] / results[0]['peak_rss_mb']:.3f}")


if __name__ == "__main__":
    main()
