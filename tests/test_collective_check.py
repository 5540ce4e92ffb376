"""The collective-order check: ranks that issue one group's collectives in different orders are
stopped with the first difference named, instead of hanging or summing the wrong tensors; a
collective that fails names its op and group."""

import pytest

from lina.testing.multiproc import run_ranks

TINY = dict(
    steps=2,
    batch_size=2,
    eval_batches=1,
    corpus_max_mb=0.1,
    model=dict(d_model=16, n_layers=1, n_heads=2, d_ff=32, seq_len=16),
)


def _train_two_steps(rank: int, world: int, corpus: str, policy: str, check: bool) -> str:
    from lina.comm.collective_check import CollectiveLog, CollectiveOrderError
    from lina.comm.groups import build_group_set
    from lina.config import TrainConfig
    from lina.data.corpus import load_corpus
    from lina.train.trainer import Trainer

    cfg = TrainConfig.from_dict({**TINY, "workers": world, "corpus": corpus})
    with CollectiveLog() as log:
        groups = build_group_set([world], cfg.comm.timeout_s)
        for g in groups.values():
            log.watch(g.dp_group, "dp")
            log.watch(g.ep_group, f"ep{g.ep_size}")
        log.prepare_check()
        trainer = Trainer(cfg, groups[world], load_corpus(corpus, 0.1), group_set=groups)
        if policy == "misordered":
            from lina.testing.misordered import MisorderedSync

            trainer.policy.close()
            trainer.policy = MisorderedSync(trainer.model, trainer.groups.dp_group, None, world, trainer.timeline)
        try:
            for step in range(2):
                trainer.train_step(step)
                if check:
                    log.check_step(step)
        except CollectiveOrderError as err:
            return str(err)
        return "ok"


@pytest.fixture
def corpus(tmp_path) -> str:
    path = tmp_path / "text.txt"
    path.write_text("the quick brown fox jumps over the lazy dog. " * 400)
    return str(path)


@pytest.mark.slow
@pytest.mark.timeout(180)
def test_a_misordered_policy_is_stopped_with_the_first_difference_named(corpus):
    messages = run_ranks(_train_two_steps, 2, corpus, "misordered", True, timeout_s=60)
    for msg in messages:  # every rank stops, with the same message
        assert msg == messages[0]
    msg = messages[0]
    assert "in step 0 on group dp (ranks 0,1)" in msg, msg
    assert "all_reduce 'half0'" in msg and "all_reduce 'half1'" in msg, msg
    assert "Fix:" in msg


@pytest.mark.slow
@pytest.mark.timeout(180)
@pytest.mark.parametrize("policy", ["ddp-overlap", "lina"])
def test_well_ordered_policies_pass_the_check(corpus, policy):
    assert run_ranks(_train_policy_checked, 2, corpus, policy, timeout_s=60) == ["ok", "ok"]


def _train_policy_checked(rank: int, world: int, corpus: str, policy: str) -> str:
    from lina.comm.collective_check import CollectiveLog
    from lina.comm.groups import build_group_set
    from lina.config import TrainConfig
    from lina.data.corpus import load_corpus
    from lina.train.trainer import Trainer

    cfg = TrainConfig.from_dict({**TINY, "workers": world, "corpus": corpus, "comm": {"chunk_mb": "0.01"}})
    with CollectiveLog() as log:
        groups = build_group_set([world], cfg.comm.timeout_s)
        log.prepare_check()
        trainer = Trainer(cfg, groups[world], load_corpus(corpus, 0.1), group_set=groups)
        trainer.set_policy(policy)
        for step in range(3):
            trainer.train_step(step)
            log.check_step(step)
        trainer.policy.close()
    return "ok"


def _fail_a_collective(rank: int, world: int) -> str:
    import torch
    import torch.distributed as dist

    from lina.comm.collective_check import CollectiveFailed, CollectiveLog, collective_label

    with CollectiveLog() as log:
        group = dist.new_group([0, 1])
        log.watch(group, "dp")
        if rank == 1:
            return "skipped"  # never joins: rank 0's allreduce times out
        try:
            with collective_label("bucket7"):
                dist.all_reduce(torch.ones(4), group=group)
        except CollectiveFailed as err:
            return str(err)
    return "completed"


@pytest.mark.slow
@pytest.mark.timeout(120)
def test_a_timed_out_collective_names_its_group_and_op():
    # a 3 s collective timeout; the processes themselves may take longer to start on a busy machine
    msg = run_ranks(_fail_a_collective, 2, timeout_s=3, join_timeout_s=90)[0]
    assert "all_reduce 'bucket7'" in msg and "group dp (ranks 0,1)" in msg and "Fix:" in msg, msg
