"""How the data module splits a step under DDP, without engines: the ranks' blocks are the single-process
question set, in whole groups, each rank samples with its own seed, validation is split into equal-length
streams, an uneven split fails with a clear message; and igpo.distributed's collectives on 2 gloo processes."""

from __future__ import annotations

from types import SimpleNamespace

import pytest
import torch

from igpo.data.module import RolloutDataModule, _ValStream
from igpo.distributed import gather_lists, mean_over_ranks, shard_bounds
from igpo.types import Question

pytestmark = pytest.mark.distributed


def _dm(rank: int, world: int, questions_per_step: int = 4) -> RolloutDataModule:
    qs = [Question(f"q{i}", f"question {i}", [f"a{i}"]) for i in range(20)]
    dm = RolloutDataModule(qs, generator=None, retriever=None, tokenizer="unused", val_questions=qs[:5],
                           questions_per_step=questions_per_step, group_size=3, seed=7, val_batch_size=2)
    dm.train_set, dm.val_set = qs, qs[:5]
    dm.rank, dm.world_size = rank, world
    return dm


def test_rank_blocks_are_the_single_process_step():
    single = _dm(0, 1)
    for step in range(3):
        union, offsets = [], []
        for rank in range(2):
            block, offset = _dm(rank, 2).rank_questions(step)
            union += block
            offsets.append(offset)
        assert union == single.questions_for_step(step) and offsets == [0, 2]
    assert single.rank_questions(0) == (single.questions_for_step(0), 0)


def test_each_rank_samples_with_its_own_seed():
    seeds = {_dm(r, 2).sampling_for_step(5).seed for r in range(2)}
    assert len(seeds) == 2
    assert _dm(0, 1).sampling_for_step(5).seed == _dm(0, 1).sampling_for_step(5).seed  # still a pure function


def test_questions_per_step_must_split_evenly():
    dm = _dm(0, 1, questions_per_step=3)
    dm.trainer = SimpleNamespace(global_rank=1, world_size=2)
    with pytest.raises(ValueError, match="questions_per_step=3 is not divisible by the 2 trainer processes"):
        dm.setup("fit")
    with pytest.raises(ValueError):
        shard_bounds(3, 0, 2)


def test_validation_streams_have_equal_length_and_cover_the_set():
    streams = [_ValStream(_dm(r, 2)) for r in range(2)]
    assert [len(s) for s in streams] == [2, 2]  # 5 questions: shares of 3 and 2, chunks of 2
    shares = [s.dm.val_set[s.dm.rank::s.dm.world_size] for s in streams]
    assert sorted(q.id for share in shares for q in share) == sorted(q.id for q in _dm(0, 1).val_set)


def test_collectives_are_the_identity_in_one_process():
    assert mean_over_ranks({"a": 1.0}) == {"a": 1.0}
    assert gather_lists({"x": [1, 2]}) == {"x": [1, 2]}


def _collectives(rank: int, port: int, out: str) -> None:
    import torch.distributed as dist

    from igpo.distributed import all_sum, any_rank, rank_and_world

    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=2)
    try:
        result = {
            "rank_and_world": rank_and_world(), "all_sum": all_sum(rank + 1.5), "any_rank": any_rank(rank == 1),
            "none": any_rank(False),
            "mean": mean_over_ranks({"a": float(rank), f"only{rank}": 1.0}),
            "gather": gather_lists({"src": [rank], f"s{rank}": [rank]}),
        }
        torch.save(result, f"{out}/rank{rank}.pt")
    finally:
        dist.destroy_process_group()


@pytest.mark.slow
def test_collectives_over_two_gloo_processes(tmp_path):
    """The helpers' results on 2 CPU processes (gloo): sums, a decision any rank takes, means of keys some
    ranks lack, and lists concatenated in rank order."""
    import socket

    import torch.multiprocessing as mp

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    mp.spawn(_collectives, args=(port, str(tmp_path)), nprocs=2)
    r0, r1 = (torch.load(tmp_path / f"rank{r}.pt", weights_only=False) for r in (0, 1))
    assert r0["rank_and_world"] == (0, 2) and r1["rank_and_world"] == (1, 2)
    for r in (r0, r1):
        assert r["all_sum"] == 4.0 and r["any_rank"] is True and r["none"] is False
        assert r["mean"] == {"a": 0.5, "only0": 1.0, "only1": 1.0}
        assert r["gather"] == {"src": [0, 1], "s0": [0], "s1": [1]}
