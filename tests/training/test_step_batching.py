"""collate_microbatches: layouts, label shift, CP sharding, sequence-parallel tables, bookkeeping, errors.

Pure CPU, no process group: each rank's view is a `ParallelContext.for_rank(config, cp_rank=...)`.
"""

import pytest
import torch
from step_helpers import make_samples

from megatron_solopo.objectives import ObjectiveConfig, required_batch_keys
from megatron_solopo.parallel.config import ParallelConfig
from megatron_solopo.parallel.parallel_context import ParallelContext
from megatron_solopo.parallel.cp import thd_zigzag_token_indices, zigzag_token_indices
from megatron_solopo.training.batching import (
    collate_microbatches,
    collate_scoring_microbatches,
    layout_for_backend,
    pad_multiple,
    sequence_roles,
)

SOLO = ObjectiveConfig(name="orpo", mode="solo")
ONE = ParallelContext.for_rank(ParallelConfig())  # a single process, no process group


def _tiny_sample(sample_id="a", prompt=(5, 6, 7), chosen=(8, 9), rejected=(10,), long_prompt=(1, 2, 3, 4, 5)):
    sample = {"id": sample_id}
    for role, (x, y) in {"short_chosen": (prompt, chosen), "short_rejected": (prompt, rejected),
                         "long_chosen": (long_prompt, chosen), "long_rejected": (long_prompt, rejected)}.items():
        sample[f"{role}_input_ids"] = list(x) + list(y)
        sample[f"{role}_loss_mask"] = [0] * len(x) + [1] * len(y)
    return sample


def test_packed_layout_by_hand():
    mb = collate_microbatches([_tiny_sample()], SOLO, ONE, "packed", 1)[0]
    assert mb.roles == ("short_chosen", "short_rejected", "long_chosen")
    # sequences: [5 6 7 8 9], [5 6 7 10], [1 2 3 4 5 8 9]; no padding at cp=1
    assert mb.tokens.tolist() == [[5, 6, 7, 8, 9, 5, 6, 7, 10, 1, 2, 3, 4, 5, 8, 9]]
    assert mb.position_ids.tolist() == [[0, 1, 2, 3, 4, 0, 1, 2, 3, 0, 1, 2, 3, 4, 5, 6]]
    assert mb.packed_seq_params.cu_seqlens_q.tolist() == [0, 5, 9, 16]
    assert mb.packed_seq_params.cu_seqlens_q.dtype == torch.int32
    assert torch.equal(mb.packed_seq_params.cu_seqlens_q, mb.packed_seq_params.cu_seqlens_q_padded)
    assert mb.packed_seq_params.max_seqlen_q == 7
    # the row at position p predicts token p+1: rows 2,3 (-> 8, 9), 7 (-> 10), 13,14 (-> 8, 9)
    assert mb.rows.row_index.tolist() == [2, 3, 7, 13, 14]
    assert mb.rows.targets.tolist() == [8, 9, 10, 8, 9]
    assert mb.rows.segments.tolist() == [0, 0, 1, 2, 2]
    assert mb.chosen_tokens.tolist() == [2] and mb.rejected_tokens.tolist() == [1]
    assert (mb.num_real_tokens, mb.num_padded_tokens, mb.num_response_tokens) == (16, 16, 5)


def test_padded_layout_by_hand():
    mb = collate_microbatches([_tiny_sample()], SOLO, ONE, "padded", 1, pad_token_id=0)[0]
    assert mb.tokens.tolist() == [[5, 6, 7, 8, 9, 0, 0], [5, 6, 7, 10, 0, 0, 0], [1, 2, 3, 4, 5, 8, 9]]
    assert mb.packed_seq_params is None and mb.position_ids[1].tolist() == list(range(7))
    # decoder rows are [s, b]: flat index = position * 3 + sequence
    assert mb.rows.row_index.tolist() == sorted([2 * 3 + 0, 3 * 3 + 0, 2 * 3 + 1, 4 * 3 + 2, 5 * 3 + 2])
    by_row = dict(zip(mb.rows.row_index.tolist(), mb.rows.targets.tolist()))
    assert by_row == {6: 8, 9: 9, 7: 10, 14: 8, 17: 9}
    assert (mb.num_real_tokens, mb.num_padded_tokens) == (16, 21)


def test_pad_multiple_combines_cp_sp_and_fp8():
    assert pad_multiple(ParallelConfig()) == 1
    assert pad_multiple(ParallelConfig(cp=2)) == 4
    assert pad_multiple(ParallelConfig(cp=2), 16) == 32  # FP8's 16 holds on the local shard T/cp
    assert pad_multiple(ParallelConfig(cp=3), 16) == 48
    assert pad_multiple(ParallelConfig(tp=2, sequence_parallel=True)) == 2
    assert pad_multiple(ParallelConfig(tp=4, cp=2, sequence_parallel=True), 16) == 128  # T/(cp*tp) % 16
    with pytest.raises(ValueError, match="positive integer"):
        pad_multiple(ParallelConfig(), 0)


