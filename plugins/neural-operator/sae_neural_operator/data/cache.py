"""Generated datasets cached on disk: safetensors files plus a manifest, reused while they match.

Layout of a cache folder::

    manifest.json                 identity (every generation parameter and the seed),
                                  fingerprint, and per file: name, sha256, tensor shapes
    train_64.safetensors          e.g. tensors "input", "solution" of one split and resolution
    val_64.safetensors
    ...

The identity is whatever determines the content (the caller's dict). A cache is reused when its
manifest holds the same identity and every file is present with its sha256 (checked when
``verify``); otherwise the data is generated again, with a message naming the parameters that
changed, and the folder is rewritten. Writing follows :mod:`sae_lightning.data.cache`: the old
manifest is removed first, every file is written to a temporary name and renamed
(:func:`sae_lightning.atomic.atomic_write`), and the manifest comes last, so a killed run never
leaves a manifest describing files it did not finish.
"""

from __future__ import annotations

import hashlib
import importlib.metadata as md
import json
from collections.abc import Callable
from pathlib import Path
from typing import Any

from safetensors.torch import load_file, save
from torch import Tensor

from sae_lightning.atomic import atomic_write, atomic_write_text
from sae_lightning.data.cache import sha256_file

MANIFEST = "manifest.json"
FORMAT_VERSION = 1

Files = dict[str, dict[str, Tensor]]
"""``{file stem: {tensor name: tensor}}``."""


def _version() -> str:
    try:
        return md.version("sae-neural-operator")
    except md.PackageNotFoundError:  # pragma: no cover - running from a source tree
        return "unknown"


def fingerprint(identity: dict[str, Any]) -> str:
    """sha256 of the identity's canonical JSON."""
    return hashlib.sha256(json.dumps(identity, sort_keys=True).encode()).hexdigest()


def _flatten(value: Any, prefix: str = "") -> dict[str, Any]:
    if isinstance(value, dict):
        out: dict[str, Any] = {}
        for k, v in value.items():
            out.update(_flatten(v, f"{prefix}{k}."))
        return out
    return {prefix.rstrip("."): value}


def differences(old: dict[str, Any], new: dict[str, Any]) -> list[str]:
    """``["darcy.alpha: 2.0 -> 2.5", ...]``: the leaves of two identities that differ."""
    a, b = _flatten(old), _flatten(new)
    return [
        f"{k}: {a.get(k)!r} -> {b.get(k)!r}"
        for k in sorted(set(a) | set(b))
        if a.get(k) != b.get(k)
    ]


def read(path: Path, identity: dict[str, Any], verify: bool) -> tuple[Files | None, str]:
    """The cached files when ``path`` holds a complete cache of ``identity``.

    Returns:
        ``(files, "")`` on a hit; ``(None, reason)`` otherwise, the reason saying what differs
        or which file is missing or corrupt.
    """
    manifest_file = path / MANIFEST
    if not manifest_file.is_file():
        return None, f"no {MANIFEST} in {path}"
    try:
        manifest = json.loads(manifest_file.read_text())
    except json.JSONDecodeError as err:
        return None, f"{manifest_file} is not valid JSON ({err})"
    if manifest.get("format_version") != FORMAT_VERSION:
        return None, f"{manifest_file} has format_version {manifest.get('format_version')!r}"
    if manifest.get("fingerprint") != fingerprint(identity):
        changed = differences(manifest.get("identity", {}), identity)
        return None, "parameters differ from the cached ones (" + "; ".join(changed) + ")"
    files: Files = {}
    for entry in manifest["files"]:
        file = path / entry["file"]
        if not file.is_file():
            return None, f"{file} listed in {manifest_file} is missing"
        if verify and sha256_file(file) != entry["sha256"]:
            return None, f"{file} does not match its sha256 in {manifest_file}"
        files[entry["file"].removesuffix(".safetensors")] = load_file(str(file))
    return files, ""


def write(path: Path, identity: dict[str, Any], files: Files) -> dict[str, Any]:
    """Write ``files`` and the manifest of ``identity`` into ``path`` (atomically, see above).

    Returns:
        The manifest written.
    """
    path.mkdir(parents=True, exist_ok=True)
    old = _listed_files(path)
    (path / MANIFEST).unlink(missing_ok=True)
    entries = []
    for stem, tensors in files.items():
        name = f"{stem}.safetensors"
        data = save({k: v.contiguous() for k, v in tensors.items()}, metadata={"format": "pt"})
        atomic_write(path / name, lambda fh, data=data: fh.write(data))
        entries.append(
            {
                "file": name,
                "sha256": sha256_file(path / name),
                "tensors": {k: list(v.shape) for k, v in tensors.items()},
            }
        )
    manifest = {
        "format_version": FORMAT_VERSION,
        "sae_neural_operator_version": _version(),
        "fingerprint": fingerprint(identity),
        "identity": identity,
        "files": entries,
    }
    atomic_write_text(path / MANIFEST, json.dumps(manifest, indent=2) + "\n")
    for stale in old - {e["file"] for e in entries}:  # files of the previous cache
        (path / stale).unlink(missing_ok=True)
    return manifest


def _listed_files(path: Path) -> set[str]:
    """Plain file names the manifest at ``path`` lists (empty when there is none)."""
    try:
        manifest = json.loads((path / MANIFEST).read_text())
        names = {str(e["file"]) for e in manifest.get("files", [])}
    except (OSError, ValueError, KeyError, TypeError):
        return set()
    return {n for n in names if Path(n).name == n}  # never outside the folder


def load_or_generate(
    path: Path,
    identity: dict[str, Any],
    generate: Callable[[], Files],
    *,
    verify: bool = True,
    log: Callable[[str], None] = print,
) -> Files:
    """The cached files of ``identity`` at ``path``, generating and writing them on a miss.

    Args:
        path: the cache folder.
        identity: everything that determines the content (JSON-serialisable).
        generate: builds the files on a miss.
        verify: check every file's sha256 before reuse.
        log: where to say what happened (reuse, or why it regenerates).
    """
    files, reason = read(path, identity, verify)
    if files is not None:
        log(f"reusing the generated dataset cached in {path}")
        return files
    if (path / MANIFEST).is_file():
        log(f"regenerating the dataset cached in {path}: {reason}")
    else:
        log(f"generating the dataset and caching it in {path}")
    files = generate()
    write(path, identity, files)
    return files
