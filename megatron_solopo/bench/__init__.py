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

Modules: config (BenchConfig, Variant, variant specs), flops (FLOP / MFU formulas), batches (synthetic
pairs), measure (one timed case, OOM caught), search (max-length search), stack (our Megatron runner),
baseline (transformers / TRL runner), ratios, report (JSON / Markdown / PNG), sweep (BenchRun: one
invocation's cases and searches), commands (`add_arguments` / `run`, what megatron_solopo.cli calls).
"""

from __future__ import annotations

from .baseline import (
    BASELINE_DESCRIPTIONS,
    HFBaselineRunner,
    hf_llama_config,
    resolve_baseline,
)
from .batches import pair_sequences, synthetic_sample, synthetic_samples
from .commands import add_arguments, config_from_args, run
from .config import (
    BACKENDS,
    BASELINE_KINDS,
    DEFAULT_CPU_VARIANTS,
    DEFAULT_GPU_VARIANTS,
    MODES,
    OBJECTIVES,
    RECOMPUTES,
    BenchConfig,
    Variant,
    parse_variant,
)
from .flops import (
    H100_BF16_DENSE_PEAK_TFLOPS,
    attention_flops,
    linear_flops_per_token,
    lm_head_flops,
    sequence_train_flops,
)
from .measure import CaseResult, free_memory, run_case, summarize, time_steps
from .ratios import compute_ratios
from .report import (
    PAPER_REFERENCE,
    SCHEMA,
    across_runs_baseline_ratios,
    machine_info,
    machine_slug,
    markdown_report,
    plot_results,
    regenerate_report,
    write_json_atomic,
)
from .search import SearchResult, search_max_length
from .stack import StackRunner
from .sweep import BenchRun

__all__ = [
    "BACKENDS", "BASELINE_DESCRIPTIONS", "BASELINE_KINDS", "DEFAULT_CPU_VARIANTS", "DEFAULT_GPU_VARIANTS",
    "H100_BF16_DENSE_PEAK_TFLOPS", "MODES", "OBJECTIVES", "PAPER_REFERENCE", "RECOMPUTES", "SCHEMA",
    "BenchConfig", "BenchRun", "CaseResult", "HFBaselineRunner", "SearchResult", "StackRunner", "Variant",
    "across_runs_baseline_ratios", "add_arguments", "attention_flops", "compute_ratios", "config_from_args",
    "free_memory", "hf_llama_config", "linear_flops_per_token", "lm_head_flops", "machine_info", "machine_slug",
    "markdown_report", "pair_sequences", "parse_variant", "plot_results", "regenerate_report", "resolve_baseline",
    "run", "run_case", "search_max_length", "sequence_train_flops", "summarize", "synthetic_sample",
    "synthetic_samples", "time_steps", "write_json_atomic",
]
