"""The response-only LM head: log-probs of response tokens, without [tokens x vocab] logits.

Preference objectives need log p(y_t | x, y_<t) only for the response tokens y_t; the context x can
be 128K tokens long while y has a few hundred. GPTModel's usual post-processing runs the output
layer on every position ([s, b, V/tp] logits, and an fp32 copy of them for the softmax backward).
`response_logprob_sums` is a GPTModel `output_processor` (megatron/core/models/gpt/gpt_model.py
`_postprocess`) that instead

1. gathers the hidden states of the positions whose NEXT token is a response token (the log-prob
   of token t comes from the hidden state at t-1; the data path shifts labels before any CP split),
2. runs the output layer and Megatron's vocab-parallel cross-entropy on those rows only, in chunks
   of `LogprobHeadConfig.chunk_tokens` rows; with `recompute=True` each chunk's logits are dropped
   after the forward and recomputed in the backward (torch.utils.checkpoint), so the head holds at
   most one chunk of [rows x V/tp] fp32 logits at a time,
3. sums the token log-probs per sequence (a segment id per row) and returns [num_sequences] fp32.

Peak memory of the head: O(chunk_tokens x V/tp) instead of O(s x b x V/tp).

Parallelism. TP: the output layer is vocab-parallel (ColumnParallelLinear, gather_output=False) and
`vocab_parallel_cross_entropy` all-reduces the max / sum-exp / target logit over the TP group, so
every TP rank gets the same log-probs. CP: each rank scores the response tokens of its own zigzag
chunks and returns partial sums; the caller all-reduces them over the CP group
(`megatron_solopo.parallel.cp.cp_all_reduce_sum`). PP: GPTModel calls the processor on the last
stage only. Sequence parallelism: the hidden states are scattered along the sequence over the TP
ranks; each rank selects its own rows (`ResponseRows.sp_*`, padded to the same count on every TP
rank) and the output layer all-gathers them itself (its sequence-parallel path), whose backward
reduce-scatters the row gradients back. The row order after that gather is rank-major, which the
collation (training/batching.py) encodes in `sp_targets` / `sp_segments`.

A rank with no response row still returns a result connected to its hidden states (0 x their sum),
so its backward runs through the whole model: ring attention and pipeline p2p need every rank's
backward.
"""

from __future__ import annotations

import dataclasses

import torch
import torch.utils.checkpoint

from megatron_solopo.model.config import LogprobHeadConfig  # the `model.logprob_head` section

__all__ = [
    "LogprobHeadConfig",
    "ResponseRows",
    "make_output_processor",
    "response_logprob_sums",
    "response_token_logprobs",
]


@dataclasses.dataclass
class ResponseRows:
    """Which hidden-state rows of one micro-batch (on this CP rank) the head scores.

    Flat row f of the decoder output [s_local, b, h] is hidden_states.view(-1, h)[f], f = s * b + b_idx.
    Without sequence parallelism every TP rank holds all rows and uses `row_index`/`targets`/`segments`.
    With sequence parallelism TP rank r holds flat rows [r * n, (r + 1) * n), n = s_local * b / tp, and
    uses row r of `sp_local_index`; the output layer concatenates the TP ranks' selections in rank order,
    which `sp_targets` / `sp_segments` follow (padding rows have segment == num_sequences: dropped).
    """

    row_index: torch.Tensor
    """[n_rows] int64: flat index of each scored row in this rank's [s_local * b] hidden rows."""
    targets: torch.Tensor
    """[n_rows] int64: the token id each row predicts (the next token, a response token)."""
    segments: torch.Tensor
    """[n_rows] int64: the sequence (0 .. num_sequences-1) each row's log-prob is summed into."""
    num_sequences: int
    """Number of sequences in the micro-batch (length of the returned sums)."""
    sp_local_index: torch.Tensor | None = None
    """[tp, m] int64 (sequence parallelism only): per TP rank, the index of its scored rows within its
    own [s_local * b / tp] slice, padded with 0 to the same count m on every TP rank."""
    sp_targets: torch.Tensor | None = None
    """[tp * m] int64 (sequence parallelism only): targets in the output layer's gathered row order."""
    sp_segments: torch.Tensor | None = None
    """[tp * m] int64 (sequence parallelism only): segments in gathered order; num_sequences = padding."""

    def to(self, device: torch.device | str) -> ResponseRows:
        """The same rows with every tensor on `device` (non-blocking copies)."""
        moved = {field.name: getattr(self, field.name) for field in dataclasses.fields(self)}
        for name, value in moved.items():
            if isinstance(value, torch.Tensor):
                moved[name] = value.to(device, non_blocking=True)
        return ResponseRows(**moved)


