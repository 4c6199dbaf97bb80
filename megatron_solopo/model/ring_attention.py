"""Ring attention for context parallelism (CP > 1) on the zigzag layout of `megatron_solopo.parallel.cp`.

`ring_attention` is a custom autograd Function: K/V travel around the CP group by point-to-point
send/recv overlapped with the current block's compute; partial outputs merge by log-sum-exp; the
backward recomputes each block from the saved global output and log-sum-exp (FlashAttention-2
backward) and sends the K/V gradient accumulators around the ring. No autograd graph ever spans a
communication. Per-block kernels return (out, lse): `aten._scaled_dot_product_flash_attention`
on CUDA (bf16/fp16, head dim % 8 == 0, <= 256), `aten._scaled_dot_product_flash_attention_for_cpu`
on CPU, else a float32 math kernel. docs/parallelism.md derives the block schedule and its cost.
`megatron_solopo.model.attention.SDPACoreAttention` calls it under CP.
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Iterator, Sequence

import torch
import torch.distributed as dist

from megatron_solopo.parallel.cp import check_cp_divisible

__all__ = ["BLOCK_KERNELS", "ring_attention"]


# ----------------------------------------------------------------------------------------------
# Per-block kernels: q [b, hq, sq, d], k/v [b, hkv, sk, d] -> out [b, hq, sq, d], lse [b, hq, sq].
# lse is the natural-log sum of exp(scale * q.k) over the block's visible keys (float32).
# backward(dout, q, k, v, out, lse, ...) takes the GLOBAL (merged) out and lse of the q rows, which
# makes the per-block gradients exact pieces of the full attention gradient (FlashAttention-2).
# ----------------------------------------------------------------------------------------------


class _MathKernel:
    """Float32 reference kernel; O(sq * sk) memory per block. Works on any device and head dim."""

    name = "math"

    @staticmethod
    def _scores(q, k, causal: bool, scale: float):
        b, hq, sq, d = q.shape
        hkv, sk = k.shape[1], k.shape[2]
        # head i of q uses kv head i // groups (Megatron's repeat_interleave order): [b, hkv, g, sq, d]
        q5 = q.float().reshape(b, hkv, hq // hkv, sq, d)
        scores = torch.einsum("bkgqd,bksd->bkgqs", q5, k.float()) * scale
        if causal:
            hidden = torch.ones(sq, sk, dtype=torch.bool, device=q.device).triu(1)
            scores = scores.masked_fill(hidden, float("-inf"))
        return q5, scores

    def forward(self, q, k, v, causal: bool, scale: float):
        b, hq, sq, d = q.shape
        _, scores = self._scores(q, k, causal, scale)
        lse = torch.logsumexp(scores, dim=-1)  # [b, hkv, g, sq]
        probs = torch.exp(scores - lse.unsqueeze(-1))
        out = torch.einsum("bkgqs,bksd->bkgqd", probs, v.float())
        return out.reshape(b, hq, sq, d), lse.reshape(b, hq, sq), None

    def backward(self, dout, q, k, v, out, lse, causal: bool, scale: float, meta):
        b, hq, sq, d = q.shape
        hkv = k.shape[1]
        q5, scores = self._scores(q, k, causal, scale)
        lse5 = lse.float().reshape(b, hkv, hq // hkv, sq, 1)
        probs = torch.exp(scores - lse5)  # this block's share of the global softmax
        dout5 = dout.float().reshape(b, hkv, hq // hkv, sq, d)
        delta = (dout5 * out.float().reshape(b, hkv, hq // hkv, sq, d)).sum(-1, keepdim=True)
        dv = torch.einsum("bkgqs,bkgqd->bksd", probs, dout5)
        dprobs = torch.einsum("bkgqd,bksd->bkgqs", dout5, v.float())
        dscores = probs * (dprobs - delta)
        dq = torch.einsum("bkgqs,bksd->bkgqd", dscores, k.float()) * scale
        dk = torch.einsum("bkgqs,bkgqd->bksd", dscores, q5) * scale
        return dq.reshape(b, hq, sq, d), dk, dv


class _CpuFlashKernel:
    """aten's CPU flash attention: memory-linear, returns lse, native GQA (checked in the tests)."""

    name = "cpu_flash"

    def forward(self, q, k, v, causal: bool, scale: float):
        out, lse = torch.ops.aten._scaled_dot_product_flash_attention_for_cpu(
            q, k, v, 0.0, causal, scale=scale)
        return out, lse, None

    def backward(self, dout, q, k, v, out, lse, causal: bool, scale: float, meta):
        return torch.ops.aten._scaled_dot_product_flash_attention_for_cpu_backward(
            dout.to(q.dtype).contiguous(), q, k, v, out.to(q.dtype).contiguous(), lse.contiguous(),
            0.0, causal, scale=scale)