def _global_rows(mb, cp_rank, cp, layout):
    """(sequence, position-in-sequence, target) of every scored row, from a CP shard."""
    if layout == "packed":
        cu = mb.packed_seq_params.cu_seqlens_q_padded.tolist()
        positions = thd_zigzag_token_indices(cu, cp_rank, cp)[mb.rows.row_index]
        starts = torch.tensor(cu)[mb.rows.segments]
        return sorted(zip(mb.rows.segments.tolist(), (positions - starts).tolist(), mb.rows.targets.tolist()))
    b = mb.tokens.size(0)
    local_pos, seq = mb.rows.row_index // b, mb.rows.row_index % b
    positions = zigzag_token_indices(mb.seq_len_tokens, cp_rank, cp)[local_pos]
    return sorted(zip(seq.tolist(), positions.tolist(), mb.rows.targets.tolist()))


@pytest.mark.parametrize("layout", ["packed", "padded"])
def test_cp_shards_partition_the_scored_rows(layout):
    samples = make_samples(3, seed=1)
    cp2 = [ParallelContext.for_rank(ParallelConfig(cp=2), cp_rank=r) for r in (0, 1)]
    full = collate_microbatches(samples, SOLO, cp2[0], layout, 3)  # padded to 2*cp
    unsharded = _global_rows(collate_microbatches(samples, SOLO, ONE, layout, 3,
                                                  pad_to_multiple_of=4)[0], 0, 1, layout)
    shards = [collate_microbatches(samples, SOLO, cp2[r], layout, 3)[0] for r in (0, 1)]
    union = sorted(_global_rows(shards[0], 0, 2, layout) + _global_rows(shards[1], 1, 2, layout))
    assert union == unsharded
    assert sum(s.rows.row_index.numel() for s in shards) == full[0].num_response_tokens
    for shard in shards:
        assert shard.tokens.size(1) * 2 == shard.seq_len_tokens  # each rank holds half the tokens
    if layout == "packed":
        lengths = torch.diff(shards[0].packed_seq_params.cu_seqlens_q)
        assert (lengths % 4 == 0).all()


def test_response_rows_predict_the_response_tokens():
    samples = make_samples(2, seed=2)
    mb = collate_microbatches(samples, SOLO, ONE, "packed", 2)[0]
    flat_tokens = mb.tokens.reshape(-1)
    assert torch.equal(flat_tokens[mb.rows.row_index + 1], mb.rows.targets)  # next token (b = 1)
    for k, (sample_idx, role) in enumerate([(i, r) for i in range(2) for r in mb.roles]):
        expected = sum(samples[sample_idx][f"{role}_loss_mask"])
        assert int((mb.rows.segments == k).sum()) == expected


def test_sequence_parallel_tables_reproduce_the_rows_in_gathered_order():
    samples = make_samples(2, seed=4)
    parallel = ParallelContext.for_rank(ParallelConfig(tp=2, sequence_parallel=True))
    mb = collate_microbatches(samples, SOLO, parallel, "packed", 2)[0]
    rows = mb.rows
    per_rank = mb.tokens.numel() // 2
    width = rows.sp_local_index.size(1)
    gathered_global = (rows.sp_local_index + torch.arange(2).unsqueeze(1) * per_rank).reshape(-1)
    real = rows.sp_segments < rows.num_sequences
    assert sorted(gathered_global[real].tolist()) == rows.row_index.tolist()
    lookup = dict(zip(rows.row_index.tolist(), zip(rows.targets.tolist(), rows.segments.tolist())))
    for flat, target, segment in zip(gathered_global[real].tolist(), rows.sp_targets[real].tolist(),
                                     rows.sp_segments[real].tolist()):
        assert lookup[flat] == (target, segment)
    assert int(real.sum()) == rows.row_index.numel() and width >= rows.row_index.numel() / 2


def test_micro_batches_keep_pairs_together_and_map_back():
    samples = make_samples(4, seed=5)
    mbs = collate_microbatches(samples, SOLO, ONE, "padded", 2)
    assert [mb.sample_ids for mb in mbs] == [["pair0", "pair1"], ["pair2", "pair3"]]
    mb = mbs[1]
    sums = torch.arange(6, dtype=torch.float32)  # sequence k = (pair k // 3, role k % 3)
    stats = mb.batch_stats(sums)
    assert set(stats) == set(required_batch_keys(SOLO))
    assert stats["short_chosen_logps"].tolist() == [0.0, 3.0]
    assert stats["short_rejected_logps"].tolist() == [1.0, 4.0]
    assert stats["long_chosen_logps"].tolist() == [2.0, 5.0]
    assert stats["chosen_tokens"].tolist() == [sum(samples[i]["short_chosen_loss_mask"]) for i in (2, 3)]


