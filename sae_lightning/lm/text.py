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

BUILTIN = {"builtin:python-docs", "builtin:python-license"}
"""Corpora generated on the fly (see :mod:`sae_lightning.lm.corpus`)."""


@dataclass(frozen=True)
class Contexts:
    """Packed token rows and which positions yield training activations."""

    ids: Tensor
    """``(n, context_length)`` int64 token ids."""
    keep: Tensor
    """``(n, context_length)`` bool: True where the activation is used."""
    docs: Tensor | None = None
    """``(n, context_length)`` int32 index of the document each token comes from (-1: BOS)."""

    def __len__(self) -> int:
        return int(self.ids.shape[0])

    def row_counts(self) -> Tensor:
        """``(n,)`` kept positions per row."""
        return self.keep.sum(dim=1)


@dataclass(frozen=True)
class TokenizedCorpus:
    """The corpus split by document into training rows and held-out rows."""

    train: Contexts
    val: Contexts
    documents: int
    """Number of documents in the corpus."""
    val_documents: list[int]
    """Indices of the held-out documents: no training row holds a token of theirs."""


def read_documents(
    sources: Sequence[str], text_field: str = "text", field: str = "data.text"
) -> list[str]:
    """Every document named by ``sources``, in a fixed order.

    Args:
        sources: ``.txt`` files (one document each), ``.jsonl`` files (one document per line,
            in ``text_field``), folders of those, globs, a folder saved by
            ``datasets.Dataset.save_to_disk``, ``builtin:python-docs`` or
            ``builtin:python-license``.
        text_field: the JSON key (or dataset column) holding the text.

    Raises:
        ConfigError: naming ``field`` when a source is missing or yields nothing.
    """
    docs: list[str] = []
    for source in sources:
        if source in BUILTIN:
            docs += _builtin(source, field)
            continue
        expanded = str(Path(source).expanduser())
        paths = sorted(glob.glob(expanded, recursive=True)) if glob.has_magic(expanded) else []
        paths = paths or [expanded]
        for path in map(Path, paths):
            docs += _read_path(path, text_field, field)
    docs = [d for d in docs if d.strip()]
    if not docs:
        raise ConfigError(field, f"{list(sources)} hold no text", "point it at .txt files")
    return docs


def _builtin(source: str, field: str) -> list[str]:
    from sae_lightning.lm.corpus import python_docs, python_license

    if source == "builtin:python-docs":
        return python_docs()
    try:
        return python_license()
    except FileNotFoundError as error:
        raise ConfigError(field, f"{source}: {error}", "name a text file instead") from None


