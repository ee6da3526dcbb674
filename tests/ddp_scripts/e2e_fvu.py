"""One e2e training step's logged metrics on one rank of a 2-process gloo group.

``python e2e_fvu.py <out_dir> <rank> <world> <port>``: rank ``r`` takes contexts ``r::world``
of the batch :func:`step_metrics` builds and writes its metrics to ``<out_dir>/rank<r>.json``.
With ``world`` 1 (in the test process) it is the one-process reference on the whole batch.
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

import torch
import torch.distributed as dist

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # tests/, for lm_scripts

from lm_scripts.tiny_lm import D_MODEL, make_model

from sae_lightning.lm.e2e_module import E2ESAEModule, E2ETarget

HOOK = "transformer.h.0"
CONTEXTS, SEQ = 8, 12


def step_metrics(rank: int, world: int) -> dict[str, float]:
    """The metrics ``compute_e2e_step`` logs for this rank's share of one fixed batch."""
    torch.manual_seed(0)
    lm = make_model(seed=0, dtype=torch.float64).requires_grad_(False)
    topk = {"name": "topk", "k": 4}
    module = E2ESAEModule(
        D_MODEL, 48, {"name": "linear"}, {"name": "linear"}, topk, loss={"mode": "e2e"}
    )
    module = module.double()
    g = torch.Generator().manual_seed(1)
    ids = torch.randint(4, 44, (CONTEXTS, SEQ), generator=g)
    keep = torch.rand(CONTEXTS, SEQ, generator=g) > 0.5  # uneven kept positions per rank
    keep[:, 0] = False
    out = module.compute_e2e_step(
        E2ETarget(lm, HOOK, "output", 0.37, []), ids[rank::world], keep[rank::world], step=0
    )
    metrics = {k: float(v) for k, v in out.metrics.items()}
    metrics["kept_rows"] = int(keep[rank::world].sum())
    metrics["tokens_seen"] = int(module.tokens_seen)
    return metrics


def main() -> None:
    out, rank, world, port = Path(sys.argv[1]), int(sys.argv[2]), int(sys.argv[3]), sys.argv[4]
    dist.init_process_group(
        "gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=world
    )
    try:
        (out / f"rank{rank}.json").write_text(json.dumps(step_metrics(rank, world)))
    finally:
        dist.destroy_process_group()


if __name__ == "__main__":
    main()
