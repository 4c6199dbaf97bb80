"""Bench configuration: the run's `BenchConfig`, the stack `Variant`s measured, variant specs."""

from __future__ import annotations

import dataclasses
from collections.abc import Sequence
from typing import Any
from megatron_solopo.model.presets import get_preset

OBJECTIVES = ("orpo", "dpo", "simpo")
MODES = ("solo", "long")
BACKENDS = ("te", "sdpa", "local")
RECOMPUTES = ("none", "selective", "full")
RA_GRADIENT = ("both", "long")  # objectives.RA_GRADIENT; not imported: this module stays free of torch
BASELINE_KINDS = ("auto", "trl", "transformers", "none")


@dataclasses.dataclass(frozen=True)
class Variant:
    """One configuration of our stack: attention kernels, precision, recomputation, batch layout."""

    name: str
    """Label in the results (e.g. 'te', 'sdpa-full')."""
    attention_backend: str = "te"
    """te (Transformer Engine spec) | sdpa (our torch-SDPA core attention) | local (Megatron's unfused)."""
    fp8: str | None = None
    """FP8 linear layers (hybrid | e4m3) through Transformer Engine; None = bf16/fp32 only."""
    recompute: str = "none"
    """Activation recomputation: none | selective (core attention) | full (whole layers)."""
    packing: bool = True
    """Pack a pair's sequences into one THD row (True) or pad them into a [b, s] batch (False)."""
    objectives: tuple[str, ...] = OBJECTIVES
    """Base objectives measured with this variant."""
    modes: tuple[str, ...] = MODES
    """solo (SoLoPO: 2 short + 1 long sequence per pair) and/or long (2 long sequences per pair)."""
    ra_gradient: str = "both"
    """Where the SoLo-RA gradient flows in solo mode: both | long (objective.ra_gradient, docs/objectives.md)."""

    def __post_init__(self) -> None:
        where = f"bench variant {self.name!r}"
        if self.attention_backend not in BACKENDS:
            raise ValueError(f"{where}: backend={self.attention_backend!r} is not one of {', '.join(BACKENDS)}")
        if self.recompute not in RECOMPUTES:
            raise ValueError(f"{where}: recompute={self.recompute!r} is not one of {', '.join(RECOMPUTES)}")
        if self.fp8 not in (None, "hybrid", "e4m3"):
            raise ValueError(f"{where}: fp8={self.fp8!r} is not one of off, hybrid, e4m3")
        if self.fp8 is not None and self.attention_backend != "te":
            raise ValueError(f"{where}: fp8={self.fp8} needs backend=te (FP8 runs through Transformer Engine)")
        if self.packing and self.attention_backend == "local":
            raise ValueError(f"{where}: Megatron's local attention cannot run packed (THD) rows; add packing=off")
        if self.ra_gradient not in RA_GRADIENT:
            raise ValueError(f"{where}: ra_gradient={self.ra_gradient!r} is not one of {', '.join(RA_GRADIENT)}")
        bad = [o for o in self.objectives if o not in OBJECTIVES] + [m for m in self.modes if m not in MODES]
        if bad or not self.objectives or not self.modes:
            raise ValueError(f"{where}: objectives must be a non-empty subset of {OBJECTIVES} and modes of "
                             f"{MODES}; got objectives={self.objectives}, modes={self.modes}")

    def settings(self) -> dict[str, Any]:
        return dataclasses.asdict(self)


# The GPU sweep: the first variant runs every objective; the others isolate one factor on ORPO.
DEFAULT_GPU_VARIANTS: tuple[Variant, ...] = (
    Variant("te", "te"),
    Variant("sdpa", "sdpa", objectives=("orpo",)),
    Variant("local", "local", packing=False, objectives=("orpo",)),
    Variant("te-fp8", "te", fp8="hybrid", objectives=("orpo",)),
    Variant("te-selective", "te", recompute="selective", objectives=("orpo",)),
    Variant("te-full", "te", recompute="full", objectives=("orpo",)),
    Variant("te-padded", "te", packing=False, objectives=("orpo",)),
)
DEFAULT_CPU_VARIANTS: tuple[Variant, ...] = (
    Variant("sdpa", "sdpa"),
    Variant("sdpa-padded", "sdpa", packing=False, objectives=("orpo",)),
)


def parse_variant(spec: str, known: Sequence[Variant]) -> Variant:
    """A variant from a name in `known` or a spec 'NAME:key=value,...'.

    Keys: backend, fp8 (off|hybrid|e4m3), recompute, packing (on|off), ra_gradient (both|long), objectives
    and modes ('+'-separated, e.g. objectives=orpo+dpo). Example: 'sdpa-full:backend=sdpa,recompute=full'.
    """
    by_name = {v.name: v for v in known}
    if ":" not in spec:
        if spec not in by_name:
            raise ValueError(f"unknown bench variant {spec!r}; known: {', '.join(by_name)} "
                             "(or give a spec NAME:backend=...,fp8=...,recompute=...,packing=on|off)")
        return by_name[spec]
    name, _, body = spec.partition(":")
    fields: dict[str, Any] = {"name": name}
    for item in filter(None, body.split(",")):
        key, eq, value = item.partition("=")
        if not eq:
            raise ValueError(f"bench variant {spec!r}: {item!r} is not key=value")
        if key == "backend":
            fields["attention_backend"] = value
        elif key == "fp8":
            fields["fp8"] = None if value == "off" else value
        elif key in ("recompute", "ra_gradient"):
            fields[key] = value
        elif key == "packing":
            if value not in ("on", "off"):
                raise ValueError(f"bench variant {spec!r}: packing must be on or off, got {value!r}")
            fields["packing"] = value == "on"
        elif key in ("objectives", "modes"):
            fields[key] = tuple(value.split("+"))
        else:
            raise ValueError(f"bench variant {spec!r}: unknown key {key!r} "
                             "(backend, fp8, recompute, packing, ra_gradient, objectives, modes)")
    return Variant(**fields)