def _read_path(path: Path, text_field: str, field: str) -> list[str]:
    if path.is_dir():
        if (path / "dataset_info.json").is_file() or (path / "state.json").is_file():
            return _read_dataset(path, text_field)
        files = sorted(p for p in path.rglob("*") if p.suffix in (".txt", ".jsonl"))
        return [d for f in files for d in _read_path(f, text_field, field)]
    if not path.is_file():
        raise ConfigError(
            field, f"{str(path)!r} does not exist", "give .txt/.jsonl files or folders"
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


def pack(
    docs: list[list[int]], context_length: int, *, bos: int | None, sep: int | None
) -> tuple[Tensor, Tensor]:
    """Join documents with ``sep`` and cut them into ``(n, context_length)`` rows.

    Args:
        docs: token ids of each document.
        context_length: tokens per row, BOS included.
        bos: prepended to every row when not None.
        sep: appended to every document when not None.

    Returns:
        ``(ids, doc)``: the rows, and for every token the position of its document in
        ``docs`` (-1 for BOS).
    """
    tail = [sep] if sep is not None else []
    stream = [t for d in docs for t in [*d, *tail]]
    owner = [i for i, d in enumerate(docs) for _ in range(len(d) + len(tail))]
    body = context_length - (1 if bos is not None else 0)
    n = len(stream) // body
    rows = torch.tensor(stream[: n * body], dtype=torch.long).view(n, body)
    doc = torch.tensor(owner[: n * body], dtype=torch.int32).view(n, body)
    if bos is not None:
        rows = torch.cat([torch.full((n, 1), bos, dtype=torch.long), rows], dim=1)
        doc = torch.cat([torch.full((n, 1), -1, dtype=torch.int32), doc], dim=1)
    return rows, doc


@dataclass(frozen=True)
class DocumentSplit:
    """How many documents are held out (at most one of the two), chosen with ``seed``.

    Neither set: held-out documents are drawn until they fill ``val_sequences`` contexts.
    """

    val_sequences: int
    val_documents: int | None = None
    val_fraction: float | None = None
    seed: int = 0

    @staticmethod
    def none() -> DocumentSplit:
        """Hold nothing out (an evaluation corpus: every document is evaluated)."""
        return DocumentSplit(0)


def held_out_documents(lengths: list[int], split: DocumentSplit, body: int) -> list[int]:
    """Indices of the held-out documents (sorted), drawn in a seeded order.

    Args:
        lengths: tokens per document (separator included).
        split: how many to hold out.
        body: tokens per context besides BOS.

    Raises:
        ConfigError: the corpus has too few documents to hold any out and still train.
    """
    n = len(lengths)
    if split.val_sequences == 0 and split.val_documents is None and split.val_fraction is None:
        return []
    order = torch.randperm(n, generator=torch.Generator().manual_seed(split.seed)).tolist()
    if split.val_documents is not None:
        count = split.val_documents
    elif split.val_fraction is not None:
        count = max(1, round(split.val_fraction * n))
    else:
        need, count = split.val_sequences * body, 0
        while count < n and need > 0:
            need -= lengths[order[count]]
            count += 1
    if count >= n:
        raise ConfigError(
            "data.val_sequences",
            f"holding out {count} of the corpus's {n} documents leaves none to train on",
            "add documents (e.g. split a long .txt into several files or .jsonl lines), or "
            "lower data.val_sequences / val_documents / val_fraction",
        )
    return sorted(order[:count])


def tokenize_corpus(
    docs: list[str],
    tokenizer: Any,
    *,
    context_length: int,
    prepend_bos: bool,
    exclude_special_tokens: bool,
    split: DocumentSplit,
    max_sequences: int | None = None,
    field: str = "data.text",
) -> TokenizedCorpus:
    """Tokenize ``docs``, split them into held-out and training documents, pack each part.

    Training and held-out rows are packed separately, so no row mixes the two. Held-out rows are
    the first ``val_sequences`` of the held-out part; training rows at most ``max_sequences``.

    Raises:
        ConfigError: the corpus is too small for the held-out rows plus one training row.
    """
    bos = tokenizer.bos_token_id if tokenizer.bos_token_id is not None else tokenizer.eos_token_id
    if prepend_bos and bos is None:
        raise ConfigError(
            "data.prepend_bos", "the tokenizer has neither a BOS nor an EOS token", "set it false"
        )
    encoded = tokenizer(docs, add_special_tokens=False)["input_ids"]
    sep = tokenizer.eos_token_id
    body = context_length - (1 if prepend_bos else 0)
    lengths = [len(d) + (sep is not None) for d in encoded]
    val_docs = held_out_documents(lengths, split, body)
    is_val = torch.zeros(len(encoded), dtype=torch.bool)
    is_val[val_docs] = True
    specials = torch.tensor(sorted(special_ids(tokenizer)), dtype=torch.long)

    def contexts(chosen: list[int], limit: int | None) -> Contexts:
        first = bos if prepend_bos else None
        rows, doc = pack([encoded[i] for i in chosen], context_length, bos=first, sep=sep)
        rows, doc = rows[:limit], doc[:limit]
        doc = torch.where(doc >= 0, torch.tensor(chosen, dtype=torch.int32)[doc.clamp_min(0)], doc)
        keep = ~torch.isin(rows, specials) if exclude_special_tokens else torch.ones_like(rows)
        return Contexts(rows, keep.bool(), doc)

    train = contexts([i for i in range(len(encoded)) if not is_val[i]], max_sequences)
    val = contexts(val_docs, split.val_sequences)
    if len(train) == 0 or len(val) < split.val_sequences:
        raise ConfigError(
            field,
            f"packs into {len(train)} training and {len(val)} held-out rows of {context_length} "
            f"tokens, but val_sequences is {split.val_sequences}",
            "add text, shorten data.context_length or lower data.val_sequences",
        )
    return TokenizedCorpus(train, val, len(encoded), val_docs)
