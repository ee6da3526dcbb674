"""How long ``sae-lightning plugins`` and a bad recipe take to answer, against torch's import.

Each command runs in a fresh process, alternating with a process that only imports torch, so a
change in machine load moves both sides. The acceptance is ``plugins`` within torch's import
time + 1.0 s; the script prints the ratio and the difference, best of ``--repeats``.

    python benchmarks/cli_startup.py --repeats 5
"""

from __future__ import annotations

import argparse
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def best_time(argv: list[str], repeats: int, *, check: bool) -> float:
    """The fastest of ``repeats`` runs of ``argv``, in seconds."""
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        done = subprocess.run(argv, capture_output=True, text=True, cwd=ROOT)
        times.append(time.perf_counter() - start)
        if check and done.returncode != 0:
            raise SystemExit(f"{' '.join(argv)} failed:\n{done.stderr}")
    return min(times)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--repeats", type=int, default=5)
    args = parser.parse_args()
    python = sys.executable
    cli = [python, "-m", "sae_lightning.cli"]
    with tempfile.TemporaryDirectory() as tmp:
        bad = Path(tmp) / "bad.yaml"
        bad.write_text("name: bad\nmodel: {sparsity: {name: topk, k: -1}}\n")
        rows = []
        for label, argv, check in (
            ("import torch", [python, "-c", "import torch"], True),
            ("sae-lightning plugins", [*cli, "plugins"], True),
            ("sae-lightning fit (bad recipe)", [*cli, "fit", "--config", str(bad)], False),
        ):
            rows.append((label, best_time(argv, args.repeats, check=check)))
    torch_s = rows[0][1]
    print(f"python {sys.version.split()[0]}, {os.cpu_count()} CPUs, best of {args.repeats}")
    print(f"{'command':<34}{'seconds':>9}{'/ torch':>9}{'- torch':>9}")
    for label, seconds in rows:
        print(f"{label:<34}{seconds:>9.2f}{seconds / torch_s:>9.2f}{seconds - torch_s:>+9.2f}")
    plugins_s = rows[1][1]
    verdict = "within" if plugins_s <= torch_s + 1.0 else "OVER"
    print(f"plugins: {verdict} torch's import + 1.0 s ({plugins_s - torch_s:+.2f} s)")


if __name__ == "__main__":
    main()
