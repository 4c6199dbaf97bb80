"""Architecture presets: what a Llama/Qwen2/Mistral/SmolLM2 model looks like, as data.

A preset says nothing about parallelism or precision; `builder.build_gpt_model` turns a preset and a
`ParallelConfig` into a Megatron-Core GPTModel. Presets for real checkpoints are also inferred from a
Hugging Face config.json (model/hf/config.py). `architecture` names a family of model/families/, the
one place where a family is described.
"""

from __future__ import annotations

import dataclasses

from megatron_solopo.model.families import family_names

ARCHITECTURES = family_names()
"""The registered families (model/families/), e.g. ('llama', 'qwen2', 'mistral')."""


@dataclasses.dataclass(frozen=True)
class ModelPreset:
    """A dense decoder-only transformer with RMSNorm, SwiGLU, RoPE and (optionally) GQA."""

    name: str
    """Registry name, e.g. 'llama3.1-8b'."""
    architecture: str
    """A registered family (model/families/): llama | qwen2 | mistral (same block; qwen2 adds QKV bias)."""
    num_layers: int
    hidden_size: int
    ffn_hidden_size: int
    num_attention_heads: int
    num_query_groups: int
    """Key/value heads (GQA); equal to num_attention_heads for multi-head attention."""
    vocab_size: int
    max_position_embeddings: int
    """Longest position the checkpoint was trained for (not a hard limit for RoPE)."""
    rotary_base: float = 10000.0
    """RoPE theta."""
    norm_epsilon: float = 1e-5
    tie_embeddings: bool = False
    """Output layer shares the input embedding (SmolLM2, Llama-3.2, small Qwen2.5): no lm_head tensor."""
    qkv_bias: bool = False
    """Bias on the fused QKV projection (Qwen2)."""
    kv_channels: int | None = None
    """Head dimension when it is not hidden_size / num_attention_heads."""
    rope_scaling_factor: float | None = None
    """Llama-3.1 style RoPE frequency scaling ('llama3' rope_scaling); None = plain RoPE."""

    def __post_init__(self) -> None:
        if self.architecture not in family_names():  # the registry, read now: a family may register late
            raise ValueError(f"preset {self.name}: architecture {self.architecture!r} not in {family_names()} "
                             "(one module per family in model/families/)")
        if self.num_attention_heads % self.num_query_groups:
            raise ValueError(f"preset {self.name}: {self.num_attention_heads} attention heads are not a "
                             f"multiple of {self.num_query_groups} kv heads")
        if self.kv_channels is None and self.hidden_size % self.num_attention_heads:
            raise ValueError(f"preset {self.name}: hidden_size {self.hidden_size} not divisible by "
                             f"{self.num_attention_heads} heads; set kv_channels explicitly")

    @property
    def head_dim(self) -> int:
        return self.kv_channels or self.hidden_size // self.num_attention_heads

    def num_parameters(self) -> int:
        """Parameter count (embeddings counted once when tied)."""
        h, f, d = self.hidden_size, self.ffn_hidden_size, self.head_dim
        qkv = h * d * (self.num_attention_heads + 2 * self.num_query_groups)
        qkv += d * (self.num_attention_heads + 2 * self.num_query_groups) if self.qkv_bias else 0
        attn = qkv + self.num_attention_heads * d * h
        mlp = 3 * h * f
        per_layer = attn + mlp + 2 * h
        embed = self.vocab_size * h * (1 if self.tie_embeddings else 2)
        return self.num_layers * per_layer + embed + h

    def replace(self, **changes) -> "ModelPreset":
        return dataclasses.replace(self, **changes)


_PRESETS: dict[str, ModelPreset] = {}


def register_preset(preset: ModelPreset) -> ModelPreset:
    """Adds a preset to the registry (names are unique)."""
    if preset.name in _PRESETS:
        raise ValueError(f"preset {preset.name!r} is already registered")
    _PRESETS[preset.name] = preset
    return preset


def get_preset(name: str) -> ModelPreset:
    """Looks a preset up by name; the error lists the known ones."""
    try:
        return _PRESETS[name]
    except KeyError:
        raise ValueError(f"unknown model preset {name!r}; known presets: {', '.join(sorted(_PRESETS))}") from None


def list_presets() -> list[str]:
    return sorted(_PRESETS)


