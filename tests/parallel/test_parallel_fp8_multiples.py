"""FP8 token multiples: one rule (parallel.parallel_context) for training, the reference pass and the benchmark.

Transformer Engine's FP8 GEMMs assert the token count of what ONE rank multiplies (te/pytorch/utils.py
`assert_dim_for_fp8_exec`; 32 for MXFP8, 128 for block scaling), i.e. the local shard: T/cp tokens per
CP rank, T/(cp*tp) with sequence parallelism. These tests check the padded lengths give every rank a
multiple of its recipe's number, and that recipes the GPU cannot run are refused.
"""

from __future__ import annotations

import inspect

import pytest

from megatron_solopo.model.backends import check_fp8_recipe
from megatron_solopo.parallel import ParallelConfig, ParallelContext, fp8_seq_multiple

RECIPE_MULTIPLE = {"delayed": 16, "tensorwise": 16, "mxfp8": 32, "blockwise": 128}
LAYOUTS = [ParallelConfig(), ParallelConfig(cp=2), ParallelConfig(cp=4), ParallelConfig(tp=2),
           ParallelConfig(tp=2, sequence_parallel=True), ParallelConfig(tp=4, cp=2, sequence_parallel=True),
           ParallelConfig(tp=2, cp=3, sequence_parallel=True)]


@pytest.mark.parametrize("recipe", list(RECIPE_MULTIPLE))
@pytest.mark.parametrize("layout", LAYOUTS, ids=lambda c: f"tp{c.tp}-cp{c.cp}-sp{int(c.sequence_parallel)}")
def test_the_local_shard_is_a_multiple_of_the_recipes_number(recipe, layout):
    assert fp8_seq_multiple("hybrid", recipe) == RECIPE_MULTIPLE[recipe]
    divisor = ParallelContext.for_rank(layout).seq_len_divisor(fp8="hybrid", fp8_recipe=recipe)
    ranks_per_sequence = layout.cp * (layout.tp if layout.sequence_parallel else 1)
    for sequences in (1, 3):  # a packed row of several sequences, each padded to the divisor
        tokens = sequences * divisor
        local = tokens // ranks_per_sequence
        assert local * ranks_per_sequence == tokens
        assert local % RECIPE_MULTIPLE[recipe] == 0, (recipe, layout, divisor)
    if layout.cp > 1:
        assert divisor % (2 * layout.cp) == 0  # zigzag chunks still whole
    # the smallest such length: no over-padding
    assert divisor == RECIPE_MULTIPLE[recipe] * ranks_per_sequence or divisor == 2 * layout.cp


def test_without_fp8_the_rule_is_unchanged():
    assert ParallelContext.for_rank(ParallelConfig(cp=2)).seq_len_divisor() == 4
    assert ParallelContext.for_rank(ParallelConfig(tp=4, cp=2, sequence_parallel=True)).seq_len_divisor() == 8
    assert ParallelContext.for_rank(ParallelConfig(tp=2)).seq_len_divisor(fp8=None, fp8_recipe="blockwise") == 1


def test_the_benchmark_uses_the_recipe_rule_not_a_constant():
    from megatron_solopo.bench import stack

    source = inspect.getsource(stack._build_stack)
    assert "seq_len_divisor" in source or "fp8_seq_multiple" in source
    assert "16" not in source.replace("bf16", "").replace("fp16", "")


@pytest.mark.parametrize("recipe,capability,ok", [
    ("delayed", (9, 0), True), ("tensorwise", (9, 0), True), ("blockwise", (9, 0), True),
    ("mxfp8", (9, 0), False), ("mxfp8", (10, 0), True), ("delayed", (8, 0), False), ("delayed", (8, 9), True),
])
def test_recipes_the_gpu_cannot_run_are_refused(recipe, capability, ok):
    if ok:
        check_fp8_recipe("hybrid", recipe, capability)
    else:
        with pytest.raises(ValueError, match=f"fp8_recipe={recipe}.*sm_{capability[0]}{capability[1]}"):
            check_fp8_recipe("hybrid", recipe, capability)
    check_fp8_recipe(None, recipe, capability)  # no FP8: nothing to check


def test_mxfp8_on_hopper_names_the_runnable_recipes():
    with pytest.raises(ValueError, match="delayed or tensorwise or blockwise"):
        check_fp8_recipe("e4m3", "mxfp8", (9, 0))
