"""The kinds of entries in a HF <-> Megatron-Core weight table, and the table itself.

A table is a list of typed mappings. Each mapping knows which HF tensors it reads, which Megatron
tensor it fills, and how to split that tensor over tensor-parallel ranks:

- `Direct`: one HF tensor is one Megatron tensor; `tp_split` says how TP cuts it
  ("column": dim 0, i.e. output features or vocab rows; "row": dim 1, input features; "none":
  replicated).
- `FusedQKV`: q_proj, k_proj, v_proj -> linear_qkv (weight or bias). Megatron interleaves by query
  group: for each of the G kv heads, [the group's H/G query heads, its k head, its v head], each
  head_dim rows. TP rank r holds the contiguous groups [r*G/tp, (r+1)*G/tp).
- `FusedGateUp`: gate_proj, up_proj -> linear_fc1 = [gate; up] (the first half goes through SiLU).
  TP rank r holds [gate_r; up_r], not rows r of the fused tensor.
- `OutputLayer`: lm_head -> output_layer, or, with tied embeddings, the embedding itself. At
  pipeline size 1 a tied GPTModel has no output_layer tensor; with PP > 1 the last stage keeps a
  copy of the embedding in output_layer.weight, which must be filled from model.embed_tokens.

Names contain `{layer}` for per-layer entries (the HF index is global, the Megatron one is local to
the pipeline stage). Each family's table is in its module under model/families/ (llama.py holds the
layout Qwen2 and Mistral reuse). torch is imported only inside the two methods that concatenate
tensors: model/presets.py reads the family registry, and importing it must stay as cheap as a config.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Iterator
from typing import TYPE_CHECKING, Protocol

if TYPE_CHECKING:
    import torch

TP_SPLITS = ("column", "row", "none")


class TensorReader(Protocol):
    """Reads HF tensors by name; `read_range` reads only [start, stop) along `dim`, so a TP rank never
    loads more of a safetensors file than it keeps (model.hf.safetensors_io.HFCheckpointReader implements it)."""

    def shape(self, name: str) -> tuple[int, ...]: ...

    def read(self, name: str) -> torch.Tensor: ...

    def read_range(self, name: str, dim: int, start: int, stop: int) -> torch.Tensor: ...


@dataclasses.dataclass(frozen=True)
class Geometry:
    """The shape facts the fused mappings need (from the preset)."""

    num_attention_heads: int
    num_query_groups: int
    head_dim: int
    ffn_hidden_size: int

    @classmethod
    def of(cls, preset) -> Geometry:
        return cls(preset.num_attention_heads, preset.num_query_groups, preset.head_dim,
                   preset.ffn_hidden_size)

    @property
    def heads_per_group(self) -> int:
        return self.num_attention_heads // self.num_query_groups


class HFShapeMismatch(ValueError):
    """An HF tensor's shape is not the one config.json implies (the loader names the config file)."""


def _check_rows(reader: TensorReader, name: str, expected: int, what: str) -> None:
    """A fused mapping reads row ranges: a tensor with more (or fewer) rows than the config implies would
    otherwise be cut silently."""
    rows = reader.shape(name)[0]
    if rows != expected:
        raise HFShapeMismatch(f"{name} has {rows} rows, the config implies {expected} ({what})")


def _rank_range(total: int, tp_rank: int, tp_size: int, what: str) -> tuple[int, int]:
    if total % tp_size:
        raise ValueError(f"{what} ({total}) is not divisible by tensor-parallel size {tp_size}; "
                         "choose a tp that divides it")
    per_rank = total // tp_size
    return tp_rank * per_rank, (tp_rank + 1) * per_rank


@dataclasses.dataclass(frozen=True)
class Direct:
    """One HF tensor <-> one Megatron tensor, split over TP along `tp_split`."""

    mcore: str
    hf: str
    tp_split: str = "none"

    def __post_init__(self) -> None:
        if self.tp_split not in TP_SPLITS:
            raise ValueError(f"mapping {self.mcore}: tp_split {self.tp_split!r} not in {TP_SPLITS}")

    def hf_names(self, tied: bool = False) -> tuple[str, ...]:
        return (self.hf,)

    def to_mcore(self, reader: TensorReader, geom: Geometry, tp_rank: int, tp_size: int,
                 tied: bool = False) -> torch.Tensor:
        return _read_split(reader, self.hf, self.tp_split, tp_rank, tp_size)

    def to_hf(self, full: torch.Tensor, geom: Geometry, tied: bool = False) -> dict[str, torch.Tensor]:
        return {self.hf: full}


def _read_split(reader: TensorReader, name: str, tp_split: str, tp_rank: int, tp_size: int) -> torch.Tensor:
    if tp_split == "none" or tp_size == 1:
        return reader.read(name)
    dim = 1 if tp_split == "row" else 0
    start, stop = _rank_range(reader.shape(name)[dim], tp_rank, tp_size, f"{name} dim {dim}")
    return reader.read_range(name, dim, start, stop)


