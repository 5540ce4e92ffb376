"""Packing changes nothing but speed: 4 ranks, 4 experts, dropless top-2, the ``lina`` policy with
pipelined all-to-all, 8 steps.

* A: no packing (1 expert per rank, EP size 4).
* B: packed by hand before step 3 (1 -> 2 experts per rank) and before step 6 (-> 4: pure data
  parallelism, no all-to-all left).
* C: ``packing = "2@3"`` through the config, with an expert-memory budget that fits both MoE layers
  at 1 expert per rank but only one at 2, so the change also offloads a layer; checkpoints after
  steps 1 (before the change) and 4 (after it).
* D, E: fresh trainers resumed from C's two checkpoints.

Tolerances: right after a move, parameters and AdamW state equal A's bit for bit (they are moved, not
recomputed). Afterwards an expert's gradient is summed over 2 EP groups and then allreduced instead
of summed in one matmul, so numbers differ by rounding: losses within 1e-5 relative, parameters and
moments within 1e-5 absolute. Resumed runs repeat C's losses exactly.
"""

import pytest
import torch

from lina.comm.groups import build_group_set
from lina.config import CommConfig, ModelConfig, PackingConfig, TrainConfig
from lina.data.corpus import load_corpus
from lina.moe.experts import PARAM_NAMES
from lina.testing.multiproc import run_ranks
from lina.train import checkpoint
from lina.train.resume import load_trainer, resume_layout, save_trainer
from lina.train.trainer import Trainer

pytestmark = pytest.mark.slow  # multi-process

STEPS = 8
REL_TOL = 1e-5
ATOL = 1e-5


def _cfg(packing: str = "off", memory_mb: float = 0.0) -> TrainConfig:
    return TrainConfig(
        model=ModelConfig(d_model=32, n_layers=2, n_heads=2, d_ff=64, seq_len=32, experts=4, top_k=2),
        workers=4,
        batch_size=4,
        policy="lina",
        comm=CommConfig(chunk_mb="0.05", pipeline_chunks=2),
        corpus_max_mb=0.3,
        packing=PackingConfig(mode=packing, max_expert_memory_mb=memory_mb),
    )


MEMORY_MB = 0.2  # one MoE layer's experts: 0.064 MB at 1 per rank, 0.128 MB at 2 (weights, grads, 2 moments)


def snapshot(trainer: Trainer) -> dict:
    """Every expert's weights and AdamW state by (layer, global id, parameter, what), and the dense
    parameters by name."""
    out = {}
    for i, layer in enumerate(trainer.model.moe_layers()):
        for name in PARAM_NAMES:
            p = getattr(layer.experts, name)
            state = trainer.optimizer.state.get(p, {})
            for j, e in enumerate(layer.experts.global_ids):
                out[(i, e, name, "w")] = p.detach()[j].clone()
                if state:
                    out[(i, e, name, "exp_avg")] = state["exp_avg"][j].clone()
                    out[(i, e, name, "exp_avg_sq")] = state["exp_avg_sq"][j].clone()
                    out[(i, e, name, "step")] = state["step"].clone()
    for n, p in trainer.model.named_parameters():
        if not getattr(p, "lina_expert", False):
            out[("dense", n)] = p.detach().clone()
    return out


def _run(trainer: Trainer, steps: range, before=None) -> list[float]:
    losses = []
    for s in steps:
        if before:
            before(s)
        losses.append(trainer.mean_over_ranks(trainer.train_step(s).loss))
    return losses


