"""A trained model in one process and one folder: read from a run's checkpoint, written as
safetensors.

``lina export`` writes ``DIR/model.safetensors`` (the single-process model's ``state_dict``: every
MoE layer's experts stacked by global id, e.g. ``blocks.0.ffn.experts.w1 [E, d_model, d_ff]``),
``DIR/config.json`` (``{"format": "lina-moe-gpt", "model": <ModelConfig>, "source": ...,
"provenance": ...}``). Nothing in it is pickled; ``lina infer --model DIR`` reads it, as it reads a
run's folder.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from lina.config import ModelConfig
from lina.errors import ConfigError, LinaError
from lina.train import checkpoint
from lina.train.checkpoint_state import apply_state, template

EXPORT_FORMAT = "lina-moe-gpt"


def _safetensors():
    try:
        import safetensors.torch as st
    except ModuleNotFoundError:
        raise LinaError(
            "writing or reading safetensors needs the safetensors package. Fix: pip install 'lina[export]'"
        ) from None
    return st


def model_from_run(run_dir: str | Path):
    """The model of a ``lina train`` output folder's latest checkpoint, in one process (every
    expert on it), and the checkpoint folder it came from."""
    from lina.models.gpt import MoEGPT

    run = Path(run_dir)
    if not (run / "checkpoints").is_dir():
        raise ConfigError(
            "model", f"{run} has no checkpoints/ folder", "point at the --out folder of a `lina train` run"
        )
    folder, meta = checkpoint.resume_point(run / "checkpoints")
    try:
        cfg = ModelConfig(**meta["model"])
    except TypeError as err:
        raise checkpoint.CheckpointError(
            folder, f"its model settings do not fit this lina ({err})", "export with the lina version that trained it"
        ) from None
    model = MoEGPT(cfg)
    loaded = checkpoint.load(folder, template(model, False, None))
    apply_state(model, None, loaded, None)
    model.eval()
    return model, folder


def export_model(run_dir: str | Path, out_dir: str | Path, provenance: dict[str, Any] | None = None) -> list[Path]:
    """Write the model of ``run_dir`` to ``out_dir`` (see the module docstring); returns the files."""
    st = _safetensors()
    model, folder = model_from_run(run_dir)
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    tensors = {name: t.detach().contiguous().clone() for name, t in model.state_dict().items()}
    weights = out / "model.safetensors"
    st.save_file(tensors, str(weights), metadata={"format": EXPORT_FORMAT})
    config = out / "config.json"
    config.write_text(
        json.dumps(
            {
                "format": EXPORT_FORMAT,
                "model": model.cfg.__dict__,
                "source": str(folder.resolve()),
                "step": checkpoint.read_meta(folder)["step"],
                "provenance": provenance,
            },
            indent=1,
        )
    )
    return [weights, config]


def is_export(folder: str | Path) -> bool:
    return (Path(folder) / "model.safetensors").is_file() and (Path(folder) / "config.json").is_file()


def load_exported(folder: str | Path):
    """The model written by :func:`export_model` (single process)."""
    from lina.models.gpt import MoEGPT

    st = _safetensors()
    folder = Path(folder)
    try:
        config = json.loads((folder / "config.json").read_text())
        cfg = ModelConfig(**config["model"])
    except (ValueError, KeyError, TypeError) as err:
        raise ConfigError(
            "model", f"{folder / 'config.json'} is not a lina export ({err})", "export again with `lina export`"
        ) from None
    model = MoEGPT(cfg)
    try:
        model.load_state_dict(st.load_file(str(folder / "model.safetensors")))
    except (RuntimeError, OSError, ValueError) as err:
        first = str(err).splitlines()[0] if str(err) else type(err).__name__
        raise ConfigError(
            "model",
            f"{folder / 'model.safetensors'} does not fit its config.json ({first})",
            "export again with `lina export`",
        ) from None
    model.eval()
    return model