@dataclasses.dataclass(frozen=True)
class FusedQKV:
    """q_proj, k_proj, v_proj (weights or biases) <-> linear_qkv with the per-group interleave."""

    mcore: str
    hf_q: str
    hf_k: str
    hf_v: str

    def hf_names(self, tied: bool = False) -> tuple[str, ...]:
        return (self.hf_q, self.hf_k, self.hf_v)

    def to_mcore(self, reader: TensorReader, geom: Geometry, tp_rank: int, tp_size: int,
                 tied: bool = False) -> torch.Tensor:
        d, hpg = geom.head_dim, geom.heads_per_group
        _check_rows(reader, self.hf_q, geom.num_attention_heads * d, f"num_attention_heads {geom.num_attention_heads}"
                    f" x head_dim {d}")
        for name in (self.hf_k, self.hf_v):
            _check_rows(reader, name, geom.num_query_groups * d, f"num_key_value_heads {geom.num_query_groups} x "
                        f"head_dim {d}")
        import torch

        g0, g1 = _rank_range(geom.num_query_groups, tp_rank, tp_size, "kv heads (query groups)")
        groups = g1 - g0
        q = reader.read_range(self.hf_q, 0, g0 * hpg * d, g1 * hpg * d)  # [groups*hpg*d, (h)]
        k = reader.read_range(self.hf_k, 0, g0 * d, g1 * d)              # [groups*d, (h)]
        v = reader.read_range(self.hf_v, 0, g0 * d, g1 * d)
        rest = q.shape[1:]
        fused = torch.cat([q.reshape(groups, hpg * d, *rest), k.reshape(groups, d, *rest),
                           v.reshape(groups, d, *rest)], dim=1)  # [groups, (hpg+2)*d, (h)]
        return fused.reshape(groups * (hpg + 2) * d, *rest)

    def to_hf(self, full: torch.Tensor, geom: Geometry, tied: bool = False) -> dict[str, torch.Tensor]:
        groups, d, hpg = geom.num_query_groups, geom.head_dim, geom.heads_per_group
        rest = full.shape[1:]
        per_group = full.reshape(groups, (hpg + 2) * d, *rest)
        q, k, v = per_group.split([hpg * d, d, d], dim=1)
        return {self.hf_q: q.reshape(groups * hpg * d, *rest).contiguous(),
                self.hf_k: k.reshape(groups * d, *rest).contiguous(),
                self.hf_v: v.reshape(groups * d, *rest).contiguous()}


@dataclasses.dataclass(frozen=True)
class FusedGateUp:
    """gate_proj, up_proj <-> linear_fc1 = [gate; up]; TP rank r holds [gate_r; up_r]."""

    mcore: str
    hf_gate: str
    hf_up: str

    def hf_names(self, tied: bool = False) -> tuple[str, ...]:
        return (self.hf_gate, self.hf_up)

    def to_mcore(self, reader: TensorReader, geom: Geometry, tp_rank: int, tp_size: int,
                 tied: bool = False) -> torch.Tensor:
        for name in (self.hf_gate, self.hf_up):
            _check_rows(reader, name, geom.ffn_hidden_size, "intermediate_size")
        import torch

        r0, r1 = _rank_range(geom.ffn_hidden_size, tp_rank, tp_size, "ffn hidden size")
        return torch.cat([reader.read_range(self.hf_gate, 0, r0, r1), reader.read_range(self.hf_up, 0, r0, r1)],
                         dim=0)  # [2*ffn/tp, h]

    def to_hf(self, full: torch.Tensor, geom: Geometry, tied: bool = False) -> dict[str, torch.Tensor]:
        gate, up = full.chunk(2, dim=0)
        return {self.hf_gate: gate.contiguous(), self.hf_up: up.contiguous()}


@dataclasses.dataclass(frozen=True)
class OutputLayer:
    """lm_head <-> output_layer (split over TP by vocab rows); with tied embeddings HF has no lm_head and the
    Megatron copy (last PP stage only) is filled from the embedding `tied_hf`."""

    mcore: str
    hf: str
    tied_hf: str

    def hf_names(self, tied: bool = False) -> tuple[str, ...]:
        return () if tied else (self.hf,)

    def to_mcore(self, reader: TensorReader, geom: Geometry, tp_rank: int, tp_size: int,
                 tied: bool = False) -> torch.Tensor:
        return _read_split(reader, self.tied_hf if tied else self.hf, "column", tp_rank, tp_size)

    def to_hf(self, full: torch.Tensor, geom: Geometry, tied: bool = False) -> dict[str, torch.Tensor]:
        return {} if tied else {self.hf: full}


Mapping = Direct | FusedQKV | FusedGateUp | OutputLayer


