"""Write the static browser: ``index.html``, ``latent.html`` and their ``data/*.js`` files.

Latents are stored in groups of :data:`GROUP` per data file, so opening one latent reads one
small file. The whole folder is written next to the final one and renamed into place, so an
interrupted run never leaves a half-written browser.
"""

from __future__ import annotations

import json
import os
import shutil
from collections.abc import Callable
from pathlib import Path
from typing import Any

from sae_lightning.inspect.assets import INDEX_HTML, LATENT_HTML, page

GROUP = 64
"""Latents per data file."""
PER_PAGE = 100
"""Index rows per page."""


def _json(payload: Any) -> str:
    return json.dumps(payload, separators=(",", ":"), allow_nan=False)


def group_file(first: int) -> str:
    """The data file of the group starting at latent ``first``."""
    return f"data/latents_{first // GROUP:05d}.js"


def write_browser(
    out: Path,
    title: str,
    summary: str,
    index_rows: list[list[Any]],
    latent: Callable[[int], dict[str, Any]],
    files: Callable[[Path], None] | None = None,
) -> Path:
    """Write the browser into ``out`` (replacing an older one) and return ``out/index.html``.

    Args:
        out: the browser folder.
        title: page heading.
        summary: one line under it (tokens, source, thresholds).
        index_rows: ``[id, density, max, mean, flag, top tokens]`` per latent, in id order.
        latent: the page data of latent ``j`` (a JSON-able dict).
        files: writes extra files (images) into the staging folder before it is renamed.
    """
    stage = out.with_name(out.name + ".partial")
    shutil.rmtree(stage, ignore_errors=True)
    (stage / "data").mkdir(parents=True)
    (stage / "index.html").write_text(
        page(INDEX_HTML, title=title, per_page=PER_PAGE), encoding="utf-8"
    )
    (stage / "latent.html").write_text(
        page(LATENT_HTML, title=title, group=GROUP), encoding="utf-8"
    )
    index = {"summary": summary, "rows": index_rows}
    (stage / "data" / "index.js").write_text(
        f"window.INSPECT_INDEX = {_json(index)};\n", encoding="utf-8"
    )
    for first in range(0, len(index_rows), GROUP):
        group = [latent(j) for j in range(first, min(first + GROUP, len(index_rows)))]
        text = f"inspectGroup({first}, {_json(group)});\n"
        (stage / group_file(first)).write_text(text, encoding="utf-8")
    if files is not None:
        files(stage)
    _swap(stage, out)
    return out / "index.html"


def _swap(stage: Path, out: Path) -> None:
    """Rename ``stage`` to ``out``; an existing ``out`` is removed only after the rename."""
    old = out.with_name(out.name + ".old")
    shutil.rmtree(old, ignore_errors=True)
    if out.exists():
        os.replace(out, old)
    os.replace(stage, out)
    shutil.rmtree(old, ignore_errors=True)
