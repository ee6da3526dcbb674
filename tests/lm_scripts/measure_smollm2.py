"""Time the parts of recipes/smollm2-resid-topk.yaml on a slice of the corpus, to extrapolate.

    OMP_NUM_THREADS=2 python tests/lm_scripts/measure_smollm2.py [contexts] [steps]

Prints the harvest rate, the SAE training step time and the KL-callback evaluation time, then
the time the full recipe would take at those rates.
"""

from __future__ import annotations

import os
import sys
import tempfile
import time
from pathlib import Path

from rich.console import Console

from sae_lightning.data.cache import write_cache
from sae_lightning.recipe import load_recipe
from sae_lightning.registry import registry
from sae_lightning.runner import build_run

RECIPE = Path(__file__).resolve().parents[2] / "recipes" / "smollm2-resid-topk.yaml"


def main(contexts: int = 96, steps: int = 20) -> None:
    print(f"load average: {os.getloadavg()}; OMP_NUM_THREADS={os.environ.get('OMP_NUM_THREADS')}")
    with tempfile.TemporaryDirectory() as tmp:
        over = [
            ("data.cache_dir", f"{tmp}/cache"),
            ("data.max_sequences", str(contexts)),
            ("output_dir", f"{tmp}/runs"),
            ("trainer.max_steps", str(steps)),
            ("trainer.val_check_interval", str(steps)),
            ("trainer.enable_progress_bar", "false"),
        ]
        recipe = load_recipe([RECIPE], over)
        full = registry.build("datamodules", load_recipe([RECIPE]).data, field="data", seed=0)
        full.load()
        full_tokens = int(full.corpus.train.keep.sum()) + int(full.corpus.val.keep.sum())
        dm = registry.build("datamodules", recipe.data, field="data", seed=0)
        t = time.perf_counter()
        dm.load()
        load_s = time.perf_counter() - t
        t = time.perf_counter()
        manifest = write_cache(dm, Console(quiet=True))
        harvest_s = time.perf_counter() - t
        tokens = manifest["tokens"] + manifest["val_tokens"]
        rate = tokens / harvest_s

        run = build_run(recipe, log=False)
        run.datamodule.setup("fit")
        t = time.perf_counter()
        run.trainer.fit(run.module, datamodule=run.datamodule)
        fit_s = time.perf_counter() - t
        t = time.perf_counter()
        run.trainer.validate(run.module, datamodule=run.datamodule, verbose=False)
        val_s = time.perf_counter() - t
    # fit ran `steps` steps plus one validation (with the KL callback) at the end.
    step_s = (fit_s - val_s) / steps
    full_recipe = load_recipe([RECIPE])
    n_steps = full_recipe.trainer["max_steps"]
    n_val = n_steps // full_recipe.trainer["val_check_interval"] + 1
    print(f"model + corpus load: {load_s:.1f} s")
    print(f"harvest: {tokens} tokens in {harvest_s:.1f} s = {rate:.0f} tokens/s")
    print(f"SAE step (batch {recipe.data['batch_size']}): {step_s:.2f} s")
    print(f"validation incl. KL callback: {val_s:.1f} s")
    total = full_tokens / rate + n_steps * step_s + n_val * val_s + 2 * load_s
    print(
        f"full recipe: {full_tokens} tokens to harvest ({full_tokens / rate / 60:.1f} min), "
        f"{n_steps} steps ({n_steps * step_s / 60:.1f} min), {n_val} validations "
        f"({n_val * val_s / 60:.1f} min): about {total / 60:.0f} min"
    )


if __name__ == "__main__":
    main(*(int(a) for a in sys.argv[1:]))