@pytest.mark.parametrize("objective, roles", [
    (ObjectiveConfig(name="orpo", mode="solo"), ("short_chosen", "short_rejected", "long_chosen")),
    (ObjectiveConfig(name="orpo", mode="solo", ra_on="both"),
     ("short_chosen", "short_rejected", "long_chosen", "long_rejected")),
    (ObjectiveConfig(name="simpo", mode="short"), ("short_chosen", "short_rejected")),
    (ObjectiveConfig(name="dpo", mode="long"), ("long_chosen", "long_rejected")),
    (ObjectiveConfig(name="dpo", mode="longpo"), ("long_chosen", "long_rejected")),
])
def test_roles_follow_the_objective(objective, roles):
    assert sequence_roles(objective) == roles


def test_reference_logps_are_carried_for_dpo_and_longpo():
    samples = make_samples(2, seed=6)
    for i, sample in enumerate(samples):
        for role in ("short_chosen", "short_rejected", "long_chosen", "long_rejected"):
            sample[f"ref_{role}_logps"] = -10.0 - i
    dpo = collate_microbatches(samples, ObjectiveConfig(name="dpo", mode="solo"), ONE, "packed", 2)[0]
    assert set(dpo.reference_logps) == {"ref_short_chosen_logps", "ref_short_rejected_logps", "ref_long_chosen_logps"}
    longpo = collate_microbatches(samples, ObjectiveConfig(name="dpo", mode="longpo"), ONE, "packed", 2)[0]
    assert set(longpo.reference_logps) == {"ref_short_chosen_logps", "ref_short_rejected_logps"}
    assert longpo.roles == ("long_chosen", "long_rejected")
    assert longpo.reference_logps["ref_short_chosen_logps"].tolist() == [-10.0, -11.0]
    assert set(longpo.batch_stats(torch.zeros(4))) == set(required_batch_keys(ObjectiveConfig(name="dpo", mode="longpo")))


def test_scoring_micro_batches_allow_a_partial_last_batch_and_need_no_reference():
    samples = make_samples(5, seed=7)
    mbs = collate_scoring_microbatches(samples, ["long_chosen", "short_chosen"], ONE, "packed", 2)
    assert [mb.num_pairs for mb in mbs] == [2, 2, 1]
    assert mbs[0].roles == ("short_chosen", "long_chosen")
    assert mbs[0].rejected_tokens.tolist() == [0, 0]


def test_layout_for_backend():
    assert layout_for_backend("sdpa") == "packed" and layout_for_backend("te") == "packed"
    assert layout_for_backend("local") == "padded"
    with pytest.raises(ValueError, match="resolve 'auto'"):
        layout_for_backend("auto")


@pytest.mark.parametrize("mutate, message", [
    (lambda s: s.pop("long_chosen_input_ids"), "no 'long_chosen_input_ids'"),
    (lambda s: s.update(short_chosen_loss_mask=[1] + s["short_chosen_loss_mask"][1:]), "first token"),
    (lambda s: s.update(short_rejected_loss_mask=[0] * len(s["short_rejected_loss_mask"])), "no response token"),
    (lambda s: s.update(short_chosen_loss_mask=s["short_chosen_loss_mask"][:-1]), "same length"),
    (lambda s: s.update(short_chosen_loss_mask=[0] * (len(s["short_chosen_loss_mask"]) - 1) + [2]), "only 0/1"),
    (lambda s: s.update(long_chosen_input_ids=[0] + s["long_chosen_input_ids"],
                        long_chosen_loss_mask=[0, 0] + s["long_chosen_loss_mask"][:-1]), "different token counts"),
    (lambda s: s.update(short_chosen_input_ids=[999] + s["short_chosen_input_ids"][1:]), "outside the model's vocab"),
])
def test_malformed_samples_name_the_sample_and_the_fix(mutate, message):
    sample = _tiny_sample("bad-7")
    mutate(sample)
    with pytest.raises(ValueError, match=message) as err:
        collate_microbatches([sample], SOLO, ONE, "packed", 1, vocab_size=256)
    assert "bad-7" in str(err.value)


def test_missing_reference_and_bad_arguments():
    with pytest.raises(ValueError, match="ref_short_chosen_logps.*precompute-ref"):
        collate_microbatches([_tiny_sample()], ObjectiveConfig(name="dpo", mode="solo"), ONE, "packed", 1)
    with pytest.raises(ValueError, match="layout"):
        collate_microbatches([_tiny_sample()], SOLO, ONE, "thd", 1)
    with pytest.raises(ValueError, match="multiple of micro_batch_pairs"):
        collate_microbatches(make_samples(3), SOLO, ONE, "packed", 2)
    with pytest.raises(ValueError, match="cp_rank"):
        collate_microbatches([_tiny_sample()], SOLO, ParallelContext.for_rank(ParallelConfig(cp=2), cp_rank=2),
                             "packed", 1)
    with pytest.raises(TypeError, match="ParallelContext"):  # a config alone does not say which rank this is
        collate_microbatches([_tiny_sample()], SOLO, ParallelConfig(), "packed", 1)
