"""Generation requests: one JSON object per line, ``{"prompt": ...}`` with optional ``id`` and
``max_new_tokens``. Text is the model's byte tokens (UTF-8)."""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

from lina.errors import ConfigError


@dataclass
class Request:
    """One prompt: ``tokens`` are its byte tokens; ``index`` its line order (seeds sampling)."""

    id: str
    prompt: str
    tokens: list[int]
    max_new_tokens: int
    index: int


def encode(text: str) -> list[int]:
    return list(text.encode("utf-8"))


def decode(tokens: list[int]) -> str:
    return bytes(tokens).decode("utf-8", errors="replace")


def read_requests(
    path: str | Path, max_new_tokens: int, context: int, encode_text: Callable[[str], list[int]] = encode
) -> list[Request]:
    """Parse and check a prompts file: every problem names its line and the fix (ConfigError).

    Args:
        max_new_tokens: the default for lines without their own.
        context: the model's context length; prompt + new tokens must fit in it.
        encode_text: text -> token ids (lina's byte tokens by default; a checkpoint's tokenizer).
    """
    p = Path(path)
    if not p.is_file():
        raise ConfigError(
            "prompts", f"file {str(p)!r} does not exist", 'pass a .jsonl file with one {"prompt": ...} per line'
        )
    out: list[Request] = []
    for number, line in enumerate(p.read_text(encoding="utf-8", errors="replace").splitlines(), start=1):
        if not line.strip():
            continue
        where = f"{p}:{number}"
        try:
            row = json.loads(line)
        except json.JSONDecodeError as err:
            raise ConfigError(
                "prompts", f"{where} is not JSON ({err.msg})", 'write one object per line, e.g. {"prompt": "def f("}'
            ) from None
        if not isinstance(row, dict) or not isinstance(row.get("prompt"), str) or not row["prompt"]:
            raise ConfigError(
                "prompts", f'{where} has no non-empty "prompt" string', 'write e.g. {"id": "a", "prompt": "def f("}'
            )
        new = row.get("max_new_tokens", max_new_tokens)
        if not isinstance(new, int) or isinstance(new, bool) or new < 1:
            raise ConfigError("prompts", f"{where}: max_new_tokens {new!r} must be an integer >= 1", "give 1 or more")
        tokens = encode_text(row["prompt"])
        if len(tokens) + new > context:
            raise ConfigError(
                "prompts",
                f"{where}: prompt of {len(tokens)} tokens + {new} new exceeds the model's context of {context}",
                f"shorten the prompt or ask for at most {max(context - len(tokens), 0)} new tokens",
            )
        out.append(Request(str(row.get("id", number)), row["prompt"], tokens, new, len(out)))
    if not out:
        raise ConfigError("prompts", f"{p} holds no prompt", 'write one {"prompt": ...} object per line')
    return out