class _CudaFlashKernel:
    """aten's CUDA flash attention (FlashAttention-2). K/V heads are repeated for GQA: the aten op
    does not promise native GQA across torch versions; the repeat costs one K/V block, not [s, s]."""

    name = "cuda_flash"

    @staticmethod
    def supports(q: torch.Tensor) -> bool:
        d = q.size(-1)
        return q.is_cuda and q.dtype in (torch.float16, torch.bfloat16) and d % 8 == 0 and d <= 256

    def forward(self, q, k, v, causal: bool, scale: float):
        groups = q.size(1) // k.size(1)
        if groups > 1:
            k, v = k.repeat_interleave(groups, dim=1), v.repeat_interleave(groups, dim=1)
        out, lse, cum_q, cum_k, max_q, max_k, seed, offset, _ = (
            torch.ops.aten._scaled_dot_product_flash_attention(q, k, v, 0.0, causal, False, scale=scale))
        return out, lse, (cum_q, cum_k, max_q, max_k, seed, offset)

    def backward(self, dout, q, k, v, out, lse, causal: bool, scale: float, meta):
        b, hkv, sk, d = k.shape
        groups = q.size(1) // hkv
        if groups > 1:
            k, v = k.repeat_interleave(groups, dim=1), v.repeat_interleave(groups, dim=1)
        cum_q, cum_k, max_q, max_k, seed, offset = meta
        dq, dk, dv = torch.ops.aten._scaled_dot_product_flash_attention_backward(
            dout.to(q.dtype), q, k, v, out.to(q.dtype), lse.contiguous(), cum_q, cum_k, max_q, max_k,
            0.0, causal, seed, offset, scale=scale)
        if groups > 1:  # [b, hkv*g, sk, d] -> sum over each kv head's query group
            dk = dk.reshape(b, hkv, groups, sk, d).sum(2)
            dv = dv.reshape(b, hkv, groups, sk, d).sum(2)
        return dq, dk, dv


BLOCK_KERNELS = ("auto", "math", "cpu_flash", "cuda_flash")
"""Per-block kernels of ring_attention; `auto` picks cuda_flash / cpu_flash where they apply."""


def _pick_kernel(name: str, q: torch.Tensor):
    if name not in BLOCK_KERNELS:
        raise ValueError(f"block_kernel={name!r} is not one of {', '.join(BLOCK_KERNELS)}")
    if name == "auto":
        if _CudaFlashKernel.supports(q):
            return _CudaFlashKernel()
        return _CpuFlashKernel() if q.device.type == "cpu" else _MathKernel()
    if name == "cuda_flash" and not _CudaFlashKernel.supports(q):
        raise ValueError("block_kernel='cuda_flash' needs CUDA tensors in bf16/fp16 with head dim % 8 == 0 "
                         f"and <= 256; got {q.device.type} {q.dtype} head dim {q.size(-1)}; use 'auto'")
    if name == "cpu_flash" and q.device.type != "cpu":
        raise ValueError(f"block_kernel='cpu_flash' needs CPU tensors, got {q.device}; use 'auto'")
    return {"math": _MathKernel, "cpu_flash": _CpuFlashKernel, "cuda_flash": _CudaFlashKernel}[name]()


