"""Checkpoint files: atomic, checked before loading, never run code, exportable.

Single process (DCP without a process group), so these run in seconds.
"""

import json
import os
import pickle
from pathlib import Path

import pytest
import torch

from lina.config import ModelConfig
from lina.errors import ConfigError, LinaError
from lina.models.gpt import MoEGPT
from lina.train import checkpoint
from lina.train.checkpoint_state import apply_state, flat_state, template

CFG = ModelConfig(d_model=16, n_layers=2, n_heads=2, d_ff=32, seq_len=16, experts=4)


class _RunsCode:
    def __init__(self, marker: str):
        self.marker = marker

    def __reduce__(self):
        return (os.system, (f"touch {self.marker}",))


def _trained(seed: int = 0) -> tuple[MoEGPT, torch.optim.Optimizer]:
    torch.manual_seed(seed)
    model = MoEGPT(CFG)
    opt = torch.optim.AdamW(model.parameters(), lr=1e-2)
    x = torch.randint(0, CFG.vocab_size, (2, CFG.seq_len))
    model.loss(x, x)[0].backward()
    opt.step()
    return model, opt


def _meta() -> dict:
    return {"world_size": 1, "ep_size": 1, "model": CFG.__dict__.copy(), "packing": {"mode": "off"}}


def _save(root: Path, step: int, seed: int = 0) -> MoEGPT:
    model, opt = _trained(seed)
    checkpoint.save(root, step, flat_state(model, opt, 0), _meta())
    return model


def _load(root: Path) -> MoEGPT:
    folder, _ = checkpoint.resume_point(root)
    model = MoEGPT(CFG)
    opt = torch.optim.AdamW(model.parameters(), lr=1e-2)
    apply_state(model, opt, checkpoint.load(folder, template(model, True, "rng/0")), "rng/0")
    return model


def _same(a: MoEGPT, b: MoEGPT) -> bool:
    sa, sb = a.state_dict(), b.state_dict()
    return sa.keys() == sb.keys() and all(torch.equal(sa[k], sb[k]) for k in sa)


def test_round_trip_and_latest_pointer(tmp_path):
    root = tmp_path / "checkpoints"
    _save(root, 1, seed=1)
    model = _save(root, 2, seed=2)
    assert (root / "latest").read_text().strip() == "step-0000002"
    assert _same(_load(root), model)
    meta = json.loads((root / "step-0000002" / "meta.json").read_text())
    assert meta["format"] == "lina-dcp" and meta["step"] == 2
    assert set(meta["files"]) == {p.name for p in (root / "step-0000002").iterdir() if p.name != "meta.json"}


def test_a_crash_during_a_write_leaves_the_previous_checkpoint_loadable(tmp_path, monkeypatch):
    import torch.distributed.checkpoint.filesystem as fs

    root = tmp_path / "checkpoints"
    first = _save(root, 1, seed=1)
    real = fs._write_item
    calls = []

    def dies_midway(*args, **kwargs):
        calls.append(1)
        if len(calls) > 3:
            raise OSError("disk full (simulated)")
        return real(*args, **kwargs)

    monkeypatch.setattr(fs, "_write_item", dies_midway)
    with pytest.raises(LinaError, match="disk full.*still points at the previous"):
        _save(root, 2, seed=2)
    monkeypatch.setattr(fs, "_write_item", real)
    assert (root / "latest").read_text().strip() == "step-0000001"
    assert not (root / "step-0000002").exists() and (root / ".step-0000002.tmp").exists()
    assert _same(_load(root), first)
    _save(root, 3, seed=3)  # the next write clears the debris
    assert not list(root.glob(".step-*.tmp"))


def test_a_truncated_file_is_named_and_nothing_is_loaded(tmp_path):
    root = tmp_path / "checkpoints"
    _save(root, 1)
    data = root / "step-0000001" / "__0_0.distcp"
    data.write_bytes(data.read_bytes()[: data.stat().st_size // 2])
    with pytest.raises(checkpoint.CheckpointError) as info:
        checkpoint.resume_point(root)
    assert "__0_0.distcp" in str(info.value) and "truncated" in str(info.value) and "Fix:" in str(info.value)
    assert info.value.exit_code == 2


def _rehash(folder: Path) -> None:
    """Make meta.json agree with the files, as an attacker who rewrites both would."""
    meta = json.loads((folder / "meta.json").read_text())
    meta["files"] = {
        p.name: {"bytes": p.stat().st_size, "sha256": checkpoint._sha256(p)}
        for p in folder.iterdir()
        if p.name != "meta.json"
    }
    (folder / "meta.json").write_text(json.dumps(meta))


@pytest.mark.parametrize("victim", [".metadata", "__0_0.distcp"])
@pytest.mark.parametrize("rehash", [False, True])
def test_a_file_replaced_by_a_code_running_pickle_never_runs(tmp_path, victim, rehash):
    root = tmp_path / "checkpoints"
    _save(root, 1)
    folder = root / "step-0000001"
    marker = tmp_path / "code-ran"
    (folder / victim).write_bytes(pickle.dumps(_RunsCode(str(marker))))
    if rehash:
        _rehash(folder)
    with pytest.raises(checkpoint.CheckpointError) as info:
        _load(root)
    assert not marker.exists(), "loading the checkpoint ran code from it"
    assert "Fix:" in str(info.value)


def test_the_previous_format_gets_a_clear_message(tmp_path):
    root = tmp_path / "checkpoints"
    (root / "step-0000004").mkdir(parents=True)
    torch.save({"model": {}}, root / "step-0000004" / "rank-0.pt")
    (root / "latest").write_text("step-0000004\n")
    with pytest.raises(ConfigError, match="earlier lina"):
        checkpoint.resume_point(root)


def test_export_writes_one_plain_folder(tmp_path):
    pytest.importorskip("safetensors")
    from safetensors.torch import load_file

    from lina.cli import main
    from lina.train.export import load_exported

    run = tmp_path / "run"
    model = _save(run / "checkpoints", 5)
    assert main(["export", "--model", str(run), "--out", str(tmp_path / "export")]) == 0
    files = sorted(p.name for p in (tmp_path / "export").iterdir())
    assert files == ["config.json", "model.safetensors"]
    tensors = load_file(str(tmp_path / "export" / "model.safetensors"))
    assert tensors["blocks.0.ffn.experts.w1"].shape == (CFG.experts, CFG.d_model, CFG.d_ff)
    config = json.loads((tmp_path / "export" / "config.json").read_text())
    assert config["step"] == 5 and config["model"]["experts"] == CFG.experts and "provenance" in config
    assert _same(load_exported(tmp_path / "export"), model)
