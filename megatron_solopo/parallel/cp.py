"""Context-parallel (CP) sharding: Megatron's load-balanced ("zigzag") layout and CP reductions.

Layout. A sequence of S tokens is cut into 2*cp equal chunks; CP rank r holds chunks r and
2*cp-1-r, concatenated in that order (cp=2, S=16: rank 0 holds tokens 0-3 and 12-15, rank 1 holds
4-11). Under causal attention chunk j costs ~j units of work, so every rank gets the same amount
(r + 2cp-1-r = 2cp-1). This is the layout of `megatron.core.utils.get_batch_on_this_cp_rank`
(sbhd/bshd) and of Transformer Engine's `thd_get_partitioned_indices` for packed (THD) batches,
where every packed sequence is cut and distributed on its own. The ring attention in
`megatron_solopo.model.attention` expects exactly this layout (docs/parallelism.md).

Functions (seq_dim is the token dimension: 0 for [s, b, ...] activations, 1 for [b, s] batches):
    cp_shard(x, seq_dim, cp_rank, cp_size)                       -> this rank's shard
    cp_unshard([shard_0, ..., shard_{cp-1}], seq_dim)            -> the full tensor (inverse)
    cp_shard_thd / cp_unshard_thd                                -> the same with cu_seqlens_padded
    cp_gather(x, seq_dim, cp_group, cu_seqlens_padded=None)      -> collective unshard (autograd)
    cp_all_reduce_sum(x, cp_group)                               -> SUM over CP, identity backward
    zigzag_token_indices / thd_zigzag_token_indices              -> global positions of a shard

Padding: every (packed) sequence length must be a multiple of 2*cp; the data path pads each one.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
import torch.distributed as dist

__all__ = [
    "cp_shard", "cp_unshard", "cp_shard_thd", "cp_unshard_thd", "cp_gather", "cp_all_reduce_sum",
    "zigzag_chunk_ids", "zigzag_token_indices", "thd_zigzag_token_indices", "check_cp_divisible",
]


def zigzag_chunk_ids(cp_rank: int, cp_size: int) -> tuple[int, int]:
    """The two of 2*cp_size chunks that CP rank `cp_rank` holds: (cp_rank, 2*cp_size-1-cp_rank)."""
    if cp_size < 1 or not 0 <= cp_rank < cp_size:
        raise ValueError(f"cp_rank={cp_rank} is not in [0, cp_size={cp_size})")
    return cp_rank, 2 * cp_size - 1 - cp_rank


def check_cp_divisible(seq_len_tokens: int, cp_size: int, what: str = "sequence length") -> int:
    """Returns the chunk length seq_len / (2*cp); error naming the fix when it does not divide."""
    if seq_len_tokens % (2 * cp_size):
        raise ValueError(
            f"{what} {seq_len_tokens} is not a multiple of 2*cp = {2 * cp_size}: context parallelism cuts "
            f"every sequence into 2*cp equal chunks; pad each sequence to a multiple of {2 * cp_size}")
    return seq_len_tokens // (2 * cp_size)


def zigzag_token_indices(seq_len_tokens: int, cp_rank: int, cp_size: int,
                         device: torch.device | str | None = None) -> torch.Tensor:
    """Global positions (int64, ascending) of the tokens CP rank `cp_rank` holds, in shard order."""
    chunk = check_cp_divisible(seq_len_tokens, cp_size)
    first, second = zigzag_chunk_ids(cp_rank, cp_size)
    return torch.cat([torch.arange(first * chunk, (first + 1) * chunk, device=device),
                      torch.arange(second * chunk, (second + 1) * chunk, device=device)])


def _cu_list(cu_seqlens_padded: torch.Tensor | Sequence[int]) -> list[int]:
    cu = cu_seqlens_padded.tolist() if isinstance(cu_seqlens_padded, torch.Tensor) else list(cu_seqlens_padded)
    if isinstance(cu[0], list):  # Megatron batches carry cu_seqlens as [1, n+1]
        if len(cu) != 1:
            raise ValueError(f"cu_seqlens_padded must be 1-D (or [1, n+1]); got {len(cu)} rows")
        cu = cu[0]
    if cu[0] != 0 or any(b < a for a, b in zip(cu, cu[1:])):
        raise ValueError(f"cu_seqlens_padded must start at 0 and be non-decreasing, got {cu}")
    return [int(x) for x in cu]


def thd_zigzag_token_indices(cu_seqlens_padded: torch.Tensor | Sequence[int], cp_rank: int, cp_size: int,
                             device: torch.device | str | None = None) -> torch.Tensor:
    """Global positions of a packed (THD) shard: each sequence of the pack zigzag-sharded on its own.

    `cu_seqlens_padded` holds the cumulative padded lengths of the FULL pack (before sharding), as in
    Megatron's PackedSeqParams; every padded length must be a multiple of 2*cp_size.
    """
    cu = _cu_list(cu_seqlens_padded)
    pieces = []
    for seq_idx, (start, end) in enumerate(zip(cu[:-1], cu[1:])):
        check_cp_divisible(end - start, cp_size, what=f"packed sequence {seq_idx} (padded) length")
        pieces.append(start + zigzag_token_indices(end - start, cp_rank, cp_size, device=device))
    if not pieces:
        return torch.zeros(0, dtype=torch.long, device=device)
    return torch.cat(pieces)


def cp_shard(tensor: torch.Tensor, seq_dim: int, cp_rank: int, cp_size: int) -> torch.Tensor:
    """This CP rank's shard of `tensor` along `seq_dim`: chunks cp_rank and 2*cp_size-1-cp_rank.

    Identical to `megatron.core.utils.get_batch_on_this_cp_rank` for unpacked batches (seq_dim=1 for
    [b, s] tokens/labels/masks, seq_dim=0 for [s, b, h, d] activations). Returns a new tensor (the
    input itself when cp_size == 1).
    """
    if cp_size == 1:
        return tensor
    seq_dim = seq_dim % tensor.dim()
    chunk = check_cp_divisible(tensor.size(seq_dim), cp_size)
    first, second = zigzag_chunk_ids(cp_rank, cp_size)
    return torch.cat([tensor.narrow(seq_dim, first * chunk, chunk),
                      tensor.narrow(seq_dim, second * chunk, chunk)], dim=seq_dim)


def cp_unshard(shards: Sequence[torch.Tensor], seq_dim: int) -> torch.Tensor:
    """Inverse of cp_shard: stitches the shards of ALL CP ranks (listed by CP rank) back in order."""
    cp_size = len(shards)
    if cp_size == 1:
        return shards[0]
    seq_dim = seq_dim % shards[0].dim()
    local_len = shards[0].size(seq_dim)
    if local_len % 2 or any(s.size(seq_dim) != local_len for s in shards):
        raise ValueError(f"cp_unshard: shards must have equal, even lengths along dim {seq_dim}; got "
                         f"{[s.size(seq_dim) for s in shards]}")
    chunk = local_len // 2
    chunks: list[torch.Tensor | None] = [None] * (2 * cp_size)
    for rank, shard in enumerate(shards):
        first, second = zigzag_chunk_ids(rank, cp_size)
        chunks[first] = shard.narrow(seq_dim, 0, chunk)
        chunks[second] = shard.narrow(seq_dim, chunk, chunk)
    return torch.cat(chunks, dim=seq_dim)


def cp_shard_thd(tensor: torch.Tensor, cu_seqlens_padded: torch.Tensor | Sequence[int], seq_dim: int,
                 cp_rank: int, cp_size: int) -> torch.Tensor:
    """This rank's shard of a packed (THD) tensor: every sequence of the pack sharded on its own.

    The tensor's `seq_dim` must have length cu_seqlens_padded[-1]. Matches Transformer Engine's
    `thd_get_partitioned_indices` (used by Megatron's get_batch_on_this_cp_rank with cu_seqlens).
    """
    if cp_size == 1:
        return tensor
    seq_dim = seq_dim % tensor.dim()
    cu = _cu_list(cu_seqlens_padded)
    if tensor.size(seq_dim) != cu[-1]:
        raise ValueError(f"cp_shard_thd: dim {seq_dim} has {tensor.size(seq_dim)} tokens but "
                         f"cu_seqlens_padded[-1] = {cu[-1]}; pad the pack to the last boundary")
    index = thd_zigzag_token_indices(cu, cp_rank, cp_size, device=tensor.device)
    return tensor.index_select(seq_dim, index)


def cp_unshard_thd(shards: Sequence[torch.Tensor], cu_seqlens_padded: torch.Tensor | Sequence[int],
                   seq_dim: int) -> torch.Tensor:
    """Inverse of cp_shard_thd: the full pack from the shards of all CP ranks (listed by CP rank)."""
    cp_size = len(shards)
    if cp_size == 1:
        return shards[0]
    seq_dim = seq_dim % shards[0].dim()
    cu = _cu_list(cu_seqlens_padded)
    if any(s.size(seq_dim) * cp_size != cu[-1] for s in shards):
        raise ValueError(f"cp_unshard_thd: each shard must hold cu_seqlens_padded[-1]/cp = {cu[-1] // cp_size} "
                         f"tokens along dim {seq_dim}; got {[s.size(seq_dim) for s in shards]}")
    stacked = torch.cat(list(shards), dim=seq_dim)  # shard-major order
    positions = torch.cat([thd_zigzag_token_indices(cu, r, cp_size, device=stacked.device)
                           for r in range(cp_size)])
    inverse = torch.empty_like(positions)
    inverse[positions] = torch.arange(positions.numel(), device=positions.device)
    return stacked.index_select(seq_dim, inverse)


class _AllReduceSumIdentityBackward(torch.autograd.Function):
    """Forward: all-reduce SUM over the group. Backward: the incoming gradient unchanged."""

    @staticmethod
    def forward(ctx, tensor: torch.Tensor, group) -> torch.Tensor:
        reduced = tensor.clone()
        dist.all_reduce(reduced, op=dist.ReduceOp.SUM, group=group)
        return reduced

    @staticmethod
    def backward(ctx, grad_output: torch.Tensor):
        return grad_output, None


def cp_all_reduce_sum(tensor: torch.Tensor, cp_group) -> torch.Tensor:
    """Sum of `tensor` over the CP group, differentiable: every CP rank then holds the same value.

    The backward is the identity, which is the gradient of a loss that every CP rank computes
    identically from the summed value (the convention of this project: per-sequence log-prob sums
    are all-reduced over CP, the loss is the same number on every CP rank, and each rank
    back-propagates it into its own tokens). Do not sum such a loss over CP ranks again.
    """
    if cp_group is None or dist.get_world_size(cp_group) == 1:
        return tensor
    return _AllReduceSumIdentityBackward.apply(tensor, cp_group)


class _CPGather(torch.autograd.Function):
    """Forward: all-gather the shards and unshard. Backward: this rank's shard of the gradient."""

    @staticmethod
    def forward(ctx, tensor: torch.Tensor, seq_dim: int, group, cu_seqlens_padded) -> torch.Tensor:
        cp_size = dist.get_world_size(group)
        shards = [torch.empty_like(tensor) for _ in range(cp_size)]
        dist.all_gather(shards, tensor.contiguous(), group=group)
        ctx.seq_dim, ctx.cu = seq_dim, cu_seqlens_padded
        ctx.cp_rank, ctx.cp_size = dist.get_rank(group), cp_size
        if cu_seqlens_padded is None:
            return cp_unshard(shards, seq_dim)
        return cp_unshard_thd(shards, cu_seqlens_padded, seq_dim)

    @staticmethod
    def backward(ctx, grad_output: torch.Tensor):
        if ctx.cu is None:
            grad = cp_shard(grad_output, ctx.seq_dim, ctx.cp_rank, ctx.cp_size)
        else:
            grad = cp_shard_thd(grad_output, ctx.cu, ctx.seq_dim, ctx.cp_rank, ctx.cp_size)
        return grad, None, None, None


def cp_gather(tensor: torch.Tensor, seq_dim: int, cp_group,
              cu_seqlens_padded: torch.Tensor | Sequence[int] | None = None) -> torch.Tensor:
    """The full sequence on every CP rank from each rank's shard (collective cp_unshard).

    With `cu_seqlens_padded` the shards are packed (THD) shards. Differentiable under the same
    convention as cp_all_reduce_sum: the backward returns this rank's shard of the gradient, which is
    right when every CP rank computes the same loss from the gathered tensor.
    """
    if cp_group is None or dist.get_world_size(cp_group) == 1:
        return tensor
    return _CPGather.apply(tensor, seq_dim % tensor.dim(), cp_group, cu_seqlens_padded)