for _p in (
    # --- real architectures (numbers from the published config.json files) ---
    ModelPreset("smollm2-135m", "llama", num_layers=30, hidden_size=576, ffn_hidden_size=1536,
                num_attention_heads=9, num_query_groups=3, vocab_size=49152, max_position_embeddings=8192,
                rotary_base=100000.0, tie_embeddings=True),
    ModelPreset("llama2-7b", "llama", num_layers=32, hidden_size=4096, ffn_hidden_size=11008,
                num_attention_heads=32, num_query_groups=32, vocab_size=32000, max_position_embeddings=4096),
    ModelPreset("llama3.1-8b", "llama", num_layers=32, hidden_size=4096, ffn_hidden_size=14336,
                num_attention_heads=32, num_query_groups=8, vocab_size=128256, max_position_embeddings=131072,
                rotary_base=500000.0, rope_scaling_factor=8.0),
    ModelPreset("llama3.2-1b", "llama", num_layers=16, hidden_size=2048, ffn_hidden_size=8192,
                num_attention_heads=32, num_query_groups=8, vocab_size=128256, max_position_embeddings=131072,
                rotary_base=500000.0, tie_embeddings=True, rope_scaling_factor=32.0),
    ModelPreset("llama3.1-70b", "llama", num_layers=80, hidden_size=8192, ffn_hidden_size=28672,
                num_attention_heads=64, num_query_groups=8, vocab_size=128256, max_position_embeddings=131072,
                rotary_base=500000.0, rope_scaling_factor=8.0),
    ModelPreset("qwen2.5-0.5b", "qwen2", num_layers=24, hidden_size=896, ffn_hidden_size=4864,
                num_attention_heads=14, num_query_groups=2, vocab_size=151936, max_position_embeddings=32768,
                rotary_base=1000000.0, norm_epsilon=1e-6, tie_embeddings=True, qkv_bias=True),
    ModelPreset("qwen2.5-1.5b", "qwen2", num_layers=28, hidden_size=1536, ffn_hidden_size=8960,
                num_attention_heads=12, num_query_groups=2, vocab_size=151936, max_position_embeddings=32768,
                rotary_base=1000000.0, norm_epsilon=1e-6, tie_embeddings=True, qkv_bias=True),
    ModelPreset("qwen2.5-7b", "qwen2", num_layers=28, hidden_size=3584, ffn_hidden_size=18944,
                num_attention_heads=28, num_query_groups=4, vocab_size=152064, max_position_embeddings=32768,
                rotary_base=1000000.0, norm_epsilon=1e-6, qkv_bias=True),
    ModelPreset("mistral-7b", "mistral", num_layers=32, hidden_size=4096, ffn_hidden_size=14336,
                num_attention_heads=32, num_query_groups=8, vocab_size=32000, max_position_embeddings=32768,
                rotary_base=1000000.0),
    # --- benchmark preset: TinyLlama-1.1B shape, random weights ---
    ModelPreset("llama-1b", "llama", num_layers=22, hidden_size=2048, ffn_hidden_size=5632,
                num_attention_heads=32, num_query_groups=4, vocab_size=32000, max_position_embeddings=131072),
    # --- tiny presets for tests and the CPU smoke runs (vocab divisible by 8 for tp up to 8) ---
    ModelPreset("tiny", "llama", num_layers=2, hidden_size=64, ffn_hidden_size=128,
                num_attention_heads=4, num_query_groups=2, vocab_size=256, max_position_embeddings=4096),
    ModelPreset("tiny-mha", "llama", num_layers=2, hidden_size=64, ffn_hidden_size=128,
                num_attention_heads=4, num_query_groups=4, vocab_size=256, max_position_embeddings=4096),
    ModelPreset("tiny-qwen2", "qwen2", num_layers=2, hidden_size=64, ffn_hidden_size=128,
                num_attention_heads=4, num_query_groups=2, vocab_size=256, max_position_embeddings=4096,
                qkv_bias=True, tie_embeddings=True, rotary_base=1000000.0, norm_epsilon=1e-6),
    ModelPreset("tiny-4layer", "llama", num_layers=4, hidden_size=64, ffn_hidden_size=128,
                num_attention_heads=4, num_query_groups=2, vocab_size=256, max_position_embeddings=4096),
):
    register_preset(_p)