# ----------------------------------------------------------------------------------------------
# Ring attention on the zigzag layout
# ----------------------------------------------------------------------------------------------


@dataclasses.dataclass(frozen=True)
class _BlockTask:
    """One kernel call: local q rows [q_lo, q_hi) against the visiting K/V rows [kv_lo, kv_hi)."""

    q_lo: int
    q_hi: int
    kv_lo: int
    kv_hi: int
    causal: bool


def _step_tasks(step: int, cp_rank: int, src_rank: int, segments: Sequence[tuple[int, int]],
                causal: bool) -> Iterator[_BlockTask]:
    """Which (q, kv) blocks of one ring step are visible (derivation in docs/parallelism.md).

    Each segment [lo, hi) is one sequence's local zigzag pair: first half = chunk r, second half =
    chunk 2cp-1-r of that sequence (r = cp_rank for q, src_rank for the visiting K/V).
    step 0 (own K/V): the local order is the global order, so plain causal attention is exact.
    src < rank: K/V chunk src precedes both q chunks -> all q against the first K/V half, full;
                K/V chunk 2cp-1-src follows both q chunks -> invisible.
    src > rank: both K/V chunks (src, 2cp-1-src) lie after q chunk r and before q chunk 2cp-1-r ->
                second q half against all K/V, full.
    """
    for lo, hi in segments:
        if hi == lo:
            continue
        half = (hi - lo) // 2
        if not causal:
            yield _BlockTask(lo, hi, lo, hi, False)
        elif step == 0:
            yield _BlockTask(lo, hi, lo, hi, True)
        elif src_rank < cp_rank:
            yield _BlockTask(lo, hi, lo, lo + half, False)
        else:
            yield _BlockTask(lo + half, hi, lo, hi, False)


class _RingComm:
    """Point-to-point exchange with the ring neighbours: send to rank+1, receive from rank-1."""

    def __init__(self, group) -> None:
        self.group = group
        self.rank = dist.get_rank(group)
        self.size = dist.get_world_size(group)
        # P2POp wants global ranks; group None is the default group, whose ranks are global ones
        to_global = (lambda r: r) if group is None else (lambda r: dist.get_global_rank(group, r))
        self.next_rank = to_global((self.rank + 1) % self.size)
        self.prev_rank = to_global((self.rank - 1) % self.size)

    def start(self, tensor: torch.Tensor) -> tuple[list, torch.Tensor]:
        """Starts sending `tensor` and receiving its counterpart; returns (requests, receive buffer)."""
        received = torch.empty_like(tensor)
        ops = [dist.P2POp(dist.isend, tensor, self.next_rank, self.group),
               dist.P2POp(dist.irecv, received, self.prev_rank, self.group)]
        return dist.batch_isend_irecv(ops), received

    @staticmethod
    def finish(pending: tuple[list, torch.Tensor]) -> torch.Tensor:
        requests, received = pending
        for request in requests:
            request.wait()
        return received


def _merge_block(out: torch.Tensor, lse: torch.Tensor, task: _BlockTask,
                 block_out: torch.Tensor, block_lse: torch.Tensor) -> None:
    """out/lse[q rows] <- softmax-weighted union of what was merged so far and this block (fp32)."""
    rows = slice(task.q_lo, task.q_hi)
    old_lse = lse[:, :, rows]
    new_lse = torch.logaddexp(old_lse, block_lse.float())
    out[:, :, rows] = (out[:, :, rows] * torch.exp(old_lse - new_lse).unsqueeze(-1)
                       + block_out.float() * torch.exp(block_lse.float() - new_lse).unsqueeze(-1))
    lse[:, :, rows] = new_lse


