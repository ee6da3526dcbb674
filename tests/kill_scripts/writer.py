"""Rewrites one artifact forever, each version filled with its iteration number."""

from __future__ import annotations

import sys
from pathlib import Path

import torch

from sae_lightning.atomic import atomic_write
from sae_lightning.checkpoint_io import AtomicCheckpointIO
from sae_lightning.io import export_sae
from sae_lightning.sae import SparseAutoencoder


def main(kind: str, out: Path) -> None:
    io = AtomicCheckpointIO()
    sae = SparseAutoencoder(64, 4096, {"name": "linear"}, {"name": "linear"}, {"name": "topk"})
    big = torch.empty(4_000_000)
    i = 0
    while True:
        i += 1
        if kind == "checkpoint":
            io.save_checkpoint({"i": i, "t": big.fill_(i)}, out / "last.ckpt")
        elif kind == "export":
            with torch.no_grad():
                for p in sae.parameters():
                    p.fill_(i)
            export_sae(sae, out, iteration=i)
        else:  # a cache shard: raw bytes, as the activation cache writes them
            atomic_write(out / "shard.bin", lambda fh, i=i: fh.write(bytes([i % 256]) * 8_000_000))
        print(f"wrote {i}", flush=True)


if __name__ == "__main__":
    main(sys.argv[1], Path(sys.argv[2]))
