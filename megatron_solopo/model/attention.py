"""Core attention for long sequences: torch SDPA, packed sequences (THD), ring attention under CP.

`SDPACoreAttention` is a drop-in `core_attention` submodule for Megatron-Core's local GPT layer spec
(`spec.submodules.self_attention.submodules.core_attention = SDPACoreAttention`). Megatron's own
local `DotProductAttention` materializes the [b, heads, s, s] score matrix (out of memory at 8K
tokens for a 1.1B model on an H100) and supports neither packing nor context parallelism; this
module instead calls `torch.nn.functional.scaled_dot_product_attention` (flash / cuDNN / efficient
kernels on GPU, the CPU flash kernel on CPU), so memory stays linear in the sequence length:

- causal masking via `is_causal=True` (no [s, s] mask is ever built unless the caller passes one);
- GQA via `enable_gqa=True`: K/V keep their kv_heads, the kernel maps query head i to kv head
  i // (heads / kv_heads) (Megatron's repeat_interleave convention) without copying K/V where the
  kernel supports it (flash on CUDA and CPU; other kernels repeat internally);
- packed sequences (THD, `PackedSeqParams(qkv_format="thd", cu_seqlens_q[_padded])`): one SDPA call
  per packed sequence, so attention never crosses a sequence boundary; padding tokens (between
  cu_seqlens_q and cu_seqlens_q_padded) attend to nothing and get zero output;
- context parallelism (CP > 1): `ring_attention` (megatron_solopo/model/ring_attention.py, re-exported
  here) on the zigzag layout of `megatron_solopo.parallel.cp`, over the CP group of the
  `pg_collection` GPTModel passes (the ParallelContext's; docs/parallelism.md).
"""

from __future__ import annotations

import contextlib
import math

import torch
import torch.distributed as dist
import torch.nn.functional as F
from megatron.core.transformer.enums import AttnMaskType
from megatron.core.transformer.module import MegatronModule

from megatron_solopo.model.ring_attention import BLOCK_KERNELS, ring_attention
from megatron_solopo.parallel.parallel_context import current_parallel_context
from megatron_solopo.parallel.cp import thd_zigzag_token_indices

__all__ = ["SDPACoreAttention", "ring_attention", "BLOCK_KERNELS"]

_CAUSAL_MASK_TYPES = (AttnMaskType.causal, AttnMaskType.padding_causal, AttnMaskType.causal_bottom_right)


# ----------------------------------------------------------------------------------------------
# The Megatron core_attention module
# ----------------------------------------------------------------------------------------------


def _reject_unsupported_config(config) -> None:
    """Errors for TransformerConfig features this kernel does not implement (none is ignored)."""
    problems = []
    if getattr(config, "window_size", None) is not None:
        problems.append(f"window_size={config.window_size} (sliding-window attention)")
    if getattr(config, "softmax_type", "vanilla") != "vanilla":
        problems.append(f"softmax_type={config.softmax_type!r}")
    if getattr(config, "qk_clip", False) or getattr(config, "log_max_attention_logit", False):
        problems.append("qk_clip / log_max_attention_logit (needs the max attention logit per head)")
    if getattr(config, "multi_latent_attention", False):
        problems.append("multi_latent_attention")
    if problems:
        raise ValueError("SDPACoreAttention does not support " + "; ".join(problems)
                         + ". Use the Transformer Engine backend (model.attention_backend=te) or turn them off.")


def _resolve_cp_group(config, pg_collection):
    """The CP group: GPTModel's `pg_collection.cp` (the builder passes the ParallelContext's groups);
    built outside a model without one, the current ParallelContext's (None without process groups)."""
    if pg_collection is not None and getattr(pg_collection, "cp", None) is not None:
        group = pg_collection.cp
    else:
        context = current_parallel_context(required=False)
        group = context.cp_group if context is not None else None
    size = dist.get_world_size(group) if group is not None and dist.is_initialized() else 1
    if size != config.context_parallel_size:
        raise ValueError(f"SDPACoreAttention: config.context_parallel_size={config.context_parallel_size} but "
                         f"the context-parallel process group has {size} ranks; pass the pg_collection of a "
                         "ParallelContext with the same CP size (megatron_solopo.parallel.initialize_parallel)")
    return group, size