def _ring_forward(q, k, v, comm: _RingComm | None, causal, segments, scale, kernel):
    """Returns out [b, hq, s, d] (q dtype), lse [b, hq, s] (fp32), and per-block kernel metadata."""
    cp_rank, cp_size = (comm.rank, comm.size) if comm else (0, 1)
    out = torch.zeros(q.shape, dtype=torch.float32, device=q.device)
    lse = torch.full(q.shape[:-1], float("-inf"), dtype=torch.float32, device=q.device)
    kv = torch.stack([k, v]).contiguous()  # [2, b, hkv, s, d]: one message per step
    metas = []
    for step in range(cp_size):
        pending = comm.start(kv) if step + 1 < cp_size else None  # next block travels during compute
        src_rank = (cp_rank - step) % cp_size
        step_metas = []
        for task in _step_tasks(step, cp_rank, src_rank, segments, causal):
            block_out, block_lse, meta = kernel.forward(
                q[:, :, task.q_lo:task.q_hi], kv[0][:, :, task.kv_lo:task.kv_hi],
                kv[1][:, :, task.kv_lo:task.kv_hi], task.causal, scale)
            _merge_block(out, lse, task, block_out, block_lse)
            step_metas.append(meta)
        metas.append(step_metas)
        if pending is not None:
            kv = comm.finish(pending)
    return out.to(q.dtype), lse, metas


def _ring_backward(dout, q, k, v, out, lse, metas, comm: _RingComm | None, causal, segments, scale, kernel):
    """dQ stays local; each K/V block's gradient accumulator travels with the ring and returns home."""
    cp_rank, cp_size = (comm.rank, comm.size) if comm else (0, 1)
    dq = torch.zeros(q.shape, dtype=torch.float32, device=q.device)
    kv = torch.stack([k, v]).contiguous()
    dkv_pending = None
    dkv = None
    for step in range(cp_size):
        kv_pending = comm.start(kv) if step + 1 < cp_size else None
        src_rank = (cp_rank - step) % cp_size
        dkv = torch.zeros(kv.shape, dtype=torch.float32, device=q.device)  # [2, b, hkv, s, d]
        tasks = _step_tasks(step, cp_rank, src_rank, segments, causal)
        for task, meta in zip(tasks, metas[step], strict=True):
            rows, cols = slice(task.q_lo, task.q_hi), slice(task.kv_lo, task.kv_hi)
            block_dq, block_dk, block_dv = kernel.backward(
                dout[:, :, rows], q[:, :, rows], kv[0][:, :, cols], kv[1][:, :, cols],
                out[:, :, rows], lse[:, :, rows], task.causal, scale, meta)
            dq[:, :, rows] += block_dq.float()
            dkv[0][:, :, cols] += block_dk.float()
            dkv[1][:, :, cols] += block_dv.float()
        if dkv_pending is not None:  # the accumulator of this K/V block, from the previous rank
            dkv += comm.finish(dkv_pending)
        if cp_size > 1:
            dkv_pending = comm.start(dkv)
        if kv_pending is not None:
            kv = comm.finish(kv_pending)
    if dkv_pending is not None:  # after cp sends, the accumulator of our own K/V block is back
        dkv = comm.finish(dkv_pending)
    return dq.to(q.dtype), dkv[0].to(k.dtype), dkv[1].to(v.dtype)


class _RingAttentionFunction(torch.autograd.Function):
    """Autograd boundary: communication happens inside forward/backward, never in the graph."""

    @staticmethod
    def forward(ctx, q, k, v, comm, causal, segments, scale, kernel):
        out, lse, metas = _ring_forward(q, k, v, comm, causal, segments, scale, kernel)
        ctx.save_for_backward(q, k, v, out, lse)
        ctx.metas, ctx.comm, ctx.causal, ctx.segments, ctx.scale, ctx.kernel = (
            metas, comm, causal, segments, scale, kernel)
        return out

    @staticmethod
    def backward(ctx, dout):
        q, k, v, out, lse = ctx.saved_tensors
        dq, dk, dv = _ring_backward(dout, q, k, v, out, lse, ctx.metas, ctx.comm, ctx.causal,
                                    ctx.segments, ctx.scale, ctx.kernel)
        return dq, dk, dv, None, None, None, None, None


