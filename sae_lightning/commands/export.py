"""``sae-lightning export SOURCE --format saelens|sparsify|native --out DIR``.

SOURCE is a run folder (``runs/<name>/version_N``), a Lightning ``.ckpt`` file, or any SAE
folder :func:`sae_lightning.load_sae` reads, so the command also converts between
SAELens, sparsify and this package's format. After writing, the export is loaded back and its
encode/decode outputs compared with the source's on random inputs.
"""

from __future__ import annotations

import argparse
from pathlib import Path
from typing import TYPE_CHECKING, Any

from sae_lightning.errors import ConfigError, SaeLightningError

if TYPE_CHECKING:
    import torch

FORMAT_CHOICES = ("native", "saelens", "sparsify")
"""Same as :data:`sae_lightning.formats.FORMATS`, spelled out so ``--help`` imports no torch."""

TOLERANCE = 1e-5
"""Largest accepted deviation of a row of the re-loaded export, relative to the row's scale."""
MAX_FLIPPED_ROWS = 0.01
"""Fraction of rows allowed over :data:`TOLERANCE`: where a bias fold rounds differently, a TopK
selection can flip between two latents whose pre-activations differ by a rounding error."""


def register(subparsers: argparse._SubParsersAction) -> None:
    p = subparsers.add_parser(
        "export",
        help="write a trained SAE in SAELens, sparsify or sae-lightning format",
        description="Write the SAE of a run folder, checkpoint or SAE folder in another format, "
        "then load it back and check that it computes the same encode/decode outputs.",
    )
    p.add_argument("source", help="run folder, .ckpt file, or SAE folder in any known format")
    p.add_argument(
        "--format",
        "-f",
        required=True,
        choices=FORMAT_CHOICES,
        dest="fmt",
        help="saelens: cfg.json + sae_weights.safetensors; sparsify: cfg.json + sae.safetensors "
        "(TopK only); native: this package's sae.safetensors + sae_config.json",
    )
    p.add_argument("--out", "-o", required=True, help="output folder (created)")
    p.add_argument("--force", action="store_true", help="write into a non-empty --out folder")
    p.set_defaults(func=run)


def load_source(source: str) -> tuple[torch.nn.Module, dict[str, Any]]:
    """The SAE named by ``source`` and its provenance (plugin versions, when recorded).

    Raises:
        ConfigError: ``source`` does not exist.
    """
    import torch

    from sae_lightning.formats.checkpoint import load_checkpoint_sae
    from sae_lightning.io import load_sae

    path = Path(source)
    if not path.exists():
        raise ConfigError(
            "source", f"{source!r} does not exist", "pass a run folder, a .ckpt or an SAE folder"
        )
    try:
        if path.is_file() and path.suffix == ".ckpt":
            return load_checkpoint_sae(path)
        return load_sae(path, dtype=torch.float32), {}  # the peers store float32
    except FileNotFoundError as err:
        raise ConfigError("source", str(err)) from None


def compare(a: torch.nn.Module, b: torch.nn.Module, d_in: int) -> tuple[float, float]:
    """How far SAE ``b`` is from ``a`` on 512 random inputs.

    Returns:
        ``(largest relative deviation of a row, fraction of rows over TOLERANCE)``, where a
        row's deviation is the larger of its encode and reconstruction differences divided by
        the larger of 1 and that row's largest absolute output of ``a``.
    """
    import torch

    with torch.no_grad():
        x = torch.randn(512, d_in, generator=torch.Generator().manual_seed(0))
        fa, fb, ra, rb = a.encode(x), b.encode(x), a(x), b(x)
        scale = torch.maximum(fa.abs().amax(dim=1), ra.abs().amax(dim=1)).clamp_min(1.0)
        diff = torch.maximum((fa - fb).abs().amax(dim=1), (ra - rb).abs().amax(dim=1)) / scale
    return float(diff.max()), float((diff > TOLERANCE).float().mean())


def run(args: argparse.Namespace, rest: list[str]) -> int:
    import torch

    from sae_lightning.formats import export
    from sae_lightning.io import load_sae

    if rest:
        raise ConfigError(rest[0], "unexpected argument for `export`")
    out = Path(args.out)
    if out.exists() and any(out.iterdir()) and not args.force:
        raise ConfigError(
            "--out",
            f"{out} exists and is not empty",
            "choose a new folder, or add --force to write into it",
        )
    sae, provenance = load_source(args.source)
    export(sae, out, args.fmt, **provenance)
    deviation, flipped = compare(sae, load_sae(out, dtype=torch.float32), int(sae.d_in))
    if flipped > MAX_FLIPPED_ROWS:
        raise SaeLightningError(
            f"the {args.fmt} export at {out} deviates from the source in {flipped:.0%} of 512 "
            f"random inputs (largest relative deviation {deviation:.3g} > {TOLERANCE}); "
            "please report this as a bug"
        )
    files = ", ".join(sorted(p.name for p in out.iterdir() if p.is_file()))
    print(
        f"wrote {args.fmt} SAE to {out} ({files}); reloaded, it deviates from the source by at "
        f"most {deviation:.2g} (relative) on 512 random inputs"
    )
    return 0
