"""Make plugin distributions discoverable the way pip would: a dist-info with entry_points.txt."""

from __future__ import annotations

import textwrap
from pathlib import Path


def make_dist(
    root: Path,
    dist: str,
    entry_points: dict[str, dict[str, str]],
    modules: dict[str, str] | None = None,
    version: str = "0.1.0",
) -> None:
    """Write ``<dist>-<version>.dist-info`` and module files into ``root`` (put it on sys.path).

    Args:
        entry_points: ``{group: {name: "module:attr"}}``.
        modules: ``{module_name: source}``.
    """
    info = root / f"{dist.replace('-', '_')}-{version}.dist-info"
    info.mkdir(parents=True)
    (info / "METADATA").write_text(f"Metadata-Version: 2.1\nName: {dist}\nVersion: {version}\n")
    lines = []
    for group, eps in entry_points.items():
        lines.append(f"[{group}]")
        lines += [f"{name} = {target}" for name, target in eps.items()]
    (info / "entry_points.txt").write_text("\n".join(lines) + "\n")
    for name, source in (modules or {}).items():
        (root / f"{name}.py").write_text(textwrap.dedent(source))