def _combined_mask(attention_mask, attention_bias, causal: bool, sq: int, sk: int, dtype):
    """SDPA attn_mask from Megatron's bool mask (True = masked), an additive bias and causality.

    Only called when the caller passed a mask or bias, i.e. already materialized an [.., sq, sk]
    tensor: the causal part is then combined into it (union of masked positions).
    """
    allowed = None
    if attention_mask is not None:
        if attention_mask.dtype != torch.bool:
            raise TypeError(f"attention_mask must be bool (True = masked, Megatron's convention), got "
                            f"{attention_mask.dtype}")
        allowed = ~attention_mask
    if causal:
        device = (attention_mask if attention_mask is not None else attention_bias).device
        lower = torch.ones(sq, sk, dtype=torch.bool, device=device).tril()
        allowed = lower if allowed is None else allowed & lower
    if attention_bias is None:
        return allowed
    bias = attention_bias.to(dtype)
    return bias if allowed is None else bias.masked_fill(~allowed, float("-inf"))


def _sdpa(q, k, v, attn_mask, is_causal: bool, dropout_p: float, scale: float) -> torch.Tensor:
    """torch SDPA on [b, h, s, d] tensors; GQA through enable_gqa (no K/V copy where supported)."""
    return F.scaled_dot_product_attention(q, k, v, attn_mask=attn_mask, dropout_p=dropout_p,
                                          is_causal=is_causal, scale=scale,
                                          enable_gqa=q.size(1) != k.size(1))


