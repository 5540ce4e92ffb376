"""A checkpoint's own tokenizer for lina's corpus: when the folder has one, the corpus text is
re-tokenized with it; without one, lina's byte tokens (0-255) are used as they are."""

from __future__ import annotations

from pathlib import Path

import torch

from lina.data.corpus import Corpus
from lina.hf.errors import HFModelError

TOKENIZER_FILES = ("tokenizer.json", "tokenizer.model", "vocab.json")


def has_tokenizer(folder: str | Path) -> bool:
    return any((Path(folder) / name).is_file() for name in TOKENIZER_FILES)


class TokenizedCorpus(Corpus):
    """A :class:`Corpus` whose splits hold a tokenizer's ids (int32) instead of bytes."""

    def describe(self) -> str:
        return (
            f"{self.source}: {self.files} files, {self.train.numel() / 1e6:.2f} M train / "
            f"{self.val.numel() / 1e6:.2f} M val tokens"
        )


def _encode(tokenizer, data: torch.Tensor) -> torch.Tensor:
    text = data.numpy().tobytes().decode("utf-8", errors="replace")
    return torch.tensor(tokenizer(text, add_special_tokens=False)["input_ids"], dtype=torch.int32)


def corpus_for(folder: str | Path, corpus: Corpus, vocab_size: int) -> Corpus:
    """``corpus`` re-tokenized with the tokenizer in ``folder`` when it has one, else unchanged.
    Raises :class:`HFModelError` when the tokenizer's ids do not fit the model's vocabulary."""
    if not has_tokenizer(folder):
        return corpus
    from lina.hf.families import require_transformers

    tokenizer = require_transformers().AutoTokenizer.from_pretrained(str(folder))
    train, val = _encode(tokenizer, corpus.train), _encode(tokenizer, corpus.val)
    top = int(max(train.max(), val.max())) if train.numel() and val.numel() else 0
    if top >= vocab_size:
        raise HFModelError(
            f"the tokenizer in {folder} produces id {top}, beyond the model's {vocab_size} tokens. "
            "Fix: use the tokenizer the checkpoint was trained with"
        )
    return TokenizedCorpus(
        train, val, f"{corpus.source} ({type(tokenizer).__name__} of {Path(folder).name})", corpus.files
    )
