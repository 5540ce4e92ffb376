"""A checkpoint folder with its own tokenizer: lina's corpus is re-tokenized with it (and a
folder without one keeps byte tokens); a tokenizer whose ids overflow the model is refused."""

import pytest
import torch

pytest.importorskip("transformers")

from lina.data.corpus import Corpus  # noqa: E402
from lina.hf.errors import HFModelError  # noqa: E402
from lina.hf.tiny import make_tiny  # noqa: E402
from lina.hf.tokens import corpus_for  # noqa: E402

TEXT = "def add(x, y):\n    return x + y\n" * 50


def _save_tokenizer(folder, vocab_extra=0):
    """A word-level tokenizer built here from a fixed vocabulary (nothing downloaded)."""
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    words = ["[UNK]", "def", "add", "(", "x", ",", "y", "):", "return", "+"]
    vocab = {w: i for i, w in enumerate(words)}
    if vocab_extra:
        vocab["add"] = 255 + vocab_extra
    tok = Tokenizer(models.WordLevel(vocab, unk_token="[UNK]"))
    tok.pre_tokenizer = pre_tokenizers.Whitespace()
    PreTrainedTokenizerFast(tokenizer_object=tok, unk_token="[UNK]").save_pretrained(folder)


def _corpus():
    data = torch.frombuffer(bytearray(TEXT.encode()), dtype=torch.uint8)
    return Corpus(data.clone(), data.clone(), "test text", 1)


def test_corpus_is_retokenized_with_the_folders_tokenizer(tmp_path):
    folder = make_tiny("qwen3_moe", tmp_path, seed=0)
    plain = corpus_for(folder, _corpus(), 256)
    assert plain.train.dtype == torch.uint8  # no tokenizer: byte tokens
    _save_tokenizer(folder)
    tokenized = corpus_for(folder, _corpus(), 256)
    assert tokenized.train[:11].tolist() == [1, 2, 3, 4, 5, 6, 7, 8, 4, 9, 6]  # def add ( x , y ): return x + y
    assert tokenized.train.numel() == 11 * 50 and "tokens" in tokenized.describe()


def test_tokenizer_beyond_the_vocabulary_is_refused(tmp_path):
    folder = make_tiny("qwen3_moe", tmp_path, seed=0)
    _save_tokenizer(folder, vocab_extra=10)
    with pytest.raises(HFModelError, match="produces id 265, beyond the model's 256 tokens"):
        corpus_for(folder, _corpus(), 256)


@pytest.mark.slow
def test_train_uses_the_tokenizer(tmp_path, capfd):
    from lina.cli import main

    folder = make_tiny("mixtral", tmp_path / "ckpt", seed=0)
    _save_tokenizer(folder)
    corpus = tmp_path / "corpus.txt"
    corpus.write_text(TEXT * 4)
    cfg = tmp_path / "small.toml"
    cfg.write_text(
        "eval_every = 2\neval_batches = 1\nbatch_size = 2\n[model]\nseq_len = 16\n[output]\ncheckpoint_every = 2\n"
    )
    assert (
        main(
            [
                "train",
                "--config",
                str(cfg),
                "--hf-model",
                str(folder),
                "--workers",
                "2",
                "--steps",
                "2",
                "--corpus",
                str(corpus),
                "--out",
                str(tmp_path / "run"),
            ]
        )
        == 0
    )
    out = capfd.readouterr().out
    assert "corpus.txt (" in out and " of ckpt): 1 files" in out and " M val tokens" in out