class SDPACoreAttention(MegatronModule):
    """Megatron-Core `core_attention` on torch SDPA, with packing (THD) and ring attention for CP.

    Constructor: the keyword arguments Megatron's `SelfAttention` passes to its core attention
    (same as `megatron.core.transformer.dot_product_attention.DotProductAttention`).
    Forward: q [sq, b, heads, d], k/v [sk, b, kv_heads, d] -> [sq, b, heads * d]; with
    `packed_seq_params.qkv_format == "thd"`: q [t, heads, d] (or [t, 1, heads, d]) -> [t, 1, heads * d].

    Masking: causal mask types (causal, padding_causal, causal_bottom_right with sq == sk) use the
    kernel's causal mode. An explicit `attention_mask` (bool, True = masked) is combined with
    causality (union of masked positions); `attention_bias` is added to the scores.
    `apply_query_key_layer_scaling` needs no code: Megatron divides the scale by layer_number and
    multiplies the scores back before the fp32 softmax, which is the identity in exact arithmetic
    and SDPA's softmax already runs in fp32 internally.
    Attention dropout (config.attention_dropout or the `attention_dropout` argument) is applied by
    SDPA in training mode inside Megatron's model-parallel RNG fork (as DotProductAttention does);
    it is rejected with CP > 1, where the ring kernels run without dropout.
    """

    def __init__(self, config, layer_number: int, attn_mask_type: AttnMaskType, attention_type: str,
                 attention_dropout: float | None = None, softmax_scale: float | None = None,
                 cp_comm_type: str | None = None, pg_collection=None) -> None:
        super().__init__(config=config)
        _reject_unsupported_config(config)
        self.layer_number = max(1, layer_number)
        self.attn_mask_type = attn_mask_type
        self.attention_type = attention_type
        self.softmax_scale = softmax_scale if softmax_scale is not None else 1.0 / math.sqrt(config.kv_channels)
        self.dropout_p = float(config.attention_dropout if attention_dropout is None else attention_dropout)
        self.cp_group, self.cp_size = _resolve_cp_group(config, pg_collection)
        if self.cp_size > 1:
            if cp_comm_type not in (None, "p2p"):
                raise ValueError(f"SDPACoreAttention implements context parallelism as a p2p ring; "
                                 f"cp_comm_type={cp_comm_type!r} needs Transformer Engine "
                                 "(model.attention_backend=te) or parallel.cp_comm_type=p2p")
            if self.dropout_p > 0:
                raise ValueError(f"attention dropout {self.dropout_p} is not implemented with context parallelism "
                                 "(ring attention); set attention_dropout=0 (usual for LLM fine-tuning)")
            if attention_type != "self":
                raise ValueError(f"context parallelism supports self-attention only, got {attention_type!r}")

    def _dropout_context(self, dropout_p: float):
        if dropout_p == 0.0 or self.config.sequence_parallel:
            return contextlib.nullcontext()
        from megatron.core import tensor_parallel

        return tensor_parallel.get_cuda_rng_tracker().fork()

    def forward(self, query: torch.Tensor, key: torch.Tensor, value: torch.Tensor,
                attention_mask: torch.Tensor | None, attn_mask_type: AttnMaskType | None = None,
                attention_bias: torch.Tensor | None = None, packed_seq_params=None) -> torch.Tensor:
        mask_type = attn_mask_type if attn_mask_type is not None else self.attn_mask_type
        causal = mask_type in _CAUSAL_MASK_TYPES
        if packed_seq_params is not None:
            if packed_seq_params.qkv_format != "thd":
                raise ValueError(f"SDPACoreAttention: packed_seq_params.qkv_format="
                                 f"{packed_seq_params.qkv_format!r} is not supported; use 'thd'")
            if attention_mask is not None or attention_bias is not None:
                raise ValueError("packed (THD) attention takes no attention_mask/attention_bias: sequence "
                                 "boundaries come from cu_seqlens; pass attention_mask=None")
            local_cp_size = getattr(packed_seq_params, "local_cp_size", None)
            if local_cp_size not in (None, self.cp_size):
                raise ValueError(f"packed_seq_params.local_cp_size={local_cp_size} (hybrid context parallelism) "
                                 f"is not supported by SDPACoreAttention (CP size {self.cp_size}); use TE")
            return self._forward_thd(query, key, value, causal, packed_seq_params)
        if self.cp_size > 1:
            if attention_mask is not None or attention_bias is not None:
                raise ValueError("context-parallel attention supports causal or full attention without an "
                                 "explicit attention_mask/attention_bias (as Transformer Engine does); pass None")
            sq, batch, heads, head_dim = query.shape
            out = ring_attention(query, key, value, self.cp_group, causal=causal, softmax_scale=self.softmax_scale)
            return out.reshape(sq, batch, heads * head_dim)
        return self._forward_sbhd(query, key, value, attention_mask, attention_bias, causal)

    def _forward_sbhd(self, query, key, value, attention_mask, attention_bias, causal: bool) -> torch.Tensor:
        sq, batch, heads, head_dim = query.shape
        sk = key.size(0)
        if causal and sq != sk:
            raise ValueError(f"causal attention needs equal query/key lengths, got {sq} and {sk} "
                             "(incremental decoding is not supported by SDPACoreAttention)")
        q, k, v = (x.permute(1, 2, 0, 3) for x in (query, key, value))  # [b, h, s, d] views
        if attention_mask is None and attention_bias is None:
            attn_mask, is_causal = None, causal
        else:
            attn_mask, is_causal = _combined_mask(attention_mask, attention_bias, causal, sq, sk, q.dtype), False
        dropout_p = self.dropout_p if self.training else 0.0
        with self._dropout_context(dropout_p):
            out = _sdpa(q, k, v, attn_mask, is_causal, dropout_p, self.softmax_scale)
        return out.permute(2, 0, 1, 3).reshape(sq, batch, heads * head_dim)  # [b,h,s,d] -> [s,b,h*d]

    def _forward_thd(self, query, key, value, causal: bool, packed) -> torch.Tensor:
        q, k, v = (x.squeeze(1) if x.dim() == 4 else x for x in (query, key, value))  # [t, h, d]
        cu_real, cu_padded = _packed_boundaries(packed)
        tokens, heads, head_dim = q.shape
        if self.cp_size > 1:
            out = self._forward_thd_ring(q, k, v, causal, cu_real, cu_padded)
        else:
            out = self._forward_thd_local(q, k, v, causal, cu_real, cu_padded)
        return out.reshape(tokens, 1, heads * head_dim)

    def _forward_thd_local(self, q, k, v, causal, cu_real, cu_padded) -> torch.Tensor:
        """One SDPA call per packed sequence on its real tokens; padding rows get zeros."""
        starts, real_lens = cu_padded.tolist(), (cu_real[1:] - cu_real[:-1]).tolist()
        dropout_p = self.dropout_p if self.training else 0.0
        pieces, position = [], 0
        for seq_idx, real_len in enumerate(real_lens):
            start, end = starts[seq_idx], starts[seq_idx + 1]
            if real_len > end - start:
                raise ValueError(f"packed sequence {seq_idx}: {real_len} tokens exceed its padded length "
                                 f"{end - start} (cu_seqlens_q vs cu_seqlens_q_padded)")
            if real_len:
                q_seq, k_seq, v_seq = (x[start:start + real_len].transpose(0, 1).unsqueeze(0) for x in (q, k, v))
                with self._dropout_context(dropout_p):
                    seq_out = _sdpa(q_seq, k_seq, v_seq, None, causal, dropout_p, self.softmax_scale)
                pieces.append(seq_out.squeeze(0).transpose(0, 1))  # [1, h, n, d] -> [n, h, d]
            position = start + real_len
            if end > position:
                pieces.append(q.new_zeros(end - position, q.size(1), q.size(2)))
            position = end
        if q.size(0) > position:  # tokens after the last packed sequence
            pieces.append(q.new_zeros(q.size(0) - position, q.size(1), q.size(2)))
        return torch.cat(pieces) if pieces else q.new_zeros(q.shape)

    def _forward_thd_ring(self, q, k, v, causal, cu_real, cu_padded) -> torch.Tensor:
        """Ring attention per packed sequence; padding rows zeroed as in the CP=1 path."""
        has_padding = not torch.equal(cu_real, cu_padded)
        if has_padding and not causal:
            raise ValueError("non-causal packed attention with context parallelism needs sequences without "
                             "padding (cu_seqlens_q == cu_seqlens_q_padded): padding would be attended")
        out = ring_attention(q.unsqueeze(1), k.unsqueeze(1), v.unsqueeze(1), self.cp_group, causal=causal,
                             cu_seqlens_padded=cu_padded, softmax_scale=self.softmax_scale).squeeze(1)
        if not has_padding:
            return out
        cp_rank = dist.get_rank(self.cp_group)
        positions = thd_zigzag_token_indices(cu_padded, cp_rank, self.cp_size, device=q.device)
        seq_of_token = torch.searchsorted(cu_padded.to(q.device, torch.long), positions, right=True) - 1
        offset_in_seq = positions - cu_padded.to(q.device, torch.long)[seq_of_token]
        real_lens = (cu_real[1:] - cu_real[:-1]).to(q.device, torch.long)
        keep = offset_in_seq < real_lens[seq_of_token]  # [t_local]
        return out * keep.to(out.dtype)[:, None, None]