def _ranks(rank: int, world: int, ckpt_dir: str):
    from pathlib import Path

    torch.set_num_threads(1)
    groups = build_group_set([4, 2, 1], 60.0)
    corpus = load_corpus("", 0.3)
    out = {}

    a = Trainer(_cfg(), groups[4], corpus, group_set=groups)
    snaps_a = {}
    out["A"] = _run(a, range(STEPS), lambda s: snaps_a.__setitem__(s, snapshot(a)) if s in (3, 6) else None)
    snaps_a["end"] = snapshot(a)
    a.policy.close()

    b = Trainer(_cfg(), groups[4], corpus, group_set=groups)
    snaps_b = {}

    def repack_b(s):
        if s in (3, 6):
            b.repack({3: 2, 6: 1}[s])
            snaps_b[s] = snapshot(b)

    out["B"] = _run(b, range(STEPS), repack_b)
    snaps_b["end"] = snapshot(b)
    out["B_layout"] = (b.groups.ep_size, b.model.moe_layers()[0].experts.global_ids)
    b.policy.close()

    c = Trainer(_cfg("2@3", MEMORY_MB), groups[4], corpus, group_set=groups)
    root = Path(ckpt_dir)
    memory = {}

    def save_c(s):
        if s == 3:
            memory["before"] = c.expert_memory()
        if s in (2, 5):  # state after steps 1 and 4
            save_trainer(root / f"s{s - 1}", s - 1, c)

    out["C"] = _run(c, range(STEPS), save_c)
    memory["after"] = c.expert_memory()
    out["C_history"] = c.packing.history
    c.policy.close()

    for name, saved in (("D", 1), ("E", 4)):
        t = Trainer(_cfg("2@3", MEMORY_MB), groups[4], corpus, group_set=groups)
        folder, meta = checkpoint.resume_point(root / f"s{saved}")
        start = load_trainer(folder, meta, t, resume_layout(t.cfg, meta, 4))
        out[name] = _run(t, range(start, STEPS))
        t.policy.close()
    out["snaps"] = {"A": snaps_a, "B": snaps_b}
    out["memory"] = memory
    return out


def _merge(results: list[dict], run: str, when) -> dict:
    """One view over all ranks; replicas of an expert (and the dense parameters) must agree exactly."""
    merged = {}
    for res in results:
        for key, value in res["snaps"][run][when].items():
            if key in merged:
                assert torch.equal(merged[key], value), (run, when, key)
            merged[key] = value
    return merged


def test_packing_changes_nothing_but_the_layout(tmp_path):
    results = run_ranks(_ranks, 4, str(tmp_path), timeout_s=240)
    r0 = results[0]
    a, b, c = r0["A"], r0["B"], r0["C"]
    assert a[-1] < a[0]
    assert b[:3] == a[:3] and c[:3] == a[:3]  # identical before any change
    for run in (b, c):
        for step, (x, y) in enumerate(zip(a, run)):
            assert abs(x - y) <= REL_TOL * abs(x), (step, x, y)

    # Right after the first move: every expert's weights and AdamW state equal A's bit for bit.
    snap_a3, snap_b3 = _merge(results, "A", 3), _merge(results, "B", 3)
    assert set(snap_a3) == set(snap_b3)
    assert any(k[-1] == "exp_avg_sq" for k in snap_b3) and any(k[-1] == "step" for k in snap_b3)
    for key in snap_a3:
        assert torch.equal(snap_a3[key], snap_b3[key]), key
    # After more training and a second move (to pure data parallelism): equal within tolerance.
    for when in (6, "end"):
        snap_a, snap_b = _merge(results, "A", when), _merge(results, "B", when)
        assert set(snap_a) == set(snap_b)
        for key in snap_a:
            torch.testing.assert_close(
                snap_b[key], snap_a[key], atol=ATOL, rtol=0, msg=lambda m, key=key: f"{when} {key}: {m}"
            )
    assert r0["B_layout"] == (1, [0, 1, 2, 3])
    assert results[3]["B_layout"] == (1, [0, 1, 2, 3])

    # The config path decided the change at step 3, and both checkpoints resume C's trajectory.
    assert [(h["step"], h["experts_per_rank"], h["new_experts_per_rank"]) for h in r0["C_history"]] == [(3, 1, 2)]
    assert r0["D"] == c[2:]
    assert r0["E"] == c[5:]

    # Expert memory: at 1 expert per rank both layers fit; at 2 one layer is offloaded and its
    # experts were brought in (forward and backward, per micro-op with rows).
    for res in results:
        before, after = res["memory"]["before"], res["memory"]["after"]
        assert before["offloaded_layers"] == 0 and before["copies_in"] == 0 and before["resident_layers"] == 2
        assert after["experts_per_rank"] == 2 and after["offloaded_layers"] == 1 and after["offloaded_experts"] == 2
        assert after["resident_mb"] <= MEMORY_MB < after["resident_mb"] + after["offloaded_mb"]
        assert after["copies_in"] > 0 and after["mb_in"] > 0
