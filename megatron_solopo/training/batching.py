"""Tokenized preference pairs -> micro-batches for the model: packed (THD) or padded, CP-sharded.

Input: tokenized samples (megatron_solopo/data/tokenization.py), one dict per preference pair with "id"
and, per role in short_chosen / short_rejected / long_chosen / long_rejected,
f"{role}_input_ids" (list[int]) and f"{role}_loss_mask" (list[int], 1 on response tokens), plus, for
objectives with a reference model, f"ref_{role}_logps" (float: the frozen model's response log-prob
sum, from `solopo precompute-ref` or an online reference pass).

A run builds one `Collator` (`Collator.for_model`: the parallel context, layout, micro-batch size,
padding token, vocabulary size and the model's FP8 token multiple) and asks it for each step's
micro-batches; `collate_microbatches` / `collate_scoring_microbatches` are the same as one call.

Output: `MicroBatch` objects, each holding the sequences of `micro_batch_pairs` pairs (every role the
objective needs, `objectives.required_sequences`: the loss couples the roles of a pair, so they are
never split across micro-batches). Sequence k of a micro-batch is (pair k // n_roles, role
k % n_roles), roles in `objectives.SEQUENCES` order.

Layouts
- "packed" (attention backends sdpa / te): one THD row [1, T], every sequence padded at its end to a
  multiple of `pad_multiple(...)` (2*cp under CP, x tp under sequence parallelism, x the caller's
  multiple, e.g. 16/32 for FP8), `PackedSeqParams(qkv_format="thd")` with cu_seqlens ==
  cu_seqlens_padded (int32; the pads belong to their sequence and sit after its last real token, so
  causal attention never lets a real token see them). Position ids restart at 0 per sequence.
- "padded" (Megatron's local attention, which takes no packing): [n_seq, L], right-padded to the
  longest sequence rounded up to the same multiple; causal attention (attention_mask=None).

Labels are shifted before any CP split: the row at position p predicts token p+1 of the same
sequence, and is scored when token p+1 is a response token. Under CP (cp > 1) every sequence
(packed) or row (padded) is cut into 2*cp chunks and this rank keeps chunks cp_rank and
2*cp-1-cp_rank (megatron_solopo/parallel/cp.py), cp_rank from the `ParallelContext` the caller passes
(`initialize_parallel`'s); cu_seqlens stay those of the full pack.
"""

from __future__ import annotations

import dataclasses
import itertools
import math
from collections.abc import Mapping, Sequence

import torch

from megatron_solopo.model.config import ModelConfig
from megatron_solopo.model.logprobs import ResponseRows
from megatron_solopo.objectives import (
    PO_TERM_SEQUENCES,
    SEQUENCES,
    ObjectiveConfig,
    logps_key,
    required_reference_sequences,
    required_sequences,
)
from megatron_solopo.parallel.config import ParallelConfig
from megatron_solopo.parallel.parallel_context import (ParallelContext, fp8_seq_multiple, require_parallel_context,
                                              seq_len_divisor)
from megatron_solopo.parallel.cp import cp_shard, cp_shard_thd

__all__ = [
    "LAYOUTS",
    "Collator",
    "MicroBatch",
    "collate_microbatches",
    "collate_scoring_microbatches",
    "layout_for_backend",
    "pad_multiple",
    "resolve_layout",
    "sequence_roles",
]

LAYOUTS = ("packed", "padded")
_CHOSEN_ROLES = ("short_chosen", "long_chosen")
_REJECTED_ROLES = ("short_rejected", "long_rejected")


def layout_for_backend(attention_backend: str) -> str:
    """The micro-batch layout an attention backend supports best: packed for sdpa/te, padded for local."""
    if attention_backend in ("sdpa", "te"):
        return "packed"
    if attention_backend == "local":
        return "padded"
    raise ValueError(f"attention backend {attention_backend!r} is not one of sdpa, te, local (resolve 'auto' "
                     "first with megatron_solopo.model.backends.resolve_attention_backend)")


def resolve_layout(requested: str, attention_backend: str) -> str:
    """train.layout resolved for the model's attention backend (auto -> `layout_for_backend`)."""
    if requested == "auto":
        return layout_for_backend(attention_backend)
    if requested == "packed" and attention_backend == "local":
        raise ValueError("train.layout=packed needs attention_backend sdpa or te (Megatron's local attention "
                         "takes no packed sequences); set train.layout=padded or auto")
    return requested


