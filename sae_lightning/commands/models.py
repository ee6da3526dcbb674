"""``sae-lightning models prepare smollm2``: make an offline LM loadable in seconds."""

from __future__ import annotations

import argparse
import time
from pathlib import Path

from sae_lightning.errors import ConfigError


def register(subparsers: argparse._SubParsersAction) -> None:
    p = subparsers.add_parser(
        "models",
        help="prepare language models shipped as pip packages for offline use",
        description="Prepare an offline LM: load its GGUF once with transformers and save an "
        "fp32 safetensors folder (default ~/.cache/sae-lightning/<model>).",
    )
    sub = p.add_subparsers(dest="models_command", required=True)
    q = sub.add_parser("prepare", help="convert a packaged GGUF model to a safetensors folder")
    q.add_argument("model", help="which model: smollm2")
    q.add_argument("--out", default=None, help="folder to write (default under the cache root)")
    q.add_argument("--force", action="store_true", help="rewrite an existing folder")
    p.set_defaults(func=run)


def run(args: argparse.Namespace, rest: list[str]) -> int:
    from sae_lightning.lm.prepare import prepare

    if rest:
        raise ConfigError(rest[0], "unexpected argument for `models prepare`")
    start = time.perf_counter()
    out = prepare(args.model, Path(args.out).expanduser() if args.out else None, force=args.force)
    print(
        f"{args.model}: ready at {out} ({time.perf_counter() - start:.0f} s); set data.model: {out}"
    )
    return 0
