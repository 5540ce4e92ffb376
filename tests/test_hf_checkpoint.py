"""Checkpoint folders: load with only this rank's experts, save back, ``from_pretrained`` of the
saved folder gives the same logits; every bad input names its problem and fix."""

import json

import pytest
import torch

pytest.importorskip("transformers")

from hf_helpers import ATOL, FAMILIES, batch  # noqa: E402
from lina.comm.groups import ParallelGroups  # noqa: E402
from lina.hf.checkpoint import load_pretrained, save_pretrained  # noqa: E402
from lina.hf.errors import HFModelError  # noqa: E402
from lina.hf.tiny import make_tiny  # noqa: E402


def _hf_logits(folder, ids):
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(str(folder)).eval()
    with torch.no_grad():
        return model(ids).logits


def _logits(handle, ids):
    with torch.no_grad():
        return handle.model(ids).logits


@pytest.mark.parametrize("family", FAMILIES)
def test_load_then_save_round_trip(family, tmp_path):
    src = make_tiny(family, tmp_path / "src", seed=2)
    ids, _ = batch(7)
    ref = _hf_logits(src, ids)
    handle = load_pretrained(src)
    assert not any(p.is_meta for p in handle.model.parameters())
    torch.testing.assert_close(_logits(handle, ids), ref, atol=ATOL, rtol=0)
    out = save_pretrained(handle, tmp_path / "out")
    assert sorted(p.name for p in out.iterdir()) == ["config.json", "model.safetensors"]
    assert torch.equal(_hf_logits(out, ids), ref)  # the weights went back unchanged


def test_sharded_checkpoint(tmp_path):
    src = make_tiny("qwen2_moe", tmp_path / "src", seed=3, max_shard_size="40KB")
    assert (src / "model.safetensors.index.json").is_file()
    ids, _ = batch(8)
    torch.testing.assert_close(_logits(load_pretrained(src), ids), _hf_logits(src, ids), atol=ATOL, rtol=0)


def test_sharded_checkpoint_saves_back_sharded(tmp_path):
    from lina.hf.checkpoint import source_shard_bytes

    src = make_tiny("mixtral", tmp_path / "src", seed=3, max_shard_size="40KB")
    limit = source_shard_bytes(src)
    assert limit is not None and source_shard_bytes(make_tiny("mixtral", tmp_path / "one", seed=3)) is None
    ids, _ = batch(9)
    ref = _hf_logits(src, ids)
    out = save_pretrained(load_pretrained(src), tmp_path / "out", max_shard_bytes=limit)
    index = json.loads((out / "model.safetensors.index.json").read_text())
    shards = sorted(set(index["weight_map"].values()))
    assert len(shards) > 1 and not (out / "model.safetensors").exists()
    assert all((out / f).stat().st_size <= limit + 4096 for f in shards)  # + the file's own header
    assert torch.equal(_hf_logits(out, ids), ref)


def test_fused_expert_checkpoint_reads_only_some_rows(tmp_path):
    """A checkpoint with experts stored fused (as transformers holds them in memory)."""
    from safetensors.torch import save_file

    from lina.hf.tiny import tiny_model

    model = tiny_model("mixtral", seed=4)
    (tmp_path / "fused").mkdir()
    model.config.save_pretrained(tmp_path / "fused")
    save_file({k: v.contiguous() for k, v in model.state_dict().items()}, str(tmp_path / "fused" / "model.safetensors"))
    ids, _ = batch(9)
    with torch.no_grad():
        ref = model(ids).logits
    torch.testing.assert_close(_logits(load_pretrained(tmp_path / "fused"), ids), ref, atol=ATOL, rtol=0)


def test_unsupported_architecture(tmp_path):
    from transformers import LlamaConfig, LlamaForCausalLM

    LlamaForCausalLM(
        LlamaConfig(
            vocab_size=64,
            hidden_size=16,
            intermediate_size=32,
            num_hidden_layers=1,
            num_attention_heads=2,
            num_key_value_heads=2,
        )
    ).save_pretrained(tmp_path)
    with pytest.raises(HFModelError, match="unsupported architecture 'llama'.*Fix: use a checkpoint of one of"):
        load_pretrained(tmp_path)


def test_folder_without_weights(tmp_path):
    src = make_tiny("olmoe", tmp_path, seed=0)
    (src / "model.safetensors").unlink()
    with pytest.raises(HFModelError, match="holds no safetensors weights.*Fix: write the model with save_pretrained"):
        load_pretrained(src)
    (src / "pytorch_model.bin").write_bytes(b"x")
    with pytest.raises(HFModelError, match=r"PyTorch weights pytorch_model.bin.*safe_serialization=True"):
        load_pretrained(src)
    with pytest.raises(HFModelError, match="does not exist"):
        load_pretrained(tmp_path / "nowhere")


@pytest.mark.parametrize("damage", ["garbage", "truncated"])
def test_corrupt_safetensors(tmp_path, damage):
    src = make_tiny("qwen3_moe", tmp_path, seed=0)
    path = src / "model.safetensors"
    data = path.read_bytes()
    path.write_bytes(b"\x07" * 64 if damage == "garbage" else data[: len(data) // 2])
    with pytest.raises(HFModelError, match="corrupt safetensors .*Fix: re-save or re-copy the checkpoint"):
        load_pretrained(src)


def test_experts_not_divisible_by_ep_size(tmp_path):
    src = make_tiny("mixtral", tmp_path, seed=0)
    three = ParallelGroups(rank=0, world_size=3, ep_size=3, ep_group=None, dp_group=None, expert_dp_group=None)
    with pytest.raises(HFModelError, match="8 experts cannot be split evenly over an expert-parallel group of 3"):
        load_pretrained(src, three)


def test_config_json_is_read_before_weights(tmp_path):
    src = make_tiny("mixtral", tmp_path, seed=0)
    cfg = json.loads((src / "config.json").read_text())
    cfg["model_type"] = "gpt2"
    (src / "config.json").write_text(json.dumps(cfg))
    with pytest.raises(HFModelError, match="unsupported architecture 'gpt2'"):
        load_pretrained(src)


def _ep_rank(rank, world, src, out):
    from lina.comm.groups import build_groups

    handle = load_pretrained(src, build_groups(world, 60.0))
    ids, _ = batch(20 + rank)
    logits = _logits(handle, ids)
    expert_keys = sorted(k for k in handle.keys_read if ".experts." in k)
    save_pretrained(handle, out)
    return {"logits": logits, "expert_keys": expert_keys, "experts": handle.layers[0].experts.global_ids}


@pytest.mark.slow
@pytest.mark.parametrize("family", ["mixtral", "deepseek_v3"])
def test_expert_parallel_load_reads_own_experts_and_saves_all(family, tmp_path):
    from lina.testing.multiproc import run_ranks

    src = make_tiny(family, tmp_path / "src", seed=5)
    results = run_ranks(_ep_rank, 2, str(src), str(tmp_path / "out"), timeout_s=120)
    for rank, res in enumerate(results):
        ids, _ = batch(20 + rank)
        torch.testing.assert_close(res["logits"], _hf_logits(src, ids), atol=ATOL, rtol=0)
        assert res["experts"] == list(range(4 * rank, 4 * rank + 4))
        read = {int(k.split(".experts.")[1].split(".")[0]) for k in res["expert_keys"]}
        assert read == set(res["experts"])  # no other rank's expert was ever read
        assert torch.equal(_hf_logits(tmp_path / "out", ids), _hf_logits(src, ids))
