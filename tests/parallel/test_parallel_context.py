"""ParallelContext without process groups: sizes, ranks, stages, layout, the sequence-length divisor.

The context that initialize_parallel returns (groups, ranks read from Megatron) is checked inside the
TP=2 gloo worker of tests/model/test_model_tp.py.
"""

import pytest

from megatron_solopo.parallel import ParallelConfig, ParallelContext, fp8_seq_multiple, seq_len_divisor
from megatron_solopo.parallel.parallel_context import (
    as_parallel_context,
    current_parallel_context,
    require_parallel_context,
)


def test_for_rank_sizes_ranks_and_layout():
    ctx = ParallelContext.for_rank(ParallelConfig(tp=2, pp=2, cp=2, virtual_pp=2), tp_rank=1, pp_rank=1, cp_rank=1,
                                   dp_rank=2, dp_size=3)
    assert (ctx.tp_size, ctx.pp_size, ctx.cp_size, ctx.dp_size, ctx.vpp_size) == (2, 2, 2, 3, 2)
    assert (ctx.tp_rank, ctx.pp_rank, ctx.cp_rank, ctx.dp_rank) == (1, 1, 1, 2)
    assert ctx.world_size == 24
    assert ctx.layout() == {"tp": 2, "pp": 2, "cp": 2, "dp": 3, "vpp": 2, "world": 24}
    assert ctx.cp_group is None and ctx.pg_collection is None  # no process group behind it
    one = ParallelContext.for_rank()
    assert one.layout() == {"tp": 1, "pp": 1, "cp": 1, "dp": 1, "vpp": 1, "world": 1}


def test_config_is_a_private_copy():
    config = ParallelConfig(cp=2)
    ctx = ParallelContext.for_rank(config)
    config.cp_comm_type = "a2a"
    assert ctx.config.cp_comm_type == "p2p"


def test_stage_helpers_follow_megatron_ignore_virtual_semantics():
    config = ParallelConfig(pp=2, virtual_pp=2)
    first, last = (ParallelContext.for_rank(config, pp_rank=r) for r in (0, 1))
    # vp_stage=None: the physical stage (Megatron's ignore_virtual=True)
    assert first.is_first_stage() and not first.is_last_stage()
    assert last.is_last_stage() and not last.is_first_stage()
    # with a vp_stage under an interleaved pipeline: only the first / last model chunk
    assert first.is_first_stage(0) and not first.is_first_stage(1)
    assert last.is_last_stage(1) and not last.is_last_stage(0)
    plain = ParallelContext.for_rank(ParallelConfig())
    assert plain.is_first_stage() and plain.is_last_stage() and plain.is_first_stage(0) and plain.is_last_stage(0)


def test_seq_len_divisor_combines_cp_sp_and_fp8():
    assert ParallelContext.for_rank().seq_len_divisor() == 1
    assert ParallelContext.for_rank(ParallelConfig(cp=2)).seq_len_divisor() == 4
    assert ParallelContext.for_rank(ParallelConfig(cp=2)).seq_len_divisor(fp8="hybrid") == 32
    assert ParallelContext.for_rank(ParallelConfig(cp=3)).seq_len_divisor(fp8="e4m3") == 48
    assert ParallelContext.for_rank(ParallelConfig(cp=3)).seq_len_divisor(fp8="e4m3", fp8_recipe="mxfp8") == 96
    assert ParallelContext.for_rank(ParallelConfig(tp=2, sequence_parallel=True)).seq_len_divisor() == 2
    assert ParallelContext.for_rank(ParallelConfig(tp=4, cp=2, sequence_parallel=True)).seq_len_divisor(multiple=3) == 24
    assert fp8_seq_multiple(None) == 1 and fp8_seq_multiple("hybrid", "blockwise") == 128
    assert seq_len_divisor(ParallelConfig(cp=2), 16) == 32
    with pytest.raises(ValueError, match="fp8_recipe"):
        fp8_seq_multiple("hybrid", "nope")
    with pytest.raises(ValueError, match="positive integer"):
        seq_len_divisor(ParallelConfig(), 0)


def test_inconsistent_contexts_are_rejected():
    with pytest.raises(ValueError, match="cp_rank=2"):
        ParallelContext.for_rank(ParallelConfig(cp=2), cp_rank=2)
    with pytest.raises(ValueError, match="differ from its config"):
        ParallelContext(config=ParallelConfig(tp=2), world_size=2, tp_size=1)
    with pytest.raises(TypeError, match="ParallelConfig"):
        ParallelContext(config={"tp": 1})


def test_hot_paths_need_a_context_and_entry_points_need_initialize_parallel(monkeypatch):
    monkeypatch.setattr("megatron_solopo.parallel.parallel_context._current", None)  # as before any initialize_parallel
    ctx = ParallelContext.for_rank()
    assert require_parallel_context(ctx, "x") is ctx and as_parallel_context(ctx) is ctx
    with pytest.raises(TypeError, match="train_step needs the ParallelContext"):
        require_parallel_context(ParallelConfig(), "train_step")
    assert current_parallel_context(required=False) is None
    with pytest.raises(RuntimeError, match="initialize_parallel"):
        as_parallel_context(ParallelConfig())
