"""`solopo bench`: SoLoPO's efficiency claims measured on this stack, side by side in one run.

For one model preset (random weights) and synthetic token batches of the right shapes, it trains
solo-X and long-X (X = ORPO, DPO with synthetic precomputed reference log-probs, SimPO) at a list of
long lengths with the short context fixed, and reports per variant and length: time per preference
pair (median of the measured steps after warm-up), tokens/s, model TFLOP/s and MFU (attention FLOPs
counted, see `sequence_train_flops`), peak GPU memory, and the maximum trainable long length found by
a doubling + bisection search in which out-of-memory is caught and recorded. Variants switch the
attention backend (te | sdpa | local), FP8, activation recomputation and packing. A baseline runs in
the same process on the same lengths: a Hugging Face transformers LlamaForCausalLM of the same shape
(SDPA attention) trained with TRL's ORPO loss path when TRL imports, else with a plain ORPO step.

Outputs (docs/benchmarks.md describes every field): `bench-<preset>-<tag>.json` under
`<out>/<date>-<machine>/`, rewritten after every case so a killed run keeps what it measured, then a
Markdown table and PNG plots regenerated from every JSON in that folder (`--report DIR` redoes only
that). `--device cpu` is a toy mode (tiny preset, short lengths) that the tests run end to end.

Why trials run in this process instead of a subprocess per trial: a subprocess pays the import and the
model build (tens of seconds for a 1.1B model) per trial, which the GPU budget cannot afford. Instead
an out-of-memory error is caught at the case boundary, every reference to the failed step's tensors
is dropped (exception, batch, gradients), then `gc.collect()` and `torch.cuda.empty_cache()` run, and
the memory still allocated afterwards is recorded (`allocated_after_free_gib`) so a leak would show.
Run with PYTORCH_CUDA_ALLOC_CONF=expandable_segments:True (benchmarks/run_h100.sh does) so allocator
fragmentation after an OOM does not make a smaller length fail spuriously.
"""

from __future__ import annotations

import argparse
import dataclasses
import datetime
import gc
import json
import math
import os
import pathlib
import platform
import statistics
import sys
import time
from collections.abc import Callable, Iterable, Mapping, Sequence
from typing import Any

SCHEMA = "solopo-bench/1"
H100_BF16_DENSE_PEAK_TFLOPS = 989.0
"""NVIDIA H100 SXM dense BF16 tensor-core peak (no sparsity); the default MFU denominator on CUDA."""

OBJECTIVES = ("orpo", "dpo", "simpo")
MODES = ("solo", "long")
BACKENDS = ("te", "sdpa", "local")
RECOMPUTES = ("none", "selective", "full")
BASELINE_KINDS = ("auto", "trl", "transformers", "none")

# The paper's efficiency table (minutes per training run, short context fixed at 1K) and maximum
# trainable length, quoted for comparison in the report; never mixed with our numbers.
PAPER_REFERENCE: dict[str, Any] = {
    "source": "SoLoPO (Sun et al., ICLR 2026), efficiency experiments; short context fixed at 1K; "
              "LLaMA-Factory + FlashAttention-2 + DeepSpeed ZeRO-3, bf16",
    "runtime_min": {
        "4K": {"long_orpo": 72.52, "solo_orpo": 66.63},
        "8K": {"long_orpo": 145.11, "solo_orpo": 83.62},
        "12K": {"long_orpo": 235.98, "solo_orpo": 144.21},
        "16K": {"long_orpo": None, "solo_orpo": 179.20, "long_orpo_status": "oom"},
        "19K": {"long_orpo": None, "solo_orpo": 205.98, "long_orpo_status": "oom"},
    },
    "solo_over_long_time_8K": round(83.62 / 145.11, 3),
    "max_length_tokens": {"long": 9 * 1024, "solo": 19 * 1024},
    "max_length_ratio": round(19 / 9, 2),
}


# ============================================================================================ config
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

    Keys: backend, fp8 (off|hybrid|e4m3), recompute, packing (on|off), objectives and modes
    ('+'-separated, e.g. objectives=orpo+dpo). Example: 'sdpa-full:backend=sdpa,recompute=full'.
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
        elif key == "recompute":
            fields["recompute"] = value
        elif key == "packing":
            if value not in ("on", "off"):
                raise ValueError(f"bench variant {spec!r}: packing must be on or off, got {value!r}")
            fields["packing"] = value == "on"
        elif key in ("objectives", "modes"):
            fields[key] = tuple(value.split("+"))
        else:
            raise ValueError(f"bench variant {spec!r}: unknown key {key!r} "
                             "(backend, fp8, recompute, packing, objectives, modes)")
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
        from megatron_solopo.model.presets import get_preset

        get_preset(self.preset)  # unknown names fail here, listing the known presets
        if self.device == "cpu" and any(v.attention_backend == "te" for v in self.variants):
            raise ValueError("bench: the te backend needs --device cuda; pick sdpa/local variants on CPU")

    def settings(self) -> dict[str, Any]:
        out = dataclasses.asdict(self)
        out["variants"] = [v.settings() for v in self.variants]
        return out


# ============================================================================================= FLOPs
def linear_flops_per_token(preset) -> int:
    """Forward FLOPs of one token through every layer's matmuls (QKV, output projection, SwiGLU MLP).

    2 FLOPs per multiply-add: 2 * (h*d*(nq + 2*nkv) + nq*d*h + 3*h*f) per layer, times the layers.
    Norms, RoPE, activations and softmax are not counted (they are not matmuls).
    """
    h, f, d = preset.hidden_size, preset.ffn_hidden_size, preset.head_dim
    nq, nkv = preset.num_attention_heads, preset.num_query_groups
    per_layer = h * d * (nq + 2 * nkv) + nq * d * h + 3 * h * f
    return 2 * per_layer * preset.num_layers


def attention_flops(preset, seq_len_tokens: int) -> int:
    """Forward FLOPs of causal attention (QK^T and PV) over one sequence, all layers.

    Per layer and query head: QK^T is 2*s*s*d, PV another 2*s*s*d; causal masking keeps half of the
    s*s score matrix, so 2*2*s^2*(nq*d)/2 = 2*s^2*nq*d per layer. GQA does not change it (every
    query head still scores every visible key).
    """
    s, d, nq = seq_len_tokens, preset.head_dim, preset.num_attention_heads
    return 2 * s * s * nq * d * preset.num_layers


def lm_head_flops(preset, positions: int) -> int:
    """Forward FLOPs of the output layer at `positions` positions: 2 * h * vocab each."""
    return 2 * preset.hidden_size * preset.vocab_size * positions


def sequence_train_flops(preset, seq_len_tokens: int, response_tokens: int) -> int:
    """Model FLOPs of one training pass (forward + backward = 3 x forward) over one sequence.

    forward = s * linear_flops_per_token + attention_flops(s) + lm_head_flops(response_tokens):
    the LM head is counted only where the loss needs log-probs (the response positions), for our
    stack and for the baseline alike, so the two share the numerator of TFLOP/s and MFU; the
    baseline's full-vocabulary logits over the context are overhead, not model FLOPs. Recomputed
    activations are not counted either (model FLOPs, not hardware FLOPs).
    """
    forward = (seq_len_tokens * linear_flops_per_token(preset) + attention_flops(preset, seq_len_tokens)
               + lm_head_flops(preset, response_tokens))
    return 3 * forward