@dataclasses.dataclass(frozen=True)
class WeightTable:
    """Every weight of one family: the entries outside the transformer layers and those of one layer."""

    global_mappings: tuple[Mapping, ...]
    """Embedding, final norm, output layer."""
    layer_mappings: tuple[Mapping, ...]
    """Names with a `{layer}` placeholder."""
    ignored_hf_suffixes: tuple[str, ...] = ("rotary_emb.inv_freq",)
    """HF tensors that carry no weights (buffers some old checkpoints saved)."""

    @property
    def output_layer(self) -> OutputLayer:
        """The entry of the output layer (lm_head, or the embedding when tied)."""
        return next(m for m in self.global_mappings if isinstance(m, OutputLayer))

    def expected_hf_names(self, num_layers: int, tied: bool) -> set[str]:
        """Every HF tensor a full checkpoint of this family has."""
        names = {n for m in self.global_mappings for n in m.hf_names(tied)}
        for layer in range(num_layers):
            names |= {n.format(layer=layer) for m in self.layer_mappings for n in m.hf_names(tied)}
        return names

    def instances(self, local_layers: int, layer_offset: int) -> Iterator[tuple[str, Mapping]]:
        """(Megatron local name, mapping with HF names for the global layer) for one model chunk."""
        for mapping in self.global_mappings:
            yield mapping.mcore, mapping
        for local in range(local_layers):
            for mapping in self.layer_mappings:
                yield mapping.mcore.format(layer=local), _format_hf(mapping, layer_offset + local)


def _format_hf(mapping: Mapping, layer: int) -> Mapping:
    changes = {f.name: getattr(mapping, f.name).format(layer=layer)
               for f in dataclasses.fields(mapping) if f.name.startswith("hf")}
    return dataclasses.replace(mapping, **changes)


# Transformer Engine's spec fuses the norms into the following linear layers: same tensors, other names.
TE_NORM_ALIASES: dict[str, str] = {
    "input_layernorm.weight": "self_attention.linear_qkv.layer_norm_weight",
    "pre_mlp_layernorm.weight": "mlp.linear_fc1.layer_norm_weight",
}


def te_alias(mcore_name: str) -> str | None:
    """The TE-spec name of a local-spec norm tensor (decoder.layers.N.input_layernorm.weight ->
    decoder.layers.N.self_attention.linear_qkv.layer_norm_weight), or None."""
    for local_suffix, te_suffix in TE_NORM_ALIASES.items():
        if mcore_name.endswith("." + local_suffix):
            return mcore_name[: -len(local_suffix)] + te_suffix
    return None


def te_to_local_name(name: str) -> str:
    """The local-spec name of a parameter named either way (TE's ...linear_qkv.layer_norm_weight ->
    ...input_layernorm.weight, ...linear_fc1.layer_norm_weight -> ...pre_mlp_layernorm.weight; other
    names unchanged): one function for anything that keys weights by name across both specs."""
    for local_suffix, te_suffix in TE_NORM_ALIASES.items():
        if name.endswith("." + te_suffix):
            return name[: -len(te_suffix)] + local_suffix
    return name


# The shape config.json implies for each HF tensor of the Llama-style names, by name suffix (h = hidden_size,
# q / kv = attention heads / key-value heads x head_dim, ffn = intermediate_size, v = vocab_size).
_HF_SHAPES = {
    "embed_tokens.weight": lambda h, q, kv, ffn, v: (v, h),
    "lm_head.weight": lambda h, q, kv, ffn, v: (v, h),
    "norm.weight": lambda h, q, kv, ffn, v: (h,),
    "layernorm.weight": lambda h, q, kv, ffn, v: (h,),
    "q_proj.weight": lambda h, q, kv, ffn, v: (q, h),
    "k_proj.weight": lambda h, q, kv, ffn, v: (kv, h),
    "v_proj.weight": lambda h, q, kv, ffn, v: (kv, h),
    "q_proj.bias": lambda h, q, kv, ffn, v: (q,),
    "k_proj.bias": lambda h, q, kv, ffn, v: (kv,),
    "v_proj.bias": lambda h, q, kv, ffn, v: (kv,),
    "o_proj.weight": lambda h, q, kv, ffn, v: (h, q),
    "gate_proj.weight": lambda h, q, kv, ffn, v: (ffn, h),
    "up_proj.weight": lambda h, q, kv, ffn, v: (ffn, h),
    "down_proj.weight": lambda h, q, kv, ffn, v: (h, ffn),
}


def expected_hf_shape(name: str, preset) -> tuple[int, ...] | None:
    """The shape `preset` (read from config.json) implies for the HF tensor `name`; None for a name this
    table does not know."""
    d = preset.head_dim
    for suffix, shape in _HF_SHAPES.items():
        if name.endswith(suffix):
            return shape(preset.hidden_size, preset.num_attention_heads * d, preset.num_query_groups * d,
                         preset.ffn_hidden_size, preset.vocab_size)
    return None
