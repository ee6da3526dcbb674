"""A tiny GPT-2 with a character tokenizer, built locally (random init, never a download)."""

from __future__ import annotations

import random
import string
from pathlib import Path

import torch

SPECIALS = ["<unk>", "<bos>", "<eos>", "<pad>"]
CHARS = list(string.ascii_lowercase + string.digits + " .,:()=_\n")
D_MODEL = 16
N_LAYER = 3


def make_tokenizer():
    from tokenizers import Regex, Tokenizer, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    vocab = {tok: i for i, tok in enumerate(SPECIALS + CHARS)}
    tok = Tokenizer(models.WordLevel(vocab, unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.Split(Regex("."), behavior="isolated")
    return PreTrainedTokenizerFast(
        tokenizer_object=tok,
        bos_token="<bos>",
        eos_token="<eos>",
        unk_token="<unk>",
        pad_token="<pad>",
    )


def make_model(seed: int = 0, dtype: torch.dtype = torch.float32):
    from transformers import GPT2Config, GPT2LMHeadModel

    config = GPT2Config(
        vocab_size=len(SPECIALS) + len(CHARS),
        n_positions=128,
        n_embd=D_MODEL,
        n_layer=N_LAYER,
        n_head=2,
        bos_token_id=1,
        eos_token_id=2,
        pad_token_id=3,
    )
    torch.manual_seed(seed)
    return GPT2LMHeadModel(config).to(dtype).eval()


def make_tiny_lm(folder: Path, seed: int = 0) -> Path:
    """Save the tiny model and tokenizer into ``folder`` (loadable by ``from_pretrained``)."""
    folder.mkdir(parents=True, exist_ok=True)
    make_model(seed).save_pretrained(str(folder))
    make_tokenizer().save_pretrained(str(folder))
    return folder


def make_corpus(folder: Path, n_docs: int = 12, seed: int = 0) -> list[Path]:
    """``n_docs`` small text files plus one .jsonl file of deterministic pseudo-code."""
    rng = random.Random(seed)
    words = ["def", "return", "value", "list", "sum", "for", "in", "range", "x", "y", "print"]
    folder.mkdir(parents=True, exist_ok=True)
    files = []
    for i in range(n_docs):
        text = " ".join(rng.choice(words) for _ in range(rng.randint(30, 60)))
        path = folder / f"doc{i:02d}.txt"
        path.write_text(text + ".\n")
        files.append(path)
    return files


if __name__ == "__main__":  # build the files for a subprocess test
    import sys

    make_tiny_lm(Path(sys.argv[1]))
    make_corpus(Path(sys.argv[2]))