# ==================================================================================== sequences/data
def pair_sequences(objective: str, mode: str, long_len: int, short_len: int) -> list[tuple[str, int]]:
    """(sequence name, tokens) for one preference pair: what the policy runs forward and backward.

    solo-X: short chosen, short rejected, long chosen; long-X: long chosen, long rejected
    (`objectives.required_sequences` decides; reference log-probs are precomputed data, no pass).
    """
    from megatron_solopo.objectives import ObjectiveConfig, required_sequences

    names = sorted(required_sequences(ObjectiveConfig(name=objective, mode=mode)))
    return [(name, long_len if name.startswith("long") else short_len) for name in names]


def synthetic_sample(objective: str, mode: str, long_len: int, short_len: int, response_len: int,
                     vocab_size: int, generator, sample_id: str) -> dict[str, Any]:
    """One synthetic preference pair in the tokenized-sample format of `training.batching`.

    Keys: "id"; per scored role "<role>_input_ids" (random context ids, then the response: y_w for
    chosen roles, y_l for rejected ones, identical under the short and the long context) and
    "<role>_loss_mask" (1 on the response); for DPO, "ref_<role>_logps" drawn near
    response_len * -ln(vocab), what a randomly initialized reference model would give.
    """
    import torch

    from megatron_solopo.objectives import ObjectiveConfig, logps_key, required_reference_sequences

    def ids(n: int) -> list[int]:
        return torch.randint(0, vocab_size, (n,), generator=generator).tolist()

    responses = {"chosen": ids(response_len), "rejected": ids(response_len)}
    sample: dict[str, Any] = {"id": sample_id}
    for role, tokens in pair_sequences(objective, mode, long_len, short_len):
        sample[f"{role}_input_ids"] = ids(tokens - response_len) + responses[role.split("_")[1]]
        sample[f"{role}_loss_mask"] = [0] * (tokens - response_len) + [1] * response_len
    typical = -response_len * math.log(vocab_size)
    for role in sorted(required_reference_sequences(ObjectiveConfig(name=objective, mode=mode))):
        sample[logps_key(role, reference=True)] = typical * (1 + 0.01 * float(torch.rand((), generator=generator)))
    return sample


def synthetic_samples(objective: str, mode: str, long_len: int, cfg: "BenchConfig", vocab_size: int) -> list[dict]:
    """`cfg.pairs_per_step` synthetic samples, seeded by (seed, long length) so every runner sees the same."""
    import torch

    gen = torch.Generator().manual_seed(cfg.seed + long_len)
    return [synthetic_sample(objective, mode, long_len, cfg.short_length, cfg.response_length, vocab_size, gen,
                             f"synthetic-{long_len}-{i}") for i in range(cfg.pairs_per_step)]


# ===================================================================================== measurement
@dataclasses.dataclass
class CaseResult:
    """One (runner, variant, objective, mode, long length) measurement; `status` says if it ran."""

    runner: str
    variant: str
    objective: str
    mode: str
    long_length: int
    status: str
    """ok | oom | error | skipped"""
    sequences_per_pair: list[list]
    tokens_per_step: int
    model_flops_per_step: int
    step_times_s: list[float] = dataclasses.field(default_factory=list)
    time_per_pair_s: float | None = None
    pairs_per_s: float | None = None
    tokens_per_s: float | None = None
    model_tflops_per_s: float | None = None
    mfu: float | None = None
    peak_memory_gib: float | None = None
    allocated_after_free_gib: float | None = None
    error: str | None = None


# Allocation failures that libraries report as plain RuntimeErrors (cuBLAS / cuDNN workspaces, TE).
_OOM_MARKERS = ("CUDA out of memory", "CUBLAS_STATUS_ALLOC_FAILED", "CUDNN_STATUS_ALLOC_FAILED",
                "CUDA error: out of memory")


def _is_oom(err: BaseException) -> bool:
    """torch.OutOfMemoryError, or a library's RuntimeError that reports a failed GPU allocation."""
    import torch

    if isinstance(err, torch.OutOfMemoryError):
        return True
    return isinstance(err, RuntimeError) and any(marker in str(err) for marker in _OOM_MARKERS)


def free_memory(device: str) -> float | None:
    """Collects garbage and returns cached CUDA blocks; the GiB still allocated (None on CPU)."""
    gc.collect()
    if device != "cuda":
        return None
    import torch

    torch.cuda.synchronize()
    torch.cuda.empty_cache()
    return torch.cuda.memory_allocated() / 2**30


def _sync(device: str) -> None:
    if device == "cuda":
        import torch

        torch.cuda.synchronize()


def time_steps(step: Callable[[], None], warmup: int, measured: int, device: str) -> list[float]:
    """Runs `warmup` untimed then `measured` timed steps; wall seconds of each timed step (synchronized)."""
    for _ in range(warmup):
        step()
    _sync(device)
    times = []
    for _ in range(measured):
        start = time.perf_counter()
        step()
        _sync(device)
        times.append(time.perf_counter() - start)
    return times


def summarize(times_s: Sequence[float], pairs: int, tokens: int, flops: int,
              peak_tflops: float | None) -> dict[str, float | None]:
    """Median step time -> time per pair, pairs/s, tokens/s, model TFLOP/s and MFU."""
    median = statistics.median(times_s)
    tflops = flops / median / 1e12
    return {
        "time_per_pair_s": median / pairs,
        "pairs_per_s": pairs / median,
        "tokens_per_s": tokens / median,
        "model_tflops_per_s": tflops,
        "mfu": tflops / peak_tflops if peak_tflops else None,
    }


def run_case(runner, objective: str, mode: str, long_len: int, cfg: BenchConfig,
             peak_tflops: float | None, steps: tuple[int, int] | None = None) -> CaseResult:
    """Measures one case; an out-of-memory error anywhere in it becomes status 'oom', never a crash."""
    import torch

    seqs = pair_sequences(objective, mode, long_len, cfg.short_length)
    pairs = cfg.pairs_per_step
    result = CaseResult(
        runner=runner.name, variant=runner.variant_name, objective=objective, mode=mode, long_length=long_len,
        status="ok", sequences_per_pair=[list(s) for s in seqs], tokens_per_step=pairs * sum(t for _, t in seqs),
        model_flops_per_step=pairs * sum(sequence_train_flops(runner.preset, t, cfg.response_length)
                                         for _, t in seqs))
    warmup, measured = steps or (cfg.warmup_steps, cfg.measure_steps)
    free_memory(cfg.device)
    if cfg.device == "cuda":
        torch.cuda.reset_peak_memory_stats()
    failure: str | None = None
    step = None
    try:
        limit = cfg.simulate_oom_above_step_tokens
        if limit is not None and result.tokens_per_step > limit:
            raise torch.OutOfMemoryError(f"simulated: {result.tokens_per_step} tokens in the step > "
                                         f"--simulate-oom-above-step-tokens {limit}")
        step = runner.make_step(objective, mode, long_len)
        result.step_times_s = time_steps(step, warmup, measured, cfg.device)
    except Exception as err:  # noqa: BLE001 - OOM and failures are results of the benchmark
        failure = f"{type(err).__name__}: {str(err).strip().splitlines()[0][:300] if str(err).strip() else ''}"
        result.status = "oom" if _is_oom(err) else "error"
        if result.status == "error":
            import traceback

            traceback.print_exc()
    step = None  # the batch it holds goes before the next case
    if cfg.device == "cuda":
        result.peak_memory_gib = torch.cuda.max_memory_allocated() / 2**30
    if failure is not None:  # the exception (and its frames' tensors) is gone here
        result.error = failure
        runner.recover()
        result.allocated_after_free_gib = free_memory(cfg.device)
    elif measured:
        for key, value in summarize(result.step_times_s, pairs, result.tokens_per_step,
                                    result.model_flops_per_step, peak_tflops).items():
            setattr(result, key, value)
    return result


