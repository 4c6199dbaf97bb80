"""The DP-sharded sampler: deterministic, disjoint and complete across ranks, exactly resumable."""

import itertools

import pytest

from megatron_solopo.data.pair_order import DistributedPairSampler


def _epoch(num, dp, seed=3, epoch=0):
    shards = []
    for rank in range(dp):
        sampler = DistributedPairSampler(num, rank, dp, seed)
        sampler.set_position(epoch, 0)
        shards.append(list(sampler))
    return shards


def test_same_seed_same_order_and_epochs_differ():
    a = list(DistributedPairSampler(50, seed=1))
    assert a == list(DistributedPairSampler(50, seed=1))
    assert a != list(DistributedPairSampler(50, seed=2))
    assert sorted(a) == list(range(50))
    sampler = DistributedPairSampler(50, seed=1)
    first, second = list(sampler), list(sampler)  # iterating again moves to the next epoch
    assert first == a and second != first and sorted(second) == list(range(50))
    assert list(DistributedPairSampler(6, shuffle=False)) == [0, 1, 2, 3, 4, 5]


@pytest.mark.parametrize("num, dp", [(48, 4), (50, 4), (7, 7), (9, 2)])
def test_dp_shards_are_disjoint_equal_and_cover_the_epoch(num, dp):
    shards = _epoch(num, dp)
    flat = list(itertools.chain.from_iterable(shards))
    assert len(set(flat)) == len(flat)  # disjoint
    assert {len(s) for s in shards} == {num // dp}  # lockstep: equal counts
    assert len(flat) == num - num % dp  # complete up to the remainder dropped this epoch
    # the shards interleave the single global order: rank r holds global positions r, r+dp, ...
    global_order = DistributedPairSampler(num, 0, 1, seed=3).epoch_order(0)[: num - num % dp]
    assert [shards[p % dp][p // dp] for p in range(len(global_order))] == global_order


def test_dropped_remainder_changes_between_epochs():
    covered = set()
    for epoch in range(6):
        covered.update(itertools.chain.from_iterable(_epoch(10, 4, epoch=epoch)))
    assert covered == set(range(10))


def test_resume_mid_epoch_continues_exactly():
    dp = 2
    full = [list(DistributedPairSampler(20, r, dp, seed=9)) for r in range(dp)]
    samplers = [DistributedPairSampler(20, r, dp, seed=9) for r in range(dp)]
    iters = [iter(s) for s in samplers]
    taken = [[next(it) for _ in range(4)] for it in iters]
    states = [s.state_dict() for s in samplers]
    assert states[0]["position"] == states[1]["position"] == 8 and states[0]["epoch"] == 0
    # a fresh process restores the state and gets exactly the rest
    for rank in range(dp):
        fresh = DistributedPairSampler(20, rank, dp, seed=9)
        fresh.load_state_dict(states[rank])
        assert len(fresh) == 6
        assert taken[rank] + list(fresh) == full[rank]
        assert fresh.state_dict()["epoch"] == 1 and fresh.state_dict()["position"] == 0


def test_resume_with_a_different_dp_size_keeps_the_global_order():
    order = DistributedPairSampler(24, seed=5).epoch_order(0)
    old = DistributedPairSampler(24, 0, 2, seed=5)
    it = iter(old)
    for _ in range(6):  # 12 global samples consumed
        next(it)
    state = old.state_dict()
    rest = []
    for rank in range(4):
        sampler = DistributedPairSampler(24, rank, 4, seed=5)
        sampler.load_state_dict(state)
        rest.append(list(sampler))
    assert sorted(itertools.chain.from_iterable(rest)) == sorted(order[12:])


def test_state_mismatch_and_argument_errors():
    state = DistributedPairSampler(20, seed=1).state_dict()
    with pytest.raises(ValueError, match="seed=1 but this sampler has 2"):
        DistributedPairSampler(20, seed=2).load_state_dict(state)
    with pytest.raises(ValueError, match="num_samples"):
        DistributedPairSampler(21, seed=1).load_state_dict(state)
    with pytest.raises(ValueError, match="dp_rank"):
        DistributedPairSampler(10, 2, 2)
    with pytest.raises(ValueError, match="cannot feed"):
        DistributedPairSampler(3, 0, 4)
    with pytest.raises(ValueError, match="multiple of dp_size"):
        DistributedPairSampler(20, 0, 4).set_position(0, 3)