def _packed_boundaries(packed) -> tuple[torch.Tensor, torch.Tensor]:
    """(cu_seqlens_q, cu_seqlens_q_padded) as int64 CPU tensors; self-attention only (q == kv)."""
    if packed.cu_seqlens_q is None:
        raise ValueError("packed_seq_params.cu_seqlens_q is required for qkv_format='thd'")
    cu_real = packed.cu_seqlens_q.detach().reshape(-1).to("cpu", torch.long)
    cu_padded = (packed.cu_seqlens_q_padded if packed.cu_seqlens_q_padded is not None else packed.cu_seqlens_q)
    cu_padded = cu_padded.detach().reshape(-1).to("cpu", torch.long)
    for name_kv, name_q in (("cu_seqlens_kv", "cu_seqlens_q"), ("cu_seqlens_kv_padded", "cu_seqlens_q_padded")):
        kv_value, q_value = getattr(packed, name_kv), getattr(packed, name_q)
        if kv_value is not None and q_value is not None and not torch.equal(
                kv_value.detach().reshape(-1).cpu().long(), q_value.detach().reshape(-1).cpu().long()):
            raise ValueError(f"packed self-attention needs {name_kv} == {name_q}")
    if cu_real.numel() != cu_padded.numel():
        raise ValueError(f"cu_seqlens_q has {cu_real.numel()} entries but cu_seqlens_q_padded has "
                         f"{cu_padded.numel()}; both list the same packed sequences")
    return cu_real, cu_padded
