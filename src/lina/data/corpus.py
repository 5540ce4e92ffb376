"""Training text: by default the Python standard library's own source files (real text that is
always present), split into train / validation by file; or a user's text file or folder.
Tokenized at the byte level (vocabulary 256)."""

from __future__ import annotations

import hashlib
import sysconfig
from dataclasses import dataclass
from pathlib import Path

import torch

from lina.errors import ConfigError

VOCAB_SIZE = 256
TEXT_SUFFIXES = (".py", ".txt", ".md", ".rst", ".json", ".toml", ".c", ".h", ".cfg", ".ini")


@dataclass
class Corpus:
    """Byte tokens of the train and validation splits (``uint8`` tensors) and their source."""

    train: torch.Tensor
    val: torch.Tensor
    source: str
    files: int

    def describe(self) -> str:
        return (
            f"{self.source}: {self.files} files, {self.train.numel() / 1e6:.2f} M train / "
            f"{self.val.numel() / 1e6:.2f} M val byte tokens"
        )


def stdlib_root() -> Path:
    return Path(sysconfig.get_paths()["stdlib"])


def _is_validation(path: Path) -> bool:
    """About 1 file in 10 goes to validation, chosen by a stable hash of its name."""
    return hashlib.sha1(path.name.encode()).digest()[0] % 10 == 0


def _list_files(root: Path, default: bool) -> list[Path]:
    if root.is_file():
        return [root]
    if default:
        files = [p for p in root.glob("*.py")] + [p for p in root.glob("*/*.py") if "test" not in p.parts[-2]]
    else:
        files = [p for p in root.rglob("*") if p.is_file() and p.suffix in TEXT_SUFFIXES]
    return sorted(files)


def load_corpus(path: str = "", max_mb: float = 3.0) -> Corpus:
    """Read up to ``max_mb`` MB of text, split by file (a single file is split 90/10 by position).

    Args:
        path: a text file or folder; "" for the Python standard library's sources.
    """
    default = not path
    root = stdlib_root() if default else Path(path)
    if not root.exists():
        raise ConfigError("corpus", f"path {str(root)!r} does not exist", "pass an existing text file or folder")
    files = _list_files(root, default)
    if not files:
        raise ConfigError(
            "corpus",
            f"no text files ({', '.join(TEXT_SUFFIXES)}) under {root}",
            "pass a folder with text files or a single text file",
        )
    budget = int(max_mb * 1e6)
    train_parts: list[bytes] = []
    val_parts: list[bytes] = []
    used = 0
    for f in files:
        try:
            data = f.read_bytes()
        except OSError:
            continue
        if used >= budget:
            break
        data = data[: budget - used]
        used += len(data)
        (val_parts if _is_validation(f) and len(files) > 1 else train_parts).append(data)
    if len(files) == 1:
        data = train_parts[0]
        cut = int(len(data) * 0.9)
        train_parts, val_parts = [data[:cut]], [data[cut:]]
    train = torch.frombuffer(bytearray(b"\n".join(train_parts)), dtype=torch.uint8).clone()
    val = torch.frombuffer(bytearray(b"\n".join(val_parts)), dtype=torch.uint8).clone()
    source = "python-stdlib" if default else str(root)
    return Corpus(train, val, source, len(files))


def sample_batch(
    tokens: torch.Tensor, batch_size: int, seq_len: int, seed: int, step: int, rank: int
) -> tuple[torch.Tensor, torch.Tensor]:
    """Random windows of the token stream, a pure function of (seed, step, rank) so that a resumed
    run sees the same data.

    Returns:
        (inputs LongTensor[B, S], targets LongTensor[B, S]) with targets shifted by one.
    """
    n = tokens.numel() - seq_len - 1
    if n <= 0:
        raise ConfigError(
            "corpus",
            f"only {tokens.numel()} tokens, fewer than seq_len + 1 = {seq_len + 1}",
            "use a larger corpus or a smaller model.seq_len",
        )
    gen = torch.Generator().manual_seed(seed * 1_000_003 + step * 997 + rank)
    starts = torch.randint(0, n, (batch_size,), generator=gen)
    offsets = torch.arange(seq_len + 1)
    windows = tokens[starts[:, None] + offsets].long()
    return windows[:, :-1], windows[:, 1:]


def sample_sequences(
    tokens: torch.Tensor, seq_len: int, seed: int, step: int, first: int, count: int
) -> tuple[torch.Tensor, torch.Tensor]:
    """Sequences ``first .. first + count - 1`` of step ``step``'s global batch: window i starts at
    a pure function of (seed, step, i), so the global batch of a step is the same however it is
    split over ranks (rank r of a run with B sequences per rank takes ``first = r * B``) and a
    run resumed on another worker count with the same global batch sees the same data.

    Returns:
        (inputs LongTensor[count, S], targets LongTensor[count, S]) with targets shifted by one.
    """
    n = tokens.numel() - seq_len - 1
    if n <= 0:
        raise ConfigError(
            "corpus",
            f"only {tokens.numel()} tokens, fewer than seq_len + 1 = {seq_len + 1}",
            "use a larger corpus or a smaller model.seq_len",
        )
    seeds = [((seed * 1_000_003 + step) * 1_000_033 + i) % 2**63 for i in range(first, first + count)]
    starts = torch.tensor(
        [int(torch.randint(0, n, (), generator=torch.Generator().manual_seed(s))) for s in seeds], dtype=torch.long
    )
    windows = tokens[starts[:, None] + torch.arange(seq_len + 1)].long()
    return windows[:, :-1], windows[:, 1:]
