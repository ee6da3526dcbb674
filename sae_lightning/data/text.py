"""Text for LM activations: read local files, tokenize, pack into fixed-length contexts.

Documents are joined with the tokenizer's EOS token and cut into rows of ``context_length``
tokens (each row starting with BOS when asked), so no row is padded and no attention mask is
needed. Which positions count as training tokens is decided here, from the token ids alone
(special tokens can be excluded), so the number of activations is known before the model runs.
"""

from __future__ import annotations

import glob
import json
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from torch import Tensor

from sae_lightning.errors import ConfigError

BUILTIN = {"builtin:python-docs"}
"""Corpora generated on the fly (see :mod:`sae_lightning.lm.corpus`)."""


@dataclass(frozen=True)
class Contexts:
    """Packed token rows and which positions yield training activations."""

    ids: Tensor
    """``(n, context_length)`` int64 token ids."""
    keep: Tensor
    """``(n, context_length)`` bool: True where the activation is used."""

    def __len__(self) -> int:
        return int(self.ids.shape[0])

    def row_counts(self) -> Tensor:
        """``(n,)`` kept positions per row."""
        return self.keep.sum(dim=1)


@dataclass(frozen=True)
class TokenizedCorpus:
    """The corpus split into training rows and held-out rows."""

    train: Contexts
    val: Contexts


def read_documents(sources: Sequence[str], text_field: str = "text") -> list[str]:
    """Every document named by ``sources``, in a fixed order.

    Args:
        sources: ``.txt`` files (one document each), ``.jsonl`` files (one document per line,
            in ``text_field``), folders of those, globs, a folder saved by
            ``datasets.Dataset.save_to_disk``, or ``builtin:python-docs``.
        text_field: the JSON key (or dataset column) holding the text.

    Raises:
        ConfigError: naming ``data.text`` when a source is missing or yields nothing.
    """
    docs: list[str] = []
    for source in sources:
        if source in BUILTIN:
            from sae_lightning.lm.corpus import python_docs

            docs += python_docs()
            continue
        expanded = str(Path(source).expanduser())
        paths = sorted(glob.glob(expanded, recursive=True)) if glob.has_magic(expanded) else []
        paths = paths or [expanded]
        for path in map(Path, paths):
            docs += _read_path(path, text_field)
    docs = [d for d in docs if d.strip()]
    if not docs:
        raise ConfigError("data.text", f"{list(sources)} hold no text", "point it at .txt files")
    return docs


def _read_path(path: Path, text_field: str) -> list[str]:
    if path.is_dir():
        if (path / "dataset_info.json").is_file() or (path / "state.json").is_file():
            return _read_dataset(path, text_field)
        files = sorted(p for p in path.rglob("*") if p.suffix in (".txt", ".jsonl"))
        return [d for f in files for d in _read_path(f, text_field)]
    if not path.is_file():
        raise ConfigError(
            "data.text", f"{str(path)!r} does not exist", "give .txt/.jsonl files or folders"
        )
    if path.suffix == ".jsonl":
        out = []
        for i, line in enumerate(path.read_text(encoding="utf-8").splitlines()):
            if not line.strip():
                continue
            record = json.loads(line)
            if text_field not in record:
                raise ConfigError(
                    "data.text_field",
                    f"line {i + 1} of {path} has no key {text_field!r} (keys: {sorted(record)})",
                )
            out.append(str(record[text_field]))
        return out
    return [path.read_text(encoding="utf-8", errors="replace")]


def _read_dataset(path: Path, text_field: str) -> list[str]:
    try:
        import datasets
    except ImportError:
        raise ConfigError(
            "data.text", f"{path} is a `datasets` folder but datasets is not installed"
        ) from None
    data = datasets.load_from_disk(str(path))
    if isinstance(data, datasets.DatasetDict):
        data = data["train"] if "train" in data else next(iter(data.values()))
    if text_field not in data.column_names:
        raise ConfigError(
            "data.text_field", f"{path} has no column {text_field!r}: {data.column_names}"
        )
    return [str(t) for t in data[text_field]]


def special_ids(tokenizer: Any) -> set[int]:
    """Ids of the tokenizer's special tokens (BOS, EOS, padding and any added specials)."""
    ids = set(getattr(tokenizer, "all_special_ids", []) or [])
    for attr in ("bos_token_id", "eos_token_id", "pad_token_id"):
        value = getattr(tokenizer, attr, None)
        if isinstance(value, int):
            ids.add(value)
    return ids


def pack(docs: list[list[int]], context_length: int, *, bos: int | None, sep: int | None) -> Tensor:
    """Join documents with ``sep`` and cut them into ``(n, context_length)`` rows.

    Args:
        docs: token ids of each document.
        context_length: tokens per row, BOS included.
        bos: prepended to every row when not None.
        sep: appended to every document when not None.
    """
    stream = [t for d in docs for t in ([*d, sep] if sep is not None else d)]
    body = context_length - (1 if bos is not None else 0)
    n = len(stream) // body
    rows = torch.tensor(stream[: n * body], dtype=torch.long).view(n, body)
    if bos is not None:
        rows = torch.cat([torch.full((n, 1), bos, dtype=torch.long), rows], dim=1)
    return rows


def heldout_rows(n: int, n_val: int) -> Tensor:
    """Evenly spaced row indices held out for validation (the same for every seed)."""
    if n_val == 0:
        return torch.zeros(0, dtype=torch.long)
    return torch.linspace(0, n - 1, n_val).round().long().unique()


def tokenize_corpus(
    docs: list[str],
    tokenizer: Any,
    *,
    context_length: int,
    prepend_bos: bool,
    exclude_special_tokens: bool,
    val_sequences: int,
    max_sequences: int | None = None,
) -> TokenizedCorpus:
    """Tokenize, pack and split ``docs``; mark the positions that yield training tokens.

    Raises:
        ConfigError: the corpus is too small for the held-out rows plus one training row.
    """
    bos = tokenizer.bos_token_id if tokenizer.bos_token_id is not None else tokenizer.eos_token_id
    if prepend_bos and bos is None:
        raise ConfigError(
            "data.prepend_bos", "the tokenizer has neither a BOS nor an EOS token", "set it false"
        )
    encoded = tokenizer(docs, add_special_tokens=False)["input_ids"]
    rows = pack(
        encoded, context_length, bos=bos if prepend_bos else None, sep=tokenizer.eos_token_id
    )
    if max_sequences is not None:
        rows = rows[:max_sequences]
    if len(rows) <= val_sequences:
        raise ConfigError(
            "data.text",
            f"packs into {len(rows)} rows of {context_length} tokens, but val_sequences is "
            f"{val_sequences}",
            "add text, shorten data.context_length or lower data.val_sequences",
        )
    keep = torch.ones_like(rows, dtype=torch.bool)
    if exclude_special_tokens:
        specials = torch.tensor(sorted(special_ids(tokenizer)), dtype=torch.long)
        keep = ~torch.isin(rows, specials)
    val = heldout_rows(len(rows), val_sequences)
    is_train = torch.ones(len(rows), dtype=torch.bool)
    is_train[val] = False
    return TokenizedCorpus(Contexts(rows[is_train], keep[is_train]), Contexts(rows[val], keep[val]))