def sequence_roles(objective: ObjectiveConfig) -> tuple[str, ...]:
    """The roles scored by the policy for `objective`, in SEQUENCES order (the order inside a pair)."""
    needed = required_sequences(objective)
    return tuple(role for role in SEQUENCES if role in needed)


def pad_multiple(parallel: ParallelContext | ParallelConfig, pad_to_multiple_of: int = 1) -> int:
    """Every sequence (packed) or row (padded) length is padded to a multiple of this.

    lcm of: the caller's multiple (16/32/128 for FP8 GEMMs: `Collator.for_model` applies the model's)
    applied to the local shard (times cp, times tp with sequence parallelism), 2*cp (zigzag CP chunks)
    when cp > 1, and cp*tp under sequence parallelism
    (`megatron_solopo.parallel.seq_len_divisor`, `ParallelContext.seq_len_divisor`).
    """
    config = parallel.config if isinstance(parallel, ParallelContext) else parallel
    return seq_len_divisor(config, pad_to_multiple_of)


@dataclasses.dataclass
class MicroBatch:
    """One micro-batch as this rank feeds it to GPTModel (CP-sharded), plus the pair bookkeeping.

    Tensors live on the CPU until `to(device)`; the forward step moves them.
    """

    sample_ids: list[str]
    """Ids of the preference pairs, in pair order."""
    roles: tuple[str, ...]
    """Roles scored per pair; sequence k is (pair k // len(roles), role roles[k % len(roles)])."""
    layout: str
    """packed | padded."""
    tokens: torch.Tensor
    """[1, T_local] (packed) or [n_seq, L_local] (padded) int64 token ids."""
    position_ids: torch.Tensor
    """Same shape: position within its own sequence (restarts at 0 per sequence)."""
    packed_seq_params: object | None
    """megatron.core.packed_seq_params.PackedSeqParams for the packed layout, None for padded."""
    rows: ResponseRows
    """Hidden-state rows the response-only LM head scores, with targets and sequence ids."""
    chosen_tokens: torch.Tensor
    """[n_pairs] int64: scored response tokens of the chosen response (same for short and long)."""
    rejected_tokens: torch.Tensor
    """[n_pairs] int64: scored response tokens of the rejected response."""
    reference_logps: dict[str, torch.Tensor]
    """"ref_<role>_logps" -> [n_pairs] fp32, for the roles the objective's reference needs."""
    seq_len_tokens: int
    """Full (pre-CP) length of the model input's sequence dimension: T (packed) or L (padded)."""
    num_rows: int
    """Batch dimension of the model input: 1 (packed) or n_seq (padded)."""
    num_real_tokens: int
    """Tokens of all sequences before padding (all CP ranks together)."""
    num_padded_tokens: int
    """Tokens the model processes including padding (all CP ranks together): T or n_seq * L."""
    num_response_tokens: int
    """Response tokens scored by the head (all CP ranks together)."""

    @property
    def num_pairs(self) -> int:
        return len(self.sample_ids)

    @property
    def num_sequences(self) -> int:
        return self.num_pairs * len(self.roles)

    def to(self, device: torch.device | str) -> MicroBatch:
        """A copy with the model inputs and statistics on `device`."""
        packed = self.packed_seq_params
        if packed is not None:
            packed = dataclasses.replace(packed, **{
                name: getattr(packed, name).to(device, non_blocking=True)
                for name in ("cu_seqlens_q", "cu_seqlens_kv", "cu_seqlens_q_padded", "cu_seqlens_kv_padded")})
        return dataclasses.replace(
            self,
            tokens=self.tokens.to(device, non_blocking=True),
            position_ids=self.position_ids.to(device, non_blocking=True),
            packed_seq_params=packed,
            rows=self.rows.to(device),
            chosen_tokens=self.chosen_tokens.to(device, non_blocking=True),
            rejected_tokens=self.rejected_tokens.to(device, non_blocking=True),
            reference_logps={key: value.to(device, non_blocking=True) for key, value in self.reference_logps.items()},
        )

    def sequence_logps_by_role(self, sequence_logps: torch.Tensor) -> dict[str, torch.Tensor]:
        """[n_seq] per-sequence sums -> {"<role>_logps": [n_pairs]} (the objective's batch_stats keys)."""
        if sequence_logps.shape != (self.num_sequences,):
            raise ValueError(f"expected {self.num_sequences} per-sequence log-prob sums "
                             f"({self.num_pairs} pairs x roles {self.roles}), got shape {list(sequence_logps.shape)}")
        by_pair = sequence_logps.view(self.num_pairs, len(self.roles))  # [n_pairs, n_roles]
        return {logps_key(role): by_pair[:, j] for j, role in enumerate(self.roles)}

    def batch_stats(self, sequence_logps: torch.Tensor) -> dict[str, torch.Tensor]:
        """Everything `objectives.objective_loss` reads for this micro-batch, from [n_seq] policy sums."""
        return {**self.sequence_logps_by_role(sequence_logps), **self.reference_logps,
                "chosen_tokens": self.chosen_tokens, "rejected_tokens": self.rejected_tokens}