@dataclasses.dataclass
class BenchConfig:
    """Everything one `solopo bench` run measures and how; stored verbatim in the results JSON."""

    preset: str
    """Model preset (random weights), e.g. llama-1b (TinyLlama-1.1B shape) or smollm2-135m."""
    device: str
    """cuda or cpu."""
    dtype: str
    """Weights/compute dtype: bf16 (GPU default) or fp32 (CPU default)."""
    long_lengths: tuple[int, ...]
    """Long sequence lengths in tokens (context + response), ascending."""
    short_length: int
    """Short sequence length in tokens (context + response), fixed across the sweep (paper: 1K)."""
    response_length: int
    """Response tokens at the end of every sequence (chosen and rejected alike)."""
    pairs_per_step: int = 1
    """Preference pairs per optimizer step (one micro-batch)."""
    warmup_steps: int = 1
    """Steps run and discarded before timing (kernel selection, allocator growth, optimizer state)."""
    measure_steps: int = 3
    """Timed steps; the reported time is their median."""
    variants: tuple[Variant, ...] = DEFAULT_CPU_VARIANTS
    """Configurations of our stack to measure."""
    search: bool = True
    """Run the maximum-length search for every variant x objective x mode."""
    search_limit: int = 131072
    """Largest long length the search tries."""
    search_granularity: int = 1024
    """Bisection stops when the gap between the longest fitting and the shortest failing length is
    at most this many tokens; probed lengths are multiples of it."""
    baseline: str = "auto"
    """auto (trl if importable, else transformers) | trl | transformers | none."""
    baseline_modes: tuple[str, ...] = ("long",)
    """Modes for the baseline (ORPO): long is what a user would run; solo measures SoLoPO on plain HF."""
    baseline_grad_ckpt: tuple[bool, ...] = (True,)
    """Gradient checkpointing settings for the baseline (each one is a separate baseline runner)."""
    peak_tflops: float | None = None
    """MFU denominator in TFLOP/s (default: H100 dense BF16 989 on CUDA; none on CPU -> MFU null)."""
    gpu_memory_cap_gib: float | None = None
    """CUDA only: cap this process's usable GPU memory (torch.cuda.set_per_process_memory_fraction),
    e.g. to emulate a smaller GPU; allocations beyond it raise a real torch.OutOfMemoryError."""
    simulate_oom_above_step_tokens: int | None = None
    """Testing aid: raise torch.OutOfMemoryError instead of running any step that holds more than this
    many tokens (all sequences of all pairs: a crude stand-in for activation memory, so solo-X and
    long-X fail at different long lengths as they would on a GPU). Recorded in the JSON and printed
    above the tables, so such results can never pass as measurements."""
    time_budget_s: float | None = None
    """Stop starting new cases after this many seconds (the rest are recorded as skipped)."""
    seed: int = 1234
    """Seed for the synthetic tokens and the random initialization."""

    def __post_init__(self) -> None:
        if self.device not in ("cuda", "cpu"):
            raise ValueError(f"bench --device must be cuda or cpu, got {self.device!r}")
        if self.dtype not in ("bf16", "fp32", "fp16"):
            raise ValueError(f"bench --dtype must be bf16, fp16 or fp32, got {self.dtype!r}")
        if not self.long_lengths or list(self.long_lengths) != sorted(set(self.long_lengths)):
            raise ValueError(f"bench --long-lengths must be distinct and ascending, got {self.long_lengths}")
        if not 0 < self.response_length < self.short_length:
            raise ValueError(f"bench --response-length ({self.response_length}) must be positive and shorter "
                             f"than --short-length ({self.short_length}): the response ends each sequence")
        if self.long_lengths[0] <= self.short_length:
            raise ValueError(f"bench --long-lengths must all exceed --short-length ({self.short_length})")
        for name in ("pairs_per_step", "measure_steps", "search_granularity"):
            if getattr(self, name) < 1:
                raise ValueError(f"bench {name} must be >= 1, got {getattr(self, name)}")
        if self.warmup_steps < 0:
            raise ValueError(f"bench warmup_steps must be >= 0, got {self.warmup_steps}")
        if self.baseline not in BASELINE_KINDS:
            raise ValueError(f"bench --baseline must be one of {', '.join(BASELINE_KINDS)}, got {self.baseline!r}")
        if any(m not in MODES for m in self.baseline_modes):
            raise ValueError(f"bench --baseline-modes must be a subset of {MODES}, got {self.baseline_modes}")
        if self.gpu_memory_cap_gib is not None and self.device != "cuda":
            raise ValueError("bench --gpu-memory-cap-gib needs --device cuda (on CPU use --simulate-oom-above-step-tokens)")
        if not self.variants and self.baseline == "none":
            raise ValueError("bench: nothing to measure (--variants none and --baseline none)")
        if len({v.name for v in self.variants}) != len(self.variants):
            raise ValueError(f"bench variants need distinct names, got {[v.name for v in self.variants]}")
        if self.search and not self.long_lengths[0] <= self.search_limit:
            raise ValueError(f"bench --search-limit ({self.search_limit}) is below the first long length "
                             f"({self.long_lengths[0]}); raise it or pass --no-search")

        get_preset(self.preset)  # unknown names fail here, listing the known presets
        if self.device == "cpu" and any(v.attention_backend == "te" for v in self.variants):
            raise ValueError("bench: the te backend needs --device cuda; pick sdpa/local variants on CPU")

    def settings(self) -> dict[str, Any]:
        out = dataclasses.asdict(self)
        out["variants"] = [v.settings() for v in self.variants]
        return out