def _local_segments(s_local: int, batch: int, cp_size: int,
                    cu_seqlens_padded: torch.Tensor | Sequence[int] | None) -> list[tuple[int, int]]:
    """Local [lo, hi) row ranges of the packed sequences (one range when not packed)."""
    if cu_seqlens_padded is None:
        if s_local % 2:
            raise ValueError(f"ring_attention: local sequence length {s_local} must be even (two zigzag "
                             "chunks); shard with megatron_solopo.parallel.cp_shard")
        return [(0, s_local)]
    if batch != 1:
        raise ValueError(f"ring_attention with cu_seqlens_padded (THD) needs batch dim 1, got {batch}")
    cu = cu_seqlens_padded.tolist() if isinstance(cu_seqlens_padded, torch.Tensor) else list(cu_seqlens_padded)
    if cu[-1] != s_local * cp_size:
        raise ValueError(f"ring_attention: cu_seqlens_padded[-1] = {cu[-1]} (global tokens) != local tokens "
                         f"{s_local} * cp {cp_size}; pass the global padded cu_seqlens of the whole pack")
    for idx, (start, end) in enumerate(zip(cu[:-1], cu[1:])):
        check_cp_divisible(end - start, cp_size, what=f"packed sequence {idx} (padded) length")
    return [(start // cp_size, end // cp_size) for start, end in zip(cu[:-1], cu[1:])]


def ring_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, cp_group, causal: bool = True,
                   cu_seqlens_padded: torch.Tensor | Sequence[int] | None = None,
                   softmax_scale: float | None = None, block_kernel: str = "auto") -> torch.Tensor:
    """Context-parallel attention over the zigzag layout; exact (not approximate) softmax attention.

    Args:
        q: [s_local, b, heads, d], this rank's two zigzag chunks (cp_shard(x, seq_dim=0, ...)).
        k, v: [s_local, b, kv_heads, d]; heads must be a multiple of kv_heads (GQA, not expanded).
        cp_group: the context-parallel process group (None = the default group).
        causal: causal attention (GPT); False = every token attends to the whole sequence.
        cu_seqlens_padded: packed (THD) input with batch dim 1: cumulative padded lengths of the
            FULL pack (as in Megatron's PackedSeqParams), each a multiple of 2*cp; every sequence
            is zigzag-sharded on its own (cp_shard_thd). Padding must sit at the end of each
            sequence: under causal attention no real token attends to it.
        softmax_scale: defaults to 1/sqrt(d).
        block_kernel: auto | math | cpu_flash | cuda_flash (see BLOCK_KERNELS).

    Returns:
        [s_local, b, heads, d] in q's dtype, the rows of the full-sequence attention this rank holds.
    """
    if q.dim() != 4 or k.shape != v.shape or k.dim() != 4 or q.shape[:2] != k.shape[:2] or \
            q.size(-1) != k.size(-1) or q.size(2) % k.size(2):
        raise ValueError(f"ring_attention: expected q [s, b, heads, d] and k = v [s, b, kv_heads, d] with "
                         f"heads % kv_heads == 0; got q {tuple(q.shape)}, k {tuple(k.shape)}, v {tuple(v.shape)}")
    cp_size = dist.get_world_size(cp_group) if dist.is_initialized() else 1
    comm = _RingComm(cp_group) if cp_size > 1 else None
    s_local, batch, _, head_dim = q.shape
    segments = _local_segments(s_local, batch, cp_size, cu_seqlens_padded)
    scale = softmax_scale if softmax_scale is not None else 1.0 / math.sqrt(head_dim)
    # [s, b, h, d] -> [b, h, s, d] views: the kernels' layout (the last dim stays contiguous)
    q4, k4, v4 = (x.permute(1, 2, 0, 3) for x in (q, k, v))
    kernel = _pick_kernel(block_kernel, q4)
    out = _RingAttentionFunction.apply(q4, k4, v4, comm, causal, segments, scale, kernel)
    return out.permute(2, 0, 1, 3)