# ------------------------------------------------------------------------------------- validation
def _sample_id(sample: Mapping, index: int) -> str:
    return str(sample.get("id", f"<sample {index} without id>"))


def _role_arrays(sample: Mapping, role: str, where: str, vocab_size: int | None) -> tuple[list[int], list[int]]:
    ids_key, mask_key = f"{role}_input_ids", f"{role}_loss_mask"
    if ids_key not in sample or mask_key not in sample:
        raise ValueError(f"{where}: the objective scores {role!r} but the sample has no {ids_key!r}/{mask_key!r}; "
                         "tokenize the pairs with that role (megatron_solopo.data.tokenization)")
    input_ids, loss_mask = [int(t) for t in sample[ids_key]], [int(m) for m in sample[mask_key]]
    if len(input_ids) != len(loss_mask) or len(input_ids) < 2:
        raise ValueError(f"{where}: {ids_key} has {len(input_ids)} tokens and {mask_key} {len(loss_mask)}; they "
                         "must have the same length >= 2 (a prompt and a response)")
    if any(m not in (0, 1) for m in loss_mask):
        raise ValueError(f"{where}: {mask_key} must hold only 0/1, got values {sorted(set(loss_mask))}")
    if loss_mask[0]:
        raise ValueError(f"{where}: {mask_key}[0] is 1, but the first token has no previous position to predict it "
                         "from; every sequence must start with at least one prompt token")
    if not any(loss_mask):
        raise ValueError(f"{where}: {role} has no response token ({mask_key} is all 0); filter the pair out")
    if vocab_size is not None and not all(0 <= t < vocab_size for t in input_ids):
        bad = [t for t in input_ids if not 0 <= t < vocab_size][:5]
        raise ValueError(f"{where}: {ids_key} holds token ids outside the model's vocabulary [0, {vocab_size}): "
                         f"{bad}; the tokenizer does not match the model")
    return input_ids, loss_mask


def _response_counts(arrays: Mapping[str, tuple[list[int], list[int]]], roles_of_kind: Sequence[str],
                     kind: str, where: str) -> int:
    counts = {role: sum(arrays[role][1]) for role in roles_of_kind if role in arrays}
    if not counts:  # scoring micro-batches may hold only chosen (or only rejected) sequences
        return 0
    if len(set(counts.values())) > 1:
        raise ValueError(f"{where}: the {kind} response has different token counts across contexts {counts}; the "
                         "objective assumes the same response tokens under x_short and x_long (re-tokenize)")
    return next(iter(counts.values()))


def _reference_value(sample: Mapping, role: str, where: str) -> float:
    key = logps_key(role, reference=True)
    if key not in sample or sample[key] is None:
        raise ValueError(f"{where}: the objective needs the reference log-prob sum {key!r}, which the sample does "
                         "not carry; run `solopo precompute-ref` (train.reference=precomputed) or use "
                         "train.reference=online")
    value = float(sample[key])
    if not math.isfinite(value) or value > 0:
        raise ValueError(f"{where}: {key}={value} is not a finite log-probability sum (<= 0)")
    return value


# ------------------------------------------------------------------------------------- assembling
@dataclasses.dataclass
class _Flat:
    """A micro-batch's sequences before CP sharding: [rows, width] tensors."""

    tokens: torch.Tensor
    positions: torch.Tensor
    labels: torch.Tensor  # next token of the same sequence (0 where none)
    scored: torch.Tensor  # bool: the next token is a response token
    segments: torch.Tensor  # sequence index, -1 on padding
    padded_lengths: list[int]


