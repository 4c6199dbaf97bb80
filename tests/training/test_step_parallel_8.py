"""The SoLoPO step at 8 ranks: CP=8 and CP=2 x TP=2 x PP=2 equal CP=1 on sequences of thousands of tokens.

The same harness as test_step_parallel.py (one real training step through collate -> Megatron's
schedule -> DDP -> optimizer, Adam with lr = eps = 1e6 so the update is the negative gradient),
in one group of 8 gloo processes. The pairs' long contexts hold 1,500-3,000 tokens, so at CP=8 every
rank's ring step carries a few hundred tokens of each sequence, packed (THD, each sequence padded to
a multiple of 2 x CP) and padded (one row per sequence). The reference is plain autograd of the mean
objective on an unwrapped TP=1 model over all pairs.
"""

import pytest
from dist_utils import run_distributed
from step_helpers import (assert_loss_and_counts_are_global, assert_update_is_minus_reference_gradient, make_samples,
                          manual_reference, run_timed, train_layout, with_synthetic_reference_logps)

WORLD = 8
NUM_PAIRS = 4
LONG_TOKENS = (1500, 3000)


def _samples():
    samples = make_samples(NUM_PAIRS, seed=8, short=(20, 60), long=LONG_TOKENS, response=(3, 9))
    return with_synthetic_reference_logps(samples)


def _objective():
    from megatron_solopo.objectives import ObjectiveConfig

    return ObjectiveConfig(name="dpo", mode="solo", beta=0.5, alpha=2.0)


def _worker(rank, world_size):
    samples, objective = _samples(), _objective()
    runs = {
        "reference": lambda: manual_reference(samples, objective, tp=1),
        "cp8_packed": lambda: train_layout(samples, objective, 1, 1, 8, "sdpa", "packed", micro_batch_pairs=2),
        "cp8_padded": lambda: train_layout(samples, objective, 1, 1, 8, "sdpa", "padded", micro_batch_pairs=4),
        "cp2_tp2_pp2": lambda: train_layout(samples, objective, 2, 2, 2, "sdpa", "packed", micro_batch_pairs=1),
    }
    return run_timed(runs)


@pytest.fixture(scope="module")
def group_results():
    return run_distributed(_worker, WORLD, timeout_s=600)


LAYOUTS = ["cp8_packed", "cp8_padded", "cp2_tp2_pp2"]


def test_pairs_are_long():
    lengths = [len(s["long_chosen_input_ids"]) for s in _samples()]
    assert min(lengths) >= LONG_TOKENS[0] and len(set(lengths)) == NUM_PAIRS  # thousands, all different


@pytest.mark.slow
@pytest.mark.parametrize("layout", LAYOUTS)
def test_update_equals_minus_mean_loss_gradient_at_8_ranks(group_results, layout):
    assert_update_is_minus_reference_gradient(group_results, layout, rtol=5e-4, atol=5e-6)


@pytest.mark.slow
@pytest.mark.parametrize("layout", LAYOUTS)
def test_loss_and_counts_are_global_at_8_ranks(group_results, layout):
    assert_loss_and_counts_are_global(group_results, layout, NUM_PAIRS)


@pytest.mark.slow
def test_print_timings_at_8_ranks(group_results, capsys):
    with capsys.disabled():
        print("\n8-rank layout seconds:", group_results[0]["seconds"])