# ===================================================================================== length search
@dataclasses.dataclass
class SearchResult:
    """Outcome of a maximum-length search for one runner x variant x objective x mode."""

    max_ok: int | None
    """Longest long length that trained (None: not even the start fitted)."""
    first_fail: int | None
    """Shortest length that failed (None: the limit fitted)."""
    hit_limit: bool
    """True when the search limit itself trained (the true maximum may be higher)."""
    trials: list[dict[str, Any]]
    """Every probe in order: {"long_length", "status"} (+ error)."""


def _align_down(value: int, granularity: int) -> int:
    return (value // granularity) * granularity


def search_max_length(fits: Callable[[int], bool], start: int, limit: int, granularity: int,
                      known_ok: int | None = None, known_fail: int | None = None) -> SearchResult:
    """Longest length L in [start, limit] with fits(L), by doubling and then bisection.

    Doubles from the longest known-fitting length (or `start`) until a length fails or the limit
    fits, then bisects on multiples of `granularity` until the gap is at most `granularity`.
    Assumes fitting is monotone in L (memory grows with length). `known_ok` / `known_fail` seed the
    search from the sweep's results, saving trials.
    """
    trials: list[dict[str, Any]] = []

    def probe(length: int) -> bool:
        ok = fits(length)
        trials.append({"long_length": length, "status": "ok" if ok else "fail"})
        return ok

    lo, hi = known_ok, known_fail
    if lo is None:
        if hi is not None and hi <= start:
            return SearchResult(None, hi, False, trials)
        if not probe(start):
            return SearchResult(None, start, False, trials)
        lo = start
    while hi is None:
        if lo >= limit:
            return SearchResult(lo, None, True, trials)
        nxt = min(2 * lo, limit)
        if probe(nxt):
            lo = nxt
        else:
            hi = nxt
    while hi - lo > granularity:
        mid = _align_down((lo + hi) // 2, granularity)
        if mid <= lo:
            mid = lo + granularity
        if mid >= hi:
            break
        if probe(mid):
            lo = mid
        else:
            hi = mid
    return SearchResult(lo, hi, False, trials)


# ============================================================================== our stack (engine)
class StackRunner:
    """Our Megatron-Core stack for one variant: DDP model chunks, Megatron optimizer, `train_step`."""

    def __init__(self, preset, variant: Variant, cfg: BenchConfig):
        self.preset, self.variant, self.cfg = preset, variant, cfg
        self.variant_name = variant.name
        self.name = "ours"
        self.state = _build_stack(preset, variant, cfg)

    def make_step(self, objective: str, mode: str, long_len: int) -> Callable[[], None]:
        """A closure running one optimizer step of this objective/mode at `long_len` (batch built once)."""
        samples = synthetic_samples(objective, mode, long_len, self.cfg, self.preset.vocab_size)
        microbatches = _stack_microbatches(self.state, samples, objective, mode)
        return lambda: _stack_train_step(self.state, microbatches, objective, mode)

    def recover(self) -> None:
        """After a failed step: empty the gradient buffers so nothing of it reaches the next case."""
        for chunk in self.state.chunks:
            chunk.zero_grad_buffer()
        self.state.optimizer.zero_grad()

    def close(self) -> None:
        self.state = None
        free_memory(self.cfg.device)


@dataclasses.dataclass
class _StackState:
    chunks: list
    optimizer: Any
    parallel: Any
    layout: str
    pad_to_multiple_of: int
    device: str
    steps_taken: int = 0


def _model_config(preset, variant: Variant, cfg: BenchConfig):
    from megatron_solopo.model.config import ModelConfig

    return ModelConfig(preset=preset.name, attention_backend=variant.attention_backend, params_dtype=cfg.dtype,
                       fp8=variant.fp8, recompute=variant.recompute, init_seed=cfg.seed)


def _build_stack(preset, variant: Variant, cfg: BenchConfig) -> _StackState:
    """Model chunks (on the device), DDP and the Megatron optimizer, as the training run builds them.

    AdamW at lr 1e-6 and constant schedule: the weights move a little each step, like training,
    without the random-init model diverging over the benchmark's steps.
    """
    import torch

    from megatron_solopo.model.builder import build_model_chunks
    from megatron_solopo.parallel import ParallelConfig
    from megatron_solopo.training.optim import build_optimizer, wrap_ddp

    parallel = ParallelConfig()
    chunks = build_model_chunks(preset, parallel, _model_config(preset, variant, cfg))  # on the GPU if any
    chunks = wrap_ddp(chunks)
    optimizer = build_optimizer(chunks, lr=1e-6, weight_decay=0.0, clip_grad=1.0)
    # FP8 GEMMs need token counts in multiples of 16 (MEGATRON_NOTES: packing under FP8)
    return _StackState(chunks=chunks, optimizer=optimizer, parallel=parallel,
                       layout="packed" if variant.packing else "padded",
                       pad_to_multiple_of=16 if variant.fp8 else 1, device=cfg.device)


def _stack_microbatches(state: _StackState, samples: list[dict], objective: str, mode: str) -> list:
    """One micro-batch holding every pair of the step (collate_microbatches), already on the device."""
    from megatron_solopo.objectives import ObjectiveConfig
    from megatron_solopo.training.batching import collate_microbatches

    microbatches = collate_microbatches(samples, ObjectiveConfig(name=objective, mode=mode), state.parallel,
                                        state.layout, micro_batch_pairs=len(samples),
                                        pad_to_multiple_of=state.pad_to_multiple_of)
    return [mb.to(state.device) for mb in microbatches]


def _stack_train_step(state: _StackState, microbatches: list, objective: str, mode: str) -> None:
    """The one call into the training room: one optimizer step of our stack (training.step.train_step)."""
    from megatron_solopo.objectives import ObjectiveConfig
    from megatron_solopo.training.step import train_step

    train_step(state.chunks, state.optimizer, None, microbatches, ObjectiveConfig(name=objective, mode=mode),
               state.parallel, state.steps_taken)
    state.steps_taken += 1


# ======================================================================================= baseline
BASELINE_DESCRIPTIONS = {
    "trl": "transformers LlamaForCausalLM (SDPA) + TRL ORPOTrainer.get_batch_loss_metrics (chosen and rejected "
           "concatenated into one batch, full-vocabulary logits) + torch AdamW; TRL's Trainer loop not used",
    "transformers": "transformers LlamaForCausalLM (SDPA), full-vocabulary logits, ORPO from "
                    "megatron_solopo.objectives on response log-prob sums, torch AdamW",
}


def resolve_baseline(kind: str) -> str:
    """auto -> trl when TRL's ORPO trainer imports, else transformers; trl without TRL is an error."""
    if kind in ("none", "transformers"):
        return kind
    try:
        from trl.experimental.orpo import ORPOTrainer  # noqa: F401
        have_trl = True
    except Exception:  # noqa: BLE001 - any import failure means TRL is not usable
        have_trl = False
    if kind == "trl" and not have_trl:
        raise ValueError("bench --baseline trl: trl.experimental.orpo.ORPOTrainer does not import; "
                         "pip install trl (>= 1.0), or use --baseline transformers")
    return "trl" if have_trl else "transformers"


def hf_llama_config(preset, dtype: str):
    """A transformers LlamaConfig with the preset's shape (SDPA attention)."""
    from transformers import LlamaConfig

    if preset.qkv_bias:
        raise ValueError(f"bench baseline: preset {preset.name!r} has a QKV bias (Qwen2); the transformers "
                         "baseline builds LlamaForCausalLM: pick a Llama-shaped preset")
    return LlamaConfig(
        vocab_size=preset.vocab_size, hidden_size=preset.hidden_size, intermediate_size=preset.ffn_hidden_size,
        num_hidden_layers=preset.num_layers, num_attention_heads=preset.num_attention_heads,
        num_key_value_heads=preset.num_query_groups, head_dim=preset.head_dim,
        max_position_embeddings=preset.max_position_embeddings, rms_norm_eps=preset.norm_epsilon,
        rope_theta=preset.rotary_base, tie_word_embeddings=preset.tie_embeddings, use_cache=False,
        attn_implementation="sdpa")


class HFBaselineRunner:
    """What a user would run instead: transformers LlamaForCausalLM (SDPA) + an ORPO step + AdamW.

    kind 'trl': the loss path of TRL's ORPOTrainer (`get_batch_loss_metrics`: chosen and rejected
    concatenated into one [2, L] batch, full-vocabulary logits, TRL's log-prob and odds-ratio code)
    on a trainer object built without its __init__ (no dataset, tokenizer or accelerate loop needed;
    the compute per step is TRL's). kind 'transformers': the same forward, ORPO from
    `megatron_solopo.objectives` on response log-prob sums. Both compute logits at every position,
    as these trainers do. Mode solo (ORPO only) runs SoLoPO's three sequences on this stack.
    """

    def __init__(self, preset, kind: str, grad_ckpt: bool, cfg: BenchConfig):
        import torch
        from transformers import LlamaForCausalLM

        self.preset, self.kind, self.grad_ckpt, self.cfg = preset, kind, grad_ckpt, cfg
        self.name = f"baseline-{kind}"
        self.variant_name = "gc" if grad_ckpt else "no-gc"
        torch.manual_seed(cfg.seed)
        dtype = {"bf16": torch.bfloat16, "fp16": torch.float16, "fp32": torch.float32}[cfg.dtype]
        with torch.device(cfg.device):  # initialize on the GPU: a 1.1B model's CPU init takes tens of seconds
            self.model = LlamaForCausalLM(hf_llama_config(preset, cfg.dtype)).to(dtype=dtype)
        if grad_ckpt:
            self.model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
        self.model.train()
        self.optimizer = torch.optim.AdamW(self.model.parameters(), lr=1e-6, weight_decay=0.0)
        self.trl_trainer = _trl_orpo_trainer(cfg.device) if kind == "trl" else None

    def make_step(self, objective: str, mode: str, long_len: int) -> Callable[[], None]:
        import torch

        if objective != "orpo":
            raise ValueError(f"bench baseline runs ORPO only, not {objective!r}")
        samples = synthetic_samples(objective, mode, long_len, self.cfg, self.preset.vocab_size)
        roles = [role for role, _ in pair_sequences(objective, mode, long_len, self.cfg.short_length)]
        seqs = {role: torch.tensor([s[f"{role}_input_ids"] for s in samples], device=self.cfg.device)
                for role in roles}  # [pairs, tokens] per role
        response = self.cfg.response_length

        def step() -> None:
            if mode == "long" and self.trl_trainer is not None:
                loss = _trl_orpo_loss(self.trl_trainer, self.model, seqs["long_chosen"], seqs["long_rejected"],
                                      response)
            else:
                loss = _hf_orpo_loss(self.model, seqs, mode, response)
            loss.backward()
            self.optimizer.step()
            self.optimizer.zero_grad(set_to_none=True)

        return step

    def recover(self) -> None:
        self.optimizer.zero_grad(set_to_none=True)

    def close(self) -> None:
        self.model = self.optimizer = self.trl_trainer = None
        free_memory(self.cfg.device)


def _response_logps(model, input_ids, response_tokens: int):
    """[b] sums of log p(token) over the last `response_tokens` tokens, from full-vocabulary logits."""
    import torch

    logits = model(input_ids=input_ids, use_cache=False).logits  # [b, s, V]
    targets = input_ids[:, -response_tokens:]  # [b, R]
    # position t predicts token t+1: the response's R tokens are predicted from positions s-R-1 .. s-2
    pred = logits[:, -response_tokens - 1:-1, :].float()
    return torch.gather(pred.log_softmax(-1), 2, targets.unsqueeze(-1)).squeeze(-1).sum(-1)


def _hf_orpo_loss(model, seqs: Mapping[str, Any], mode: str, response_tokens: int):
    """Mean ORPO (mode long) or SoLo-ORPO (mode solo) loss over the batch, objectives room formulas."""
    import torch

    from megatron_solopo.objectives import ObjectiveConfig, objective_loss

    stats = {}
    context = "long" if mode == "long" else "short"
    pair = torch.cat([seqs[f"{context}_chosen"], seqs[f"{context}_rejected"]])  # [2b, s] like TRL
    b = seqs[f"{context}_chosen"].shape[0]
    logps = _response_logps(model, pair, response_tokens)
    stats[f"{context}_chosen_logps"], stats[f"{context}_rejected_logps"] = logps[:b], logps[b:]
    if mode == "solo":
        stats["long_chosen_logps"] = _response_logps(model, seqs["long_chosen"], response_tokens)
    counts = torch.full((b,), float(response_tokens), device=logps.device)
    stats["chosen_tokens"] = stats["rejected_tokens"] = counts
    loss, _ = objective_loss(ObjectiveConfig(name="orpo", mode=mode), stats, reduction="mean")
    return loss


def _trl_orpo_trainer(device: str):
    """TRL's ORPOTrainer object without its __init__: its loss methods need only these attributes."""
    import types

    from trl.experimental.orpo import ORPOTrainer

    trainer = ORPOTrainer.__new__(ORPOTrainer)
    trainer.beta = 0.1  # ORPO's lambda (TRL's default)
    trainer.is_encoder_decoder = False
    trainer.padding_value = 0
    trainer.aux_loss_enabled = False
    trainer.accelerator = types.SimpleNamespace(device=device, gather_for_metrics=lambda x: x)
    return trainer


def _trl_orpo_loss(trainer, model, chosen_ids, rejected_ids, response_tokens: int):
    """TRL ORPOTrainer.get_batch_loss_metrics on pre-tokenized chosen/rejected rows ([b, L] each)."""
    import torch

    def side(ids):
        labels = ids.clone()
        labels[:, :-response_tokens] = -100  # TRL masks the prompt in the labels
        return {"input_ids": ids, "attention_mask": torch.ones_like(ids), "labels": labels}

    batch = {f"{name}_{key}": value for name, ids in (("chosen", chosen_ids), ("rejected", rejected_ids))
             for key, value in side(ids).items()}
    loss, _metrics = trainer.get_batch_loss_metrics(model, batch, train_eval="train")
    return loss


# =========================================================================================== ratios
def _ok(case: Mapping[str, Any]) -> bool:
    return case["status"] == "ok" and case.get("time_per_pair_s") is not None


def compute_ratios(cases: Sequence[Mapping[str, Any]], searches: Sequence[Mapping[str, Any]]) -> dict[str, list]:
    """The ratios the paper and the issue quote, from one run's cases and searches.

    - solo_over_long_time_per_pair: solo-X / long-X seconds per pair, same runner, variant, X, length
      (paper: 0.58 for ORPO at 8K);
    - max_length_solo_over_long: longest trainable solo-X length / long-X length (paper: 2.1x);
      'lower_bound' when solo reached the search limit;
    - ours_over_baseline_pairs_per_s: our pairs/s (each variant and mode, ORPO) / the baseline's
      long-ORPO pairs/s at the same length (the issue's bar: >= 2 at 8K and 32K for solo-ORPO).
    """
    index = {(c["runner"], c["variant"], c["objective"], c["mode"], c["long_length"]): c for c in cases}
    time_ratios = []
    for (runner, variant, objective, mode, length), solo in index.items():
        long_ = index.get((runner, variant, objective, "long", length))
        if mode == "solo" and long_ is not None:
            ratio = (solo["time_per_pair_s"] / long_["time_per_pair_s"]) if _ok(solo) and _ok(long_) else None
            time_ratios.append({"runner": runner, "variant": variant, "objective": objective, "long_length": length,
                                "ratio": ratio, "solo_status": solo["status"], "long_status": long_["status"]})
    by_key = {(s["runner"], s["variant"], s["objective"], s["mode"]): s for s in searches}
    length_ratios = []
    for (runner, variant, objective, mode), solo in by_key.items():
        long_ = by_key.get((runner, variant, objective, "long"))
        if mode != "solo" or long_ is None:
            continue
        ratio, bound = None, None
        if solo["max_ok"] and long_["max_ok"] and not long_["hit_limit"]:
            ratio = solo["max_ok"] / long_["max_ok"]
            bound = "lower_bound" if solo["hit_limit"] else "measured"
        length_ratios.append({"runner": runner, "variant": variant, "objective": objective,
                              "solo_max_ok": solo["max_ok"], "long_max_ok": long_["max_ok"],
                              "ratio": ratio, "kind": bound})
    baseline_ratios = []
    for (runner, variant, objective, mode, length), ours in index.items():
        if not runner == "ours" or objective != "orpo":
            continue
        for base in (c for c in cases if c["runner"].startswith("baseline") and c["mode"] == "long"
                     and c["objective"] == "orpo" and c["long_length"] == length):
            ratio = ours["pairs_per_s"] / base["pairs_per_s"] if _ok(ours) and _ok(base) else None
            baseline_ratios.append({"variant": variant, "mode": mode, "long_length": length,
                                    "baseline": f"{base['runner']}/{base['variant']}", "ratio": ratio,
                                    "ours_status": ours["status"], "baseline_status": base["status"]})
    return {"solo_over_long_time_per_pair": time_ratios, "max_length_solo_over_long": length_ratios,
            "ours_over_baseline_pairs_per_s": baseline_ratios}


# =========================================================================================== report
def machine_info(device: str) -> dict[str, Any]:
    """Machine, GPU and library versions for the results JSON."""
    import torch

    from megatron_solopo.model.backends import package_version

    gpu = torch.cuda.get_device_name(0) if device == "cuda" else None
    return {
        "hostname": platform.node(), "platform": platform.platform(), "python": sys.version.split()[0],
        "cpu_count": os.cpu_count(), "device": device, "gpu_name": gpu,
        "gpu_memory_gib": (torch.cuda.get_device_properties(0).total_memory / 2**30) if gpu else None,
        "torch": torch.__version__, "cuda": torch.version.cuda,
        "megatron_core": package_version("megatron-core"),
        "transformer_engine": package_version("transformer-engine") or package_version("transformer_engine"),
        "transformers": package_version("transformers"), "trl": package_version("trl"),
    }


def machine_slug(info: Mapping[str, Any]) -> str:
    """Folder-name label for the machine: the GPU name ('nvidia-h100-80gb-hbm3') or 'cpu'."""
    name = info.get("gpu_name") or "cpu"
    return "".join(ch if ch.isalnum() else "-" for ch in name.lower()).strip("-").replace("--", "-")


def write_json_atomic(path: pathlib.Path, obj: Any) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")  # *.tmp: git-ignored under benchmarks/results
    tmp.write_text(json.dumps(obj, indent=2) + "\n", encoding="utf-8")
    os.replace(tmp, path)


def _fmt(value: Any, digits: int = 3) -> str:
    if value is None:
        return "-"
    if isinstance(value, float):
        return f"{value:.{digits}g}" if abs(value) < 1000 else f"{value:,.0f}"
    return str(value)


def _length_label(tokens: int) -> str:
    return f"{tokens // 1024}K" if tokens % 1024 == 0 else str(tokens)


def markdown_report(results: Sequence[Mapping[str, Any]]) -> str:
    """The Markdown tables of one or more results JSON documents."""
    lines = ["# solopo bench results", "",
             "Generated by `solopo bench` from the JSON files in this folder (docs/benchmarks.md explains "
             "each column). Times are medians of the measured steps; memory is "
             "torch.cuda.max_memory_allocated.", ""]
    for res in results:
        meta, settings = res["meta"], res["settings"]
        lines += [f"## {settings['preset']} on {meta['gpu_name'] or 'CPU'} ({res['date']}, tag {res['tag']})", "",
                  f"torch {meta['torch']}, megatron-core {meta['megatron_core']}, TE {meta['transformer_engine']}, "
                  f"transformers {meta['transformers']}, trl {meta['trl']}; {settings['dtype']}, short "
                  f"{settings['short_length']} tokens, response {settings['response_length']}, "
                  f"{settings['pairs_per_step']} pair(s)/step, {settings['measure_steps']} timed steps after "
                  f"{settings['warmup_steps']} warm-up. Status: {res['status']}.", ""]
        if settings.get("simulate_oom_above_step_tokens") is not None:
            lines += [f"**Test run: out-of-memory simulated above {settings['simulate_oom_above_step_tokens']} "
                      "tokens per step; not a measurement.**", ""]
        lines += ["| runner | variant | objective | mode | long | status | s/pair | pairs/s | tokens/s | "
                  "TFLOP/s | MFU | peak GiB |", "|" + "---|" * 12]
        for c in res["cases"]:
            lines.append(f"| {c['runner']} | {c['variant']} | {c['objective']} | {c['mode']} | "
                         f"{_length_label(c['long_length'])} | {c['status']} | {_fmt(c['time_per_pair_s'])} | "
                         f"{_fmt(c['pairs_per_s'])} | {_fmt(c['tokens_per_s'])} | {_fmt(c['model_tflops_per_s'])} | "
                         f"{_fmt(c['mfu'], 2)} | {_fmt(c['peak_memory_gib'])} |")
        lines += ["", "Maximum trainable long length (search; trials = probes beyond the sweep's lengths):", "",
                  "| runner | variant | objective | mode | max ok | first fail | trials |", "|" + "---|" * 7]
        for s in res["searches"]:
            max_ok = _fmt(s["max_ok"]) + (" (limit)" if s["hit_limit"] else "")
            lines.append(f"| {s['runner']} | {s['variant']} | {s['objective']} | {s['mode']} | {max_ok} | "
                         f"{_fmt(s['first_fail'])} | {len(s['trials'])} |")
        ratios = res["ratios"]
        lines += ["", "Ratios (paper: solo/long ORPO time per pair 0.58 at 8K; max length 2.1x):", ""]
        for r in ratios["solo_over_long_time_per_pair"]:
            why = "" if r["ratio"] is not None else f" (solo {r['solo_status']}, long {r['long_status']})"
            lines.append(f"- time/pair solo-{r['objective']} / long-{r['objective']} ({r['runner']}, {r['variant']}, "
                         f"{_length_label(r['long_length'])}): {_fmt(r['ratio'])}{why}")
        for r in ratios["max_length_solo_over_long"]:
            lines.append(f"- max length solo-{r['objective']} / long-{r['objective']} ({r['runner']}, {r['variant']}): "
                         f"{_fmt(r['ratio'])} ({r['solo_max_ok']} vs {r['long_max_ok']}, {r['kind']})")
        for r in ratios["ours_over_baseline_pairs_per_s"]:
            why = "" if r["ratio"] is not None else f" (ours {r['ours_status']}, baseline {r['baseline_status']})"
            lines.append(f"- pairs/s ours {r['mode']}-orpo ({r['variant']}) / {r['baseline']} long-orpo at "
                         f"{_length_label(r['long_length'])}: {_fmt(r['ratio'])}{why}")
        lines.append("")
    return "\n".join(lines + _across_runs(results))


def across_runs_baseline_ratios(results: Sequence[Mapping[str, Any]]) -> list[dict[str, Any]]:
    """Per preset and length: our fastest solo-ORPO (any variant, any run in the folder) vs each
    baseline long-ORPO case, when the two come from different invocations on the same machine (a
    phase split by the GPU's 10-minute call limit). Same-run ratios are in each run's `ratios`."""
    ours: dict[tuple[str, int], tuple[float, str]] = {}
    bases = []
    for res in results:
        preset = res["settings"]["preset"]
        for c in res["cases"]:
            if not _ok(c) or c["objective"] != "orpo":
                continue
            key = (preset, c["long_length"])
            if c["runner"] == "ours" and c["mode"] == "solo":
                if key not in ours or c["pairs_per_s"] > ours[key][0]:
                    ours[key] = (c["pairs_per_s"], f"{c['variant']} ({res['tag']})")
            elif c["runner"].startswith("baseline") and c["mode"] == "long":
                bases.append((key, c["pairs_per_s"], f"{c['runner']}/{c['variant']} ({res['tag']})"))
    return [{"preset": key[0], "long_length": key[1], "ours": ours[key][1], "baseline": label,
             "ratio": ours[key][0] / base_rate} for key, base_rate, label in bases if key in ours]


def _across_runs(results: Sequence[Mapping[str, Any]]) -> list[str]:
    rows = across_runs_baseline_ratios(results)
    if len(results) < 2 or not rows:
        return []
    lines = ["## Across the runs in this folder", "",
             "Fastest solo-ORPO of our stack (any variant) / baseline long-ORPO, pairs/s, same machine "
             "and session, separate invocations:", "",
             "| preset | long | ours | baseline | ratio |", "|---|---|---|---|---|"]
    for r in rows:
        lines.append(f"| {r['preset']} | {_length_label(r['long_length'])} | {r['ours']} | {r['baseline']} | "
                     f"{_fmt(r['ratio'])} |")
    return lines + [""]


def plot_results(results: Sequence[Mapping[str, Any]], folder: pathlib.Path) -> list[pathlib.Path]:
    """time_per_pair.png and memory.png: one line per runner/variant/objective/mode, x = long length."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    written = []
    for key, ylabel, fname in (("time_per_pair_s", "seconds per preference pair", "time_per_pair.png"),
                               ("peak_memory_gib", "peak GPU memory (GiB)", "memory.png")):
        fig, ax = plt.subplots(figsize=(9, 6))
        drawn = 0
        for res in results:
            series: dict[str, list[tuple[int, float]]] = {}
            for c in res["cases"]:
                label = f"{res['settings']['preset']} {c['runner']}/{c['variant']} {c['mode']}-{c['objective']}"
                if c["status"] == "ok" and c.get(key) is not None:
                    series.setdefault(label, []).append((c["long_length"], c[key]))
            for label, points in sorted(series.items()):
                xs, ys = zip(*sorted(points))
                ax.plot(xs, ys, marker="o", linestyle="--" if " long-" in label else "-", label=label)
                drawn += 1
        ax.set_xscale("log", base=2)
        ax.set_xlabel("long sequence length (tokens)")
        ax.set_ylabel(ylabel)
        ax.set_title(f"solopo bench: {ylabel} vs long length" + ("" if drawn else " (no data)"))
        if drawn:
            ax.legend(fontsize=6, ncol=2)
        ax.grid(True, which="both", alpha=0.3)
        path = folder / fname
        fig.tight_layout()
        fig.savefig(path, dpi=120)
        plt.close(fig)
        written.append(path)
    return written


def regenerate_report(folder: pathlib.Path) -> list[pathlib.Path]:
    """table.md + plots from every bench-*.json in `folder`; returns the files written."""
    files = sorted(folder.glob("bench-*.json"))
    if not files:
        raise ValueError(f"{folder}: no bench-*.json results to report on (run `solopo bench` first)")
    results = [json.loads(f.read_text(encoding="utf-8")) for f in files]
    for f, res in zip(files, results):
        if res.get("schema") != SCHEMA:
            raise ValueError(f"{f}: schema {res.get('schema')!r} is not {SCHEMA!r}")
    table = folder / "table.md"
    table.write_text(markdown_report(results), encoding="utf-8")
    try:
        import matplotlib  # noqa: F401
    except ImportError:  # the GPU machine has no matplotlib: plot later where it is installed
        print(f"plots skipped: matplotlib is not installed here; run `solopo bench --report {folder}` "
              "where it is", flush=True)
        return [table]
    return [table, *plot_results(results, folder)]


# ============================================================================================== CLI
def _tokens(text: str) -> int:
    """'8K' -> 8192, '1500' -> 1500."""
    item = text.strip().upper()
    try:
        return int(item[:-1]) * 1024 if item.endswith("K") else int(item)
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r} is not a token count (e.g. 8192 or 8K)") from None


def _int_list(text: str) -> tuple[int, ...]:
    """'4K,8K,16384' -> (4096, 8192, 16384)."""
    return tuple(_tokens(item) for item in text.split(","))


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--device", choices=("cuda", "cpu"), default=None,
                        help="cuda (default when available) or cpu (toy mode: tiny preset, short lengths)")
    parser.add_argument("--preset", default=None, help="model preset, random weights (default llama-1b; cpu: tiny)")
    parser.add_argument("--dtype", choices=("bf16", "fp16", "fp32"), default=None, help="default bf16 (cpu: fp32)")
    parser.add_argument("--long-lengths", type=_int_list, default=None,
                        help="comma list, K = 1024 (default 4K,8K,16K,32K,64K,128K; cpu: 128,256)")
    parser.add_argument("--short-length", type=int, default=None, help="short sequence tokens (default 1024; cpu: 64)")
    parser.add_argument("--response-length", type=int, default=None, help="response tokens (default 256; cpu: 16)")
    parser.add_argument("--pairs-per-step", type=int, default=1)
    parser.add_argument("--warmup-steps", type=int, default=None, help="default 2 (cpu: 1)")
    parser.add_argument("--measure-steps", type=int, default=None, help="default 5 (cpu: 2)")
    parser.add_argument("--variants", nargs="+", default=None, metavar="VARIANT",
                        help="variant names or NAME:key=value,... specs, space-separated (docs/benchmarks.md), "
                             "or none (baseline only); GPU names: "
                             f"{', '.join(v.name for v in DEFAULT_GPU_VARIANTS)}")
    parser.add_argument("--objectives", default=None,
                        help="run exactly these objectives on every variant (comma list of orpo,dpo,simpo)")
    parser.add_argument("--no-search", action="store_true", help="skip the maximum-length search")
    parser.add_argument("--search-limit", type=_tokens, default=None, help="default 128K (cpu: 1024)")
    parser.add_argument("--search-granularity", type=int, default=None, help="default 1024 (cpu: 64)")
    parser.add_argument("--baseline", choices=BASELINE_KINDS, default="auto")
    parser.add_argument("--baseline-modes", default="long", help="comma list of long,solo (ORPO)")
    parser.add_argument("--baseline-grad-ckpt", default="on", help="comma list of on,off")
    parser.add_argument("--peak-tflops", type=float, default=None,
                        help=f"MFU denominator (default {H100_BF16_DENSE_PEAK_TFLOPS:g} = H100 dense BF16 on cuda)")
    parser.add_argument("--gpu-memory-cap-gib", type=float, default=None,
                        help="cap the usable GPU memory (real OOM beyond it), e.g. to emulate a smaller GPU")
    parser.add_argument("--simulate-oom-above-step-tokens", type=int, default=None,
                        help="testing aid: raise OutOfMemoryError for steps holding more tokens (recorded in the JSON)")
    parser.add_argument("--time-budget-s", type=float, default=None,
                        help="start no new case after this many seconds (the rest is recorded as skipped)")
    parser.add_argument("--seed", type=int, default=1234)
    parser.add_argument("--out", default="benchmarks/results",
                        help="results root; files go to OUT/<date>-<machine>/ (or exactly --run-dir)")
    parser.add_argument("--run-dir", default=None, help="write into this folder instead of OUT/<date>-<machine>")
    parser.add_argument("--tag", default=None, help="suffix of the JSON name (default: the time of day)")
    parser.add_argument("--report", metavar="DIR", default=None,
                        help="only regenerate table.md and the plots from the JSON files in DIR")


def _on_off_list(text: str) -> tuple[bool, ...]:
    values = tuple(item.strip() for item in text.split(","))
    if any(v not in ("on", "off") for v in values):
        raise ValueError(f"bench --baseline-grad-ckpt takes a comma list of on/off, got {text!r}")
    return tuple(v == "on" for v in values)


def config_from_args(args: argparse.Namespace) -> BenchConfig:
    """BenchConfig from the command line, filling device-dependent defaults."""
    import torch

    device = args.device or ("cuda" if torch.cuda.is_available() else "cpu")
    if device == "cuda" and not torch.cuda.is_available():
        raise ValueError("bench --device cuda but torch sees no CUDA GPU; use --device cpu for the toy run")
    gpu = device == "cuda"

    def pick(value, gpu_default, cpu_default):
        return value if value is not None else (gpu_default if gpu else cpu_default)

    known = DEFAULT_GPU_VARIANTS if gpu else DEFAULT_CPU_VARIANTS
    if args.variants == ["none"]:  # the baseline alone
        variants: tuple[Variant, ...] = ()
    elif args.variants:
        variants = tuple(parse_variant(spec, DEFAULT_GPU_VARIANTS + DEFAULT_CPU_VARIANTS) for spec in args.variants)
    else:
        variants = known
    if args.objectives:
        only = tuple(o.strip() for o in args.objectives.split(","))
        variants = tuple(dataclasses.replace(v, objectives=only) for v in variants)
    return BenchConfig(
        preset=pick(args.preset, "llama-1b", "tiny"), device=device, dtype=pick(args.dtype, "bf16", "fp32"),
        long_lengths=pick(args.long_lengths, tuple(k * 1024 for k in (4, 8, 16, 32, 64, 128)), (128, 256)),
        short_length=pick(args.short_length, 1024, 64), response_length=pick(args.response_length, 256, 16),
        pairs_per_step=args.pairs_per_step, warmup_steps=pick(args.warmup_steps, 2, 1),
        measure_steps=pick(args.measure_steps, 5, 2), variants=variants, search=not args.no_search,
        search_limit=pick(args.search_limit, 131072, 1024),
        search_granularity=pick(args.search_granularity, 1024, 64), baseline=args.baseline,
        baseline_modes=tuple(m.strip() for m in args.baseline_modes.split(",") if m.strip()),
        baseline_grad_ckpt=_on_off_list(args.baseline_grad_ckpt),
        peak_tflops=args.peak_tflops if args.peak_tflops is not None else (H100_BF16_DENSE_PEAK_TFLOPS if gpu else None),
        gpu_memory_cap_gib=args.gpu_memory_cap_gib, simulate_oom_above_step_tokens=args.simulate_oom_above_step_tokens,
        time_budget_s=args.time_budget_s, seed=args.seed)


class BenchRun:
    """One `solopo bench` invocation: runs the cases in order and keeps the JSON up to date."""

    def __init__(self, cfg: BenchConfig, folder: pathlib.Path, tag: str, argv: Sequence[str]):
        from megatron_solopo.model.presets import get_preset

        self.cfg, self.folder = cfg, folder
        self.preset = get_preset(cfg.preset)
        self.path = folder / f"bench-{cfg.preset}-{tag}.json"
        self.started = time.monotonic()
        self.doc: dict[str, Any] = {
            "schema": SCHEMA, "tag": tag, "status": "running",
            "date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
            "command": ["solopo", "bench", *argv], "meta": machine_info(cfg.device), "settings": cfg.settings(),
            "model": {"preset": dataclasses.asdict(self.preset), "parameters": self.preset.num_parameters(),
                      "linear_flops_per_token": linear_flops_per_token(self.preset)},
            "paper_reference": PAPER_REFERENCE, "runners": [], "cases": [], "searches": [],
            "ratios": compute_ratios([], []),
        }

    def save(self) -> None:
        self.doc["ratios"] = compute_ratios(self.doc["cases"], self.doc["searches"])
        write_json_atomic(self.path, self.doc)

    def out_of_time(self) -> bool:
        budget = self.cfg.time_budget_s
        return budget is not None and time.monotonic() - self.started > budget

    def measure(self, runner, objectives: Iterable[str], modes: Iterable[str]) -> None:
        """The length sweep and (optionally) the max-length search of one runner."""
        for objective in objectives:
            for mode in modes:
                self._sweep(runner, objective, mode)
                if self.cfg.search:
                    self._search(runner, objective, mode)

    def _skipped(self, runner, objective: str, mode: str, length: int, why: str) -> dict[str, Any]:
        seqs = pair_sequences(objective, mode, length, self.cfg.short_length)
        return dataclasses.asdict(CaseResult(
            runner=runner.name, variant=runner.variant_name, objective=objective, mode=mode, long_length=length,
            status="skipped", sequences_per_pair=[list(s) for s in seqs],
            tokens_per_step=self.cfg.pairs_per_step * sum(t for _, t in seqs),
            model_flops_per_step=self.cfg.pairs_per_step * sum(
                sequence_train_flops(self.preset, t, self.cfg.response_length) for _, t in seqs), error=why))

    def _sweep(self, runner, objective: str, mode: str) -> None:
        failed_at = None
        for length in self.cfg.long_lengths:
            if failed_at is not None:
                case = self._skipped(runner, objective, mode, length, f"shorter length {failed_at} ran out of memory")
            elif self.out_of_time():
                case = self._skipped(runner, objective, mode, length, "time budget spent")
            else:
                case = dataclasses.asdict(run_case(runner, objective, mode, length, self.cfg, self.cfg.peak_tflops))
                print(_case_line(case), flush=True)
                failed_at = length if case["status"] == "oom" else None
            self.doc["cases"].append(case)
            self.save()

    def _search(self, runner, objective: str, mode: str) -> None:
        mine = [c for c in self.doc["cases"] if (c["runner"], c["variant"], c["objective"], c["mode"])
                == (runner.name, runner.variant_name, objective, mode)]
        known_ok = max((c["long_length"] for c in mine if c["status"] == "ok"), default=None)
        known_fail = min((c["long_length"] for c in mine if c["status"] == "oom"), default=None)
        errors: dict[int, str] = {}

        def fits(length: int) -> bool:
            if self.out_of_time():
                raise TimeoutError("time budget spent")
            case = run_case(runner, objective, mode, length, self.cfg, None, steps=(0, 1))
            print(f"  search {runner.name}/{runner.variant_name} {mode}-{objective} {length}: {case.status}", flush=True)
            if case.status == "error":
                raise RuntimeError(f"search trial at {length} failed: {case.error}")
            if case.status == "oom":
                errors[length] = case.error or "oom"
            return case.status == "ok"

        record: dict[str, Any] = {"runner": runner.name, "variant": runner.variant_name, "objective": objective,
                                  "mode": mode, "start": self.cfg.long_lengths[0], "limit": self.cfg.search_limit,
                                  "granularity": self.cfg.search_granularity}
        try:
            result = search_max_length(fits, self.cfg.long_lengths[0], self.cfg.search_limit,
                                       self.cfg.search_granularity, known_ok, known_fail)
            record.update(dataclasses.asdict(result), status="ok")
            for trial in record["trials"]:
                if trial["long_length"] in errors:
                    trial["error"] = errors[trial["long_length"]]
        except (TimeoutError, RuntimeError) as err:
            record.update(max_ok=None, first_fail=None, hit_limit=False, trials=[], status="incomplete",
                          error=str(err))
        self.doc["searches"].append(record)
        self.save()


def _case_line(case: Mapping[str, Any]) -> str:
    tail = (f"{case['time_per_pair_s']:.4g} s/pair, peak {_fmt(case['peak_memory_gib'])} GiB"
            if case["status"] == "ok" else case.get("error") or "")
    return (f"{case['runner']}/{case['variant']} {case['mode']}-{case['objective']} "
            f"{_length_label(case['long_length'])}: {case['status']} {tail}")


def _runners(cfg: BenchConfig, preset, kind: str):
    """(factory, objectives, modes, label) per runner, built lazily so only one model lives at a time."""
    for variant in cfg.variants:
        yield (lambda v=variant: StackRunner(preset, v, cfg)), variant.objectives, variant.modes, variant.name
    if kind == "none":
        return
    for grad_ckpt in cfg.baseline_grad_ckpt:
        yield ((lambda g=grad_ckpt: HFBaselineRunner(preset, kind, g, cfg)), ("orpo",), cfg.baseline_modes,
               f"baseline-{kind}/{'gc' if grad_ckpt else 'no-gc'}")


def _init_parallel(cfg: BenchConfig) -> None:
    """Megatron's parallel state for one process (TP = PP = CP = 1); GPU memory cap if asked."""
    import torch

    from megatron_solopo.parallel import ParallelConfig, initialize_parallel

    initialize_parallel(ParallelConfig(), seed=cfg.seed)
    if cfg.gpu_memory_cap_gib is not None:
        total = torch.cuda.get_device_properties(0).total_memory / 2**30
        torch.cuda.set_per_process_memory_fraction(min(1.0, cfg.gpu_memory_cap_gib / total))


def run(args: argparse.Namespace) -> int:
    if args.report:
        for path in regenerate_report(pathlib.Path(args.report)):
            print(f"wrote {path}")
        return 0
    try:
        cfg = config_from_args(args)
        baseline = resolve_baseline(cfg.baseline)  # fails fast, before an hour of measurements
    except ValueError as err:
        print(f"solopo bench: error: {err}", file=sys.stderr)
        return 2
    info = machine_info(cfg.device)
    date = datetime.date.today().isoformat()
    folder = pathlib.Path(args.run_dir) if args.run_dir else pathlib.Path(args.out) / f"{date}-{machine_slug(info)}"
    tag = args.tag or datetime.datetime.now().strftime("%H%M%S")
    bench = BenchRun(cfg, folder, tag, sys.argv[2:] if len(sys.argv) > 2 else [])
    bench.doc["baseline"] = {"requested": cfg.baseline, "kind": baseline,
                             "description": BASELINE_DESCRIPTIONS.get(baseline)}
    _init_parallel(cfg)
    try:
        for factory, objectives, modes, label in _runners(cfg, bench.preset, baseline):
            if bench.out_of_time():
                bench.doc["runners"].append({"runner": label, "status": "skipped (time budget)"})
                continue
            started = time.perf_counter()
            try:
                runner = factory()
            except Exception as err:  # noqa: BLE001 - an unavailable variant is a result, not a crash
                bench.doc["runners"].append({"runner": label, "status": "unavailable",
                                             "error": f"{type(err).__name__}: {err}"})
                print(f"{label}: unavailable ({type(err).__name__}: {err})", flush=True)
                free_memory(cfg.device)
                continue
            record = {"runner": label, "status": "built", "build_s": round(time.perf_counter() - started, 2),
                      "allocated_after_build_gib": free_memory(cfg.device)}
            bench.doc["runners"].append(record)
            bench.measure(runner, objectives, modes)
            runner.close()
            del runner
            # what the next runner inherits: should be ~0 unless a library kept a reference
            record["allocated_after_close_gib"] = free_memory(cfg.device)
        bench.doc["status"] = "incomplete (time budget)" if bench.out_of_time() else "complete"
    finally:
        if bench.doc["status"] == "running":
            bench.doc["status"] = "aborted"
        bench.save()
        from megatron_solopo.parallel import destroy_parallel

        destroy_parallel()
    for path in [bench.path, *regenerate_report(folder)]:
        print(f"wrote {path}")
    return 0
