import os
import time

import pytest
import torch
import torch.distributed as dist
from _ranks import RankFailure, RankPool


def _body_all_reduce(base):
    rank = dist.get_rank()
    t = torch.tensor([base + rank, 10.0 * rank])
    dist.all_reduce(t)
    return rank, t


def _body_all_gather():
    rank, world = dist.get_rank(), dist.get_world_size()
    out = [torch.zeros(2, dtype=torch.long) for _ in range(world)]
    dist.all_gather(out, torch.tensor([rank, rank * rank]))
    return rank, world, torch.stack(out)


def _body_boom_on_rank1():
    if dist.get_rank() == 1:
        raise ValueError("boom on rank 1")
    dist.barrier()  # rank 0 waits here for rank 1, which never comes


def _body_exit_on_rank1():
    if dist.get_rank() == 1:
        os._exit(3)
    dist.barrier()


def test_all_reduce_two_ranks(ranks):
    results = ranks.run(_body_all_reduce, 1.0)
    assert [r for r, _ in results] == [0, 1]
    for _, t in results:
        assert torch.equal(t, torch.tensor([3.0, 10.0]))  # (1 + 0) + (1 + 1), 0 + 10


@pytest.mark.parametrize("ranks", [4], indirect=True)
def test_all_gather_four_ranks(ranks):
    expected = torch.tensor([[r, r * r] for r in range(4)])
    results = ranks.run(_body_all_gather)
    assert [(r, w) for r, w, _ in results] == [(0, 4), (1, 4), (2, 4), (3, 4)]
    for _, _, gathered in results:
        assert torch.equal(gathered, expected)


_FAILED_POOLS = []


def test_failure_on_one_rank_does_not_hang(ranks):
    start = time.monotonic()
    with pytest.raises(RankFailure) as info:
        ranks.run(_body_boom_on_rank1)
    elapsed = time.monotonic() - start
    assert elapsed < 15, f"took {elapsed:.1f}s"
    msg = str(info.value)
    assert "boom on rank 1" in msg and "ValueError" in msg
    assert "rank 0: no answer" in msg
    assert not ranks.alive
    with pytest.raises(RuntimeError, match="dead"):
        ranks.run(_body_all_reduce, 0.0)
    _FAILED_POOLS.append(ranks)


def test_pool_recovers_after_failure(ranks):
    if not _FAILED_POOLS:
        pytest.skip("needs test_failure_on_one_rank_does_not_hang to run first")
    assert ranks.alive and ranks is not _FAILED_POOLS[-1]
    assert [t.tolist() for _, t in ranks.run(_body_all_reduce, 2.0)] == [[5.0, 10.0]] * 2


def test_dead_worker_reports_exit_code():
    pool = RankPool(2)
    try:
        start = time.monotonic()
        with pytest.raises(RankFailure, match="rank 1: worker process died with exit code 3") as info:
            pool.run(_body_exit_on_rank1)
        assert time.monotonic() - start < 15
        # Rank 0 either sees gloo's "connection closed" error or is still blocked when the pool is killed.
        assert "rank 0: raised" in str(info.value) or "rank 0: no answer" in str(info.value)
        assert not pool.alive
    finally:
        pool.close()


def test_timeout_names_silent_ranks():
    pool = RankPool(2)
    try:
        with pytest.raises(RankFailure, match=r"timed out after 1s; rank\(s\) \[0, 1\] did not answer"):
            pool.run(time.sleep, 30, timeout=1.0)
    finally:
        pool.close()
