"""Errors of Hugging Face interop: each names the problem and the fix (exit code 2 on the CLI)."""

from __future__ import annotations

from lina.errors import LinaError


class HFModelError(LinaError):
    """A checkpoint or model lina cannot use as given. Exit code 2."""

    exit_code = 2


def unsupported(model_type: str) -> HFModelError:
    from lina.hf.families import FAMILIES

    return HFModelError(
        f"unsupported architecture {model_type!r}: lina swaps the MoE blocks of "
        f"{', '.join(sorted(FAMILIES))}. Fix: use a checkpoint of one of those families"
    )