def _chunk_logprobs(rows: torch.Tensor, targets: torch.Tensor, output_layer, output_weight, scale_logits
                    ) -> torch.Tensor:
    """log p(target) for hidden rows [n, 1, h] -> [n'] fp32 (n' = n, or tp * n under sequence parallelism)."""
    from megatron.core.tensor_parallel import vocab_parallel_cross_entropy

    logits, _ = output_layer(rows, weight=output_weight, runtime_gather_output=False)  # [n', 1, V/tp]
    if scale_logits is not None:
        logits = scale_logits(logits)
    # vocab_parallel_cross_entropy overwrites its fp32 input in place: these logits are ours alone
    return -vocab_parallel_cross_entropy(logits.float(), targets.unsqueeze(1)).squeeze(1)


def _chunked(fn, recompute: bool, *args) -> torch.Tensor:
    if recompute and torch.is_grad_enabled():
        return torch.utils.checkpoint.checkpoint(fn, *args, use_reentrant=False)
    return fn(*args)


def response_token_logprobs(hidden_states: torch.Tensor, output_layer, rows: ResponseRows,
                            output_weight: torch.Tensor | None = None,
                            head: LogprobHeadConfig | None = None,
                            scale_logits=None) -> tuple[torch.Tensor, torch.Tensor]:
    """Per-row response log-probs: (logps [n] fp32, segments [n]) in the order the head computed them.

    hidden_states: decoder output [s_local, b, h] (final norm applied; scattered along s under
    sequence parallelism). Rows whose segment equals rows.num_sequences are padding.
    """
    head = head or LogprobHeadConfig()
    flat = hidden_states.reshape(-1, hidden_states.size(-1))  # [s_local * b (/ tp under SP), h]
    if getattr(output_layer, "sequence_parallel", False):
        if rows.sp_local_index is None:
            raise ValueError("the output layer is sequence-parallel but the micro-batch was collated without "
                             "sequence-parallel row tables; build it with collate_microbatches(..., parallel) "
                             "where parallel.sequence_parallel=True")
        tp_rank = torch.distributed.get_rank(group=output_layer.tp_group)  # the output layer's own TP group
        local_index = rows.sp_local_index[tp_rank]  # [m]
        tp = rows.sp_local_index.size(0)
        targets, segments = rows.sp_targets.view(tp, -1), rows.sp_segments
        pieces = []
        for start in range(0, local_index.numel(), head.chunk_tokens):
            end = min(start + head.chunk_tokens, local_index.numel())
            chunk_rows = flat.index_select(0, local_index[start:end]).unsqueeze(1)  # [c, 1, h]
            chunk_targets = targets[:, start:end].reshape(-1)  # gathered order: rank-major
            pieces.append(_chunked(_chunk_logprobs, head.recompute, chunk_rows, chunk_targets, output_layer,
                                   output_weight, scale_logits).view(tp, end - start))
        logps = torch.cat(pieces, dim=1).reshape(-1) if pieces else flat.new_zeros(0, dtype=torch.float32)
        return logps, segments
    pieces = []
    for start in range(0, rows.row_index.numel(), head.chunk_tokens):
        end = min(start + head.chunk_tokens, rows.row_index.numel())
        chunk_rows = flat.index_select(0, rows.row_index[start:end]).unsqueeze(1)  # [c, 1, h]
        pieces.append(_chunked(_chunk_logprobs, head.recompute, chunk_rows, rows.targets[start:end], output_layer,
                               output_weight, scale_logits))
    logps = torch.cat(pieces) if pieces else flat.new_zeros(0, dtype=torch.float32)
    return logps, rows.segments


def response_logprob_sums(hidden_states: torch.Tensor, output_layer, context: ResponseRows,
                          output_weight: torch.Tensor | None = None, scale_logits=None,
                          head: LogprobHeadConfig | None = None, **_unused) -> torch.Tensor:
    """GPTModel `output_processor`: per-sequence sums of response-token log-probs, [num_sequences] fp32.

    Called by GPTModel._postprocess with hidden_states [s, b, h], output_layer, output_weight (the
    embedding when tied), context (the micro-batch's `ResponseRows`), scale_logits and other keyword
    arguments that this head does not need. Under CP the sums cover this rank's tokens only.
    """
    logps, segments = response_token_logprobs(hidden_states, output_layer, context, output_weight, head,
                                              scale_logits)
    # one spare bin (index num_sequences) swallows sequence-parallel padding rows
    sums = logps.new_zeros(context.num_sequences + 1).index_add(0, segments, logps)[:context.num_sequences]
    if logps.numel() == 0:
        sums = sums + 0.0 * hidden_states.sum()  # keep the backward running through the model on this rank
    return sums


def make_output_processor(head: LogprobHeadConfig | None = None):
    """A GPTModel output_processor bound to `head` (pass the micro-batch's ResponseRows as
    `output_processor_context`)."""
    head = head or LogprobHeadConfig()

    def processor(**kwargs):
        return response_logprob_sums(head=head, **kwargs)

    return processor
