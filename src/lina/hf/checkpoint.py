"""Hugging Face checkpoint folders (``config.json`` + safetensors, one file or sharded with an
index): load one with only this rank's experts built, save one back with the experts gathered
from their ranks, in the per-expert layout transformers writes, so that ``from_pretrained`` of
the saved folder gives the same model."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import torch
import torch.distributed as dist
from torch import nn

from lina.hf.blocks import block_shape, checkpoint_tensors, new_layer, state_from_checkpoint
from lina.hf.errors import HFModelError, unsupported
from lina.hf.families import FAMILIES, require_transformers
from lina.hf.swap import ExpertParallel, make_comm, match_dtypes, resolve_groups, sparse_blocks
from lina.moe.comm_context import ExpertComm
from lina.moe.layer import MoELayer
from lina.obs.timeline import Timeline

SINGLE = "model.safetensors"
INDEX = "model.safetensors.index.json"


class CheckpointReader:
    """Tensors of a checkpoint folder, read one at a time (a sliced read for fused experts).

    ``keys_read`` records every key read, so callers can check what a rank touched.
    """

    def __init__(self, folder: str | Path):
        from safetensors import SafetensorError, safe_open

        self.folder = Path(folder)
        self._error = SafetensorError
        if not self.folder.is_dir():
            raise HFModelError(
                f"checkpoint folder {str(self.folder)!r} does not exist. "
                "Fix: pass a folder written by save_pretrained (config.json + safetensors)"
            )
        if not (self.folder / "config.json").is_file():
            raise HFModelError(f"{self.folder} has no config.json. Fix: pass a folder written by save_pretrained")
        if (self.folder / INDEX).is_file():
            try:
                weight_map = json.loads((self.folder / INDEX).read_text())["weight_map"]
            except (ValueError, KeyError) as err:
                raise HFModelError(
                    f"{self.folder / INDEX} is not a valid safetensors index ({err}). "
                    "Fix: re-save the checkpoint with save_pretrained"
                ) from None
            files = sorted(set(weight_map.values()))
        elif (self.folder / SINGLE).is_file():
            files, weight_map = [SINGLE], None
        else:
            bins = sorted(p.name for p in self.folder.glob("*.bin"))
            hint = (
                (
                    f" (it holds PyTorch weights {', '.join(bins)}: load them with transformers and "
                    "save_pretrained(folder, safe_serialization=True))"
                )
                if bins
                else ""
            )
            raise HFModelError(
                f"{self.folder} holds no safetensors weights ({SINGLE} or {INDEX}){hint}. "
                "Fix: write the model with save_pretrained"
            )
        self._handles: dict[str, Any] = {}
        self._where: dict[str, str] = {}
        for name in files:
            path = self.folder / name
            if not path.is_file():
                raise HFModelError(f"{path} is listed in {INDEX} but missing. Fix: copy the complete checkpoint")
            try:
                handle = safe_open(str(path), framework="pt")
                keys = list(handle.keys())
            except (self._error, OSError, ValueError) as err:
                raise HFModelError(
                    f"corrupt safetensors file {path}: {err}. Fix: re-save or re-copy the checkpoint"
                ) from None
            self._handles[name] = handle
            for key in keys:
                self._where[key] = name
        if weight_map is not None:
            missing = [k for k in weight_map if k not in self._where]
            if missing:
                raise HFModelError(
                    f"{len(missing)} tensors of {INDEX} (e.g. {missing[0]!r}) are not in their files. "
                    "Fix: re-save the checkpoint"
                )
        self.keys_read: set[str] = set()

    def config(self) -> dict:
        try:
            return json.loads((self.folder / "config.json").read_text())
        except ValueError as err:
            raise HFModelError(
                f"{self.folder / 'config.json'} is not valid JSON ({err}). Fix: re-save the checkpoint"
            ) from None

    def has(self, key: str) -> bool:
        return key in self._where

    def _handle(self, key: str):
        if key not in self._where:
            raise HFModelError(
                f"tensor {key!r} is missing from {self.folder}. "
                "Fix: use a complete checkpoint of the architecture its config.json names"
            )
        self.keys_read.add(key)
        return self._handles[self._where[key]]

    def get(self, key: str) -> torch.Tensor:
        try:
            return self._handle(key).get_tensor(key)
        except (self._error, OSError, ValueError) as err:
            raise HFModelError(
                f"corrupt safetensors data for {key!r} in {self.folder}: {err}. Fix: re-save or re-copy the checkpoint"
            ) from None

    def get_rows(self, key: str, ids: list[int]) -> torch.Tensor:
        """Rows ``ids`` of a tensor (e.g. some experts of a fused ``[E, ...]`` weight), reading only
        those rows."""
        try:
            sl = self._handle(key).get_slice(key)
            return torch.stack([sl[i : i + 1][0] for i in ids])
        except (self._error, OSError, ValueError) as err:
            raise HFModelError(
                f"corrupt safetensors data for {key!r} in {self.folder}: {err}. Fix: re-save or re-copy the checkpoint"
            ) from None


def check_family(config: dict) -> str:
    model_type = config.get("model_type")
    if model_type not in FAMILIES:
        raise unsupported(str(model_type))
    return model_type


def load_pretrained(
    folder: str | Path,
    group: Any = None,
    policy: str | None = None,
    *,
    pipeline_chunks: int = 2,
    balance_loss_weight: float = 0.0,
    bias_update_rate: float = 0.0,
    grouped_mm: bool = False,
    timeline: Timeline | None = None,
    comm: ExpertComm | None = None,
    **policy_kwargs,
) -> ExpertParallel:
    """Build the model of a checkpoint folder with lina MoE layers holding only this rank's
    experts (other experts' tensors are never read). Arguments as :func:`lina.hf.swap.expert_parallel`;
    ``comm`` is an existing expert-parallel context for every MoE layer (a trainer's, whose hooks
    call its own policy; its group must be ``group``'s EP group).
    Returns the :class:`~lina.hf.swap.ExpertParallel` handle; the model is ``handle.model``
    (eval mode, the checkpoint's dtypes)."""
    transformers = require_transformers()
    reader = CheckpointReader(folder)
    check_family(reader.config())
    try:
        config = transformers.AutoConfig.from_pretrained(str(reader.folder))
    except (ValueError, KeyError, OSError) as err:
        raise HFModelError(
            f"transformers cannot read {reader.folder / 'config.json'} ({err}). "
            "Fix: re-save the checkpoint with this transformers version"
        ) from None
    family = FAMILIES[config.model_type]
    groups = resolve_groups(group)
    shape = block_shape(family, config, grouped_mm=grouped_mm, bias_update_rate=bias_update_rate)
    if shape.num_experts % groups.ep_size:
        raise HFModelError(
            f"{shape.num_experts} experts cannot be split evenly over an expert-parallel group of "
            f"{groups.ep_size} ranks. Fix: use an EP size that divides {shape.num_experts}"
        )
    with torch.device("meta"):
        model = getattr(transformers, family.model_class)(config)
    ref: list = []
    layer_comm, own_comm = comm, comm is None
    if own_comm:
        comm = make_comm(groups, ref, timeline)
        layer_comm = comm if groups.ep_group is not None else None
    layers, ids = [], []
    for index, (i, _block) in enumerate(sparse_blocks(model, family)):
        layer = new_layer(shape, layer_comm, balance_loss_weight)
        state = state_from_checkpoint(reader, family, i, shape.num_experts, layer.experts.global_ids)
        match_dtypes(layer, state["router.gate.weight"].dtype, state["experts.w1"].dtype)
        layer.load_state_dict(state)
        layer.layer_index = index
        model.model.layers[i].mlp = layer
        layers.append(layer)
        ids.append(i)
    _materialise(model, reader, config)
    model.eval()
    if own_comm and groups.ep_group is not None:
        comm.pipeline_chunks = pipeline_chunks  # a given comm keeps its owner's setting
    handle = ExpertParallel(model, family, groups, comm, layers, ids, pipeline_chunks)
    handle.keys_read = reader.keys_read
    ref.append(handle)
    if policy is not None:
        handle.set_policy(policy, **policy_kwargs)
    return handle


def _materialise(model: nn.Module, reader: CheckpointReader, config) -> None:
    """Replace the meta tensors of everything but the lina layers by the checkpoint's; rebuild the
    rotary embeddings (computed, not stored); tie the output head when the config says so."""
    for name, module in model.named_modules():
        if name.endswith("rotary_emb") and any(b.is_meta for b in module.buffers()):
            parent_name, _, child = name.rpartition(".")
            setattr(model.get_submodule(parent_name), child, type(module)(config=config))
    tied = bool(getattr(config, "tie_word_embeddings", False)) and not reader.has("lm_head.weight")
    lina_prefixes = tuple(n + "." for n, m in model.named_modules() if isinstance(m, MoELayer))
    for name, module in model.named_modules():
        if name.startswith(lina_prefixes) or isinstance(module, MoELayer):
            continue
        for pname, p in list(module._parameters.items()):
            if p is None or not p.is_meta:
                continue
            key = f"{name}.{pname}" if name else pname
            if tied and key == "lm_head.weight":
                continue
            module._parameters[pname] = nn.Parameter(reader.get(key), requires_grad=p.requires_grad)
        for bname, b in list(module._buffers.items()):
            if b is not None and b.is_meta:
                module._buffers[bname] = reader.get(f"{name}.{bname}" if name else bname)
    if tied:
        model.lm_head.weight = model.get_input_embeddings().weight


def gather_experts(layer: MoELayer, handle: ExpertParallel) -> dict[str, torch.Tensor]:
    """The layer's state dict with ``experts.w1`` / ``experts.w2`` of *every* expert, gathered over
    the layer's current EP group (a collective of that group; packing may have changed it)."""
    state = {k: v.detach() for k, v in layer.state_dict().items()}
    group = layer.comm.group
    if group is None:
        return state
    for name in ("experts.w1", "experts.w2"):
        local = state[name].contiguous()
        parts = [torch.empty_like(local) for _ in range(dist.get_world_size(group))]
        dist.all_gather(parts, local, group=group)
        state[name] = torch.cat(parts)
    return state


def source_shard_bytes(folder: str | Path) -> int | None:
    """The largest shard of a sharded checkpoint folder (``model.safetensors.index.json``), in
    bytes; None for a folder of one file (so that a model saves back in its source's format)."""
    folder = Path(folder)
    index = folder / INDEX
    if not index.is_file():
        return None
    files = set(json.loads(index.read_text()).get("weight_map", {}).values())
    return max(((folder / f).stat().st_size for f in files if (folder / f).is_file()), default=None)


def save_pretrained(
    handle: ExpertParallel,
    folder: str | Path,
    tokenizer_from: str | Path | None = None,
    max_shard_bytes: int | None = None,
) -> Path | None:
    """Write the model as a transformers checkpoint folder (config.json + safetensors, per-expert
    keys as transformers saves them), experts gathered from their ranks. Every rank calls it;
    global rank 0 writes (and copies the tokenizer files of ``tokenizer_from``, when given).
    ``max_shard_bytes``: None writes one ``model.safetensors``; a size writes shards of at most
    that many bytes (a tensor larger than it alone in its shard) with ``model.safetensors.index.json``,
    as ``save_pretrained(max_shard_size=...)`` does. Returns the folder on the writing rank, else None."""
    model, family = handle.model, handle.family
    out: dict[str, torch.Tensor] = {}
    prefixes = tuple(f"model.layers.{i}.mlp." for i in handle.layer_ids)
    for key, value in model.state_dict().items():
        if not key.startswith(prefixes):
            out[key] = value.detach()
    for layer, i in zip(handle.layers, handle.layer_ids):
        out.update(checkpoint_tensors(gather_experts(layer, handle), family, i, layer.num_experts))
    if getattr(model.config, "tie_word_embeddings", False):
        out.pop("lm_head.weight", None)
    written = None
    if handle.groups.rank == 0:
        folder = Path(folder)
        folder.mkdir(parents=True, exist_ok=True)
        model.config.save_pretrained(folder)
        _write_weights({k: v.cpu().contiguous() for k, v in out.items()}, folder, max_shard_bytes)
        if tokenizer_from is not None:
            _copy_tokenizer(Path(tokenizer_from), folder)
        written = folder
    if handle.groups.world_size > 1:
        dist.barrier()
    return written


def _write_weights(tensors: dict[str, torch.Tensor], folder: Path, max_shard_bytes: int | None) -> None:
    """``tensors`` as one safetensors file, or in key order as shards of at most
    ``max_shard_bytes`` each with the index transformers reads."""
    from safetensors.torch import save_file

    if max_shard_bytes is None:
        save_file(tensors, str(folder / SINGLE), metadata={"format": "pt"})
        return
    if max_shard_bytes <= 0:
        raise HFModelError(f"shard size {max_shard_bytes} bytes. Fix: give a positive size, or None for one file")
    shards: list[dict[str, torch.Tensor]] = [{}]
    size = 0
    for key, value in tensors.items():
        nbytes = value.numel() * value.element_size()
        if shards[-1] and size + nbytes > max_shard_bytes:
            shards.append({})
            size = 0
        shards[-1][key] = value
        size += nbytes
    weight_map = {}
    for i, shard in enumerate(shards, 1):
        name = f"model-{i:05d}-of-{len(shards):05d}.safetensors"
        save_file(shard, str(folder / name), metadata={"format": "pt"})
        weight_map |= dict.fromkeys(shard, name)
    total = sum(v.numel() * v.element_size() for v in tensors.values())
    (folder / INDEX).write_text(json.dumps({"metadata": {"total_size": total}, "weight_map": weight_map}, indent=2))


def _copy_tokenizer(src: Path, dst: Path) -> None:
    """Copy a checkpoint folder's tokenizer files (whatever the tokenizer saved beside its config)."""
    import shutil

    for p in src.iterdir():
        if p.is_file() and (
            p.name.startswith("tokenizer")
            or p.name in ("special_tokens_map.json", "vocab.json", "merges.txt", "generation_config.json")
        ):
            shutil.copy2(p, dst / p.name)