def _pad_len(length: int, multiple: int) -> int:
    return -(-length // multiple) * multiple


def _sequence_pieces(input_ids: list[int], loss_mask: list[int], width: int, pad_token_id: int, seq_idx: int):
    n = len(input_ids)
    tokens = torch.full((width,), pad_token_id, dtype=torch.long)
    tokens[:n] = torch.tensor(input_ids, dtype=torch.long)
    labels = torch.zeros(width, dtype=torch.long)
    labels[:n - 1] = tokens[1:n]
    scored = torch.zeros(width, dtype=torch.bool)
    scored[:n - 1] = torch.tensor(loss_mask[1:], dtype=torch.bool)
    segments = torch.full((width,), -1, dtype=torch.long)
    segments[:n] = seq_idx
    return tokens, torch.arange(width), labels, scored, segments


def _assemble(sequences: list[tuple[list[int], list[int]]], layout: str, multiple: int, pad_token_id: int) -> _Flat:
    if layout == "packed":
        widths = [_pad_len(len(ids), multiple) for ids, _ in sequences]
        pieces = [_sequence_pieces(ids, mask, w, pad_token_id, k) for k, ((ids, mask), w) in enumerate(zip(sequences, widths))]
        cat = [torch.cat(parts).unsqueeze(0) for parts in zip(*pieces)]  # each [1, T]
        return _Flat(*cat, padded_lengths=widths)
    width = _pad_len(max(len(ids) for ids, _ in sequences), multiple)
    pieces = [_sequence_pieces(ids, mask, width, pad_token_id, k) for k, (ids, mask) in enumerate(sequences)]
    stacked = [torch.stack(parts) for parts in zip(*pieces)]  # each [n_seq, L]
    return _Flat(*stacked, padded_lengths=[width] * len(sequences))


def _shard(flat: _Flat, layout: str, cp_rank: int, cp_size: int, cu_seqlens: list[int]) -> _Flat:
    if cp_size == 1:
        return flat
    if layout == "packed":
        shard = lambda x: cp_shard_thd(x, cu_seqlens, seq_dim=1, cp_rank=cp_rank, cp_size=cp_size)
    else:
        shard = lambda x: cp_shard(x, seq_dim=1, cp_rank=cp_rank, cp_size=cp_size)
    return _Flat(shard(flat.tokens), shard(flat.positions), shard(flat.labels), shard(flat.scored),
                 shard(flat.segments), flat.padded_lengths)


def _response_rows(local: _Flat, num_sequences: int, parallel: ParallelConfig) -> ResponseRows:
    """Head rows in the decoder's [s_local, b] order (flat index s * b + b_idx)."""
    scored_sb = local.scored.t().reshape(-1)  # [b, s] -> [s, b] -> flat
    row_index = scored_sb.nonzero().squeeze(1)
    targets = local.labels.t().reshape(-1)[row_index]
    segments = local.segments.t().reshape(-1)[row_index]
    rows = ResponseRows(row_index=row_index, targets=targets, segments=segments, num_sequences=num_sequences)
    if parallel.sequence_parallel:
        _add_sequence_parallel_tables(rows, scored_sb.numel(), parallel.tp)
    return rows


def _add_sequence_parallel_tables(rows: ResponseRows, num_flat_rows: int, tp: int) -> None:
    """Per-TP-rank row selections (padded to the same count) and targets/segments in gathered order."""
    if num_flat_rows % tp:
        raise ValueError(f"sequence parallelism splits {num_flat_rows} rows over tp={tp} ranks unevenly; "
                         "pad with pad_multiple(parallel)")
    per_rank = num_flat_rows // tp
    owner = rows.row_index // per_rank
    counts = torch.bincount(owner, minlength=tp)
    width = int(counts.max()) if rows.row_index.numel() else 0
    local_index = torch.zeros(tp, width, dtype=torch.long)
    targets = torch.zeros(tp, width, dtype=torch.long)
    segments = torch.full((tp, width), rows.num_sequences, dtype=torch.long)  # num_sequences = padding bin
    for rank in range(tp):
        mine = owner == rank
        n = int(counts[rank])
        local_index[rank, :n] = rows.row_index[mine] - rank * per_rank
        targets[rank, :n] = rows.targets[mine]
        segments[rank, :n] = rows.segments[mine]
    rows.sp_local_index, rows.sp_targets, rows.sp_segments = local_index, targets.reshape(-1), segments.reshape(-1)


def _packed_seq_params(padded_lengths: list[int]):
    from megatron.core.packed_seq_params import PackedSeqParams

    cu = torch.tensor([0, *itertools.accumulate(padded_lengths)], dtype=torch.int32)
    return PackedSeqParams(qkv_format="thd", cu_seqlens_q=cu, cu_seqlens_kv=cu.clone(), cu_seqlens_q_padded=cu.clone(),
                           cu_seqlens_kv_padded=cu.clone(), max_seqlen_q=max(padded_lengths),
                           max_seqlen_kv=max(padded_lengths))


def _build_microbatch(samples: Sequence[Mapping], first_index: int, roles: tuple[str, ...],
                      reference_roles: tuple[str, ...], collator: Collator, multiple: int) -> MicroBatch:
    sequences, chosen, rejected, refs, ids = [], [], [], {logps_key(r, True): [] for r in reference_roles}, []
    for offset, sample in enumerate(samples):
        sample_id = _sample_id(sample, first_index + offset)
        where = f"sample {sample_id!r}"
        arrays = {role: _role_arrays(sample, role, where, collator.vocab_size) for role in roles}
        chosen.append(_response_counts(arrays, _CHOSEN_ROLES, "chosen", where))
        rejected.append(_response_counts(arrays, _REJECTED_ROLES, "rejected", where))
        for role in reference_roles:
            refs[logps_key(role, True)].append(_reference_value(sample, role, where))
        sequences.extend(arrays[role] for role in roles)
        ids.append(sample_id)
    layout, parallel = collator.layout, collator.parallel
    flat = _assemble(sequences, layout, multiple, collator.pad_token_id)
    cu = [0, *itertools.accumulate(flat.padded_lengths)]
    local = _shard(flat, layout, parallel.cp_rank, parallel.config.cp, cu)
    return MicroBatch(
        sample_ids=ids, roles=roles, layout=layout, tokens=local.tokens, position_ids=local.positions,
        packed_seq_params=_packed_seq_params(flat.padded_lengths) if layout == "packed" else None,
        rows=_response_rows(local, len(sequences), parallel.config),
        chosen_tokens=torch.tensor(chosen, dtype=torch.long), rejected_tokens=torch.tensor(rejected, dtype=torch.long),
        reference_logps={key: torch.tensor(values, dtype=torch.float32) for key, values in refs.items()},
        seq_len_tokens=flat.tokens.size(1), num_rows=flat.tokens.size(0),
        num_real_tokens=sum(len(ids_) for ids_, _ in sequences), num_padded_tokens=flat.tokens.numel(),
        num_response_tokens=int(flat.scored.sum()),
    )


# ------------------------------------------------------------------------------------- the collator
@dataclasses.dataclass(frozen=True)
class Collator:
    """Turns tokenized pairs into this rank's micro-batches with the settings fixed for a whole run:
    built once (a run: `Collator.for_model`), then `microbatches(samples, objective)` at every step."""

    parallel: ParallelContext
    """This rank's context (initialize_parallel's; offline, `ParallelContext.for_rank(config, cp_rank=...)`):
    its CP rank selects the zigzag shard."""
    layout: str
    """packed | padded (`layout_for_backend`)."""
    micro_batch_pairs: int
    """Preference pairs per micro-batch (all roles of a pair stay in one micro-batch)."""
    pad_token_id: int = 0
    """Token id of the padding (never scored)."""
    vocab_size: int | None = None
    """If given, every token id is checked against it (a tokenizer that does not match the model)."""
    pad_to_multiple_of: int = 1
    """Extra padding multiple per sequence: the FP8 GEMMs' token multiple (`for_model` sets it)."""

    def __post_init__(self) -> None:
        require_parallel_context(self.parallel, "collate_microbatches")
        if self.layout not in LAYOUTS:
            raise ValueError(f"layout={self.layout!r} is not one of {LAYOUTS} (see layout_for_backend)")
        pairs = self.micro_batch_pairs
        if isinstance(pairs, bool) or not isinstance(pairs, int) or pairs < 1:
            raise ValueError(f"micro_batch_pairs must be a positive integer, got {pairs!r}")

    @classmethod
    def for_model(cls, model: ModelConfig, parallel: ParallelContext, layout: str, micro_batch_pairs: int, *,
                  pad_token_id: int, vocab_size: int | None) -> Collator:
        """The collator of a run of `model`: its sequences padded to the token multiple that the model's FP8
        recipe needs on every rank's shard (`fp8_seq_multiple`; 1 without FP8)."""
        return cls(parallel, layout, micro_batch_pairs, pad_token_id=pad_token_id, vocab_size=vocab_size,
                   pad_to_multiple_of=fp8_seq_multiple(model.fp8, model.fp8_recipe))

    def microbatches(self, samples: Sequence[Mapping], objective: ObjectiveConfig) -> list[MicroBatch]:
        """This data-parallel rank's pairs for one optimizer step (tokenized samples, see the module
        docstring; a multiple of micro_batch_pairs), split into micro-batches of every role the objective
        scores, with its reference log-probs; on the CPU (the step moves them to the device)."""
        roles = sequence_roles(objective)
        reference_roles = tuple(role for role in SEQUENCES if role in required_reference_sequences(objective))
        return self._split(samples, roles, reference_roles, allow_partial=False)

    def po_term_microbatches(self, samples: Sequence[Mapping], objective: ObjectiveConfig) -> list[MicroBatch]:
        """Like `microbatches`, with only the sequences solo mode's PO term reads (x_short chosen and
        rejected, and their reference log-probs): the RA gradient share's PO-only pass
        (`step.train_step(po_microbatches=...)`) then skips the long sequences, whose gradient it does not need."""
        references = required_reference_sequences(objective)
        reference_roles = tuple(role for role in PO_TERM_SEQUENCES if role in references)
        return self._split(samples, PO_TERM_SEQUENCES, reference_roles, allow_partial=False)

    def scoring_microbatches(self, samples: Sequence[Mapping], roles: Sequence[str]) -> list[MicroBatch]:
        """Micro-batches for `step.forward_only` (reference precompute, evaluation): the given roles only.

        roles: which sequences to score, e.g. sorted(objectives.required_reference_sequences(cfg)) for the
        reference pass (LongPO's reference scores the SHORT sequences while the policy trains on the long
        ones). No reference log-probs are read. The last micro-batch may hold fewer than
        micro_batch_pairs pairs.
        """
        unknown = [role for role in roles if role not in SEQUENCES]
        if unknown or not roles:
            raise ValueError(f"roles must be a non-empty subset of {SEQUENCES}, got {list(roles)}")
        ordered = tuple(role for role in SEQUENCES if role in set(roles))
        return self._split(samples, ordered, (), allow_partial=True)

    def _split(self, samples: Sequence[Mapping], roles: tuple[str, ...], reference_roles: tuple[str, ...],
               allow_partial: bool) -> list[MicroBatch]:
        step = self.micro_batch_pairs
        if not samples or (len(samples) % step and not allow_partial):
            raise ValueError(f"{len(samples)} samples cannot be split into micro-batches of {step} pairs; "
                             "give this rank a multiple of micro_batch_pairs (TrainConfig.num_microbatches)")
        multiple = pad_multiple(self.parallel, self.pad_to_multiple_of)
        return [_build_microbatch(samples[start:start + step], start, roles, reference_roles, self, multiple)
                for start in range(0, len(samples), step)]


def collate_microbatches(samples: Sequence[Mapping], objective: ObjectiveConfig, parallel: ParallelContext,
                         layout: str, micro_batch_pairs: int, **options) -> list[MicroBatch]:
    """`Collator(parallel, layout, micro_batch_pairs, **options).microbatches(samples, objective)` in one
    call; options: the Collator's pad_token_id, vocab_size, pad_to_multiple_of. Returns
    len(samples) // micro_batch_pairs micro-batches."""
    return Collator(parallel, layout, micro_batch_pairs, **options).microbatches(samples, objective)


def collate_scoring_microbatches(samples: Sequence[Mapping], roles: Sequence[str], parallel: ParallelContext,
                                 layout: str, micro_batch_pairs: int, **options) -> list[MicroBatch]:
    """`Collator(parallel, layout, micro_batch_pairs, **options).scoring_microbatches(samples, roles)` in
    one call (options as in collate_microbatches)."""
    return Collator(parallel, layout, micro_batch_pairs, **options).scoring_microbatches(samples, roles)
