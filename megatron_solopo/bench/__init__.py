"""`solopo bench`: SoLoPO's efficiency claims measured on this stack, side by side in one run.

For one model preset (random weights) and synthetic token batches of the right shapes, it trains
solo-X and long-X (X = ORPO, DPO with synthetic precomputed reference log-probs, SimPO) at a list of
long lengths with the short context fixed, and reports per variant and length: time per preference
pair (median of the measured steps after warm-up), tokens/s, model TFLOP/s and MFU (attention FLOPs
counted, see `plan.flops.sequence_train_flops`), peak GPU memory, and the maximum trainable long length found by
a doubling + bisection search in which out-of-memory is caught and recorded. Variants switch the
attention backend (te | sdpa | local), FP8, activation recomputation and packing. A baseline runs in
the same process on the same lengths: a Hugging Face transformers LlamaForCausalLM of the same shape
(SDPA attention) trained with TRL's ORPO loss path when TRL imports, else with a plain ORPO step.

Outputs (docs/benchmarks.md describes every field): `bench-<preset>-<tag>.json` under
`<out>/<date>-<machine>/`, rewritten after every case so a killed run keeps what it measured, then a
Markdown table and PNG plots regenerated from every JSON in that folder (`--report DIR` redoes only
that). `--device cpu` is a toy mode (tiny preset, short lengths) that the tests run end to end.

Why `solopo bench`'s search trials run in this process instead of a subprocess per trial: a subprocess
pays the import and the model build (tens of seconds for a 1.1B model) per trial. (The GPU session does
the opposite for its few max-length probes, one process each, lengths planned by `solopo plan`: probes.py.)
Instead
an out-of-memory error is caught at the case boundary, every reference to the failed step's tensors
is dropped (exception, batch, gradients), then `gc.collect()` and `torch.cuda.empty_cache()` run, and
the memory still allocated afterwards is recorded (`allocated_after_free_gib`) so a leak would show.
Run with PYTORCH_CUDA_ALLOC_CONF=expandable_segments:True (benchmarks/gpu_session.sh does) so allocator
fragmentation after an OOM does not make a smaller length fail spuriously.

Modules: config (BenchConfig, Variant, variant specs), random_pairs (random-token pairs of the right
shapes), measure (one timed case, OOM caught), max_length (max-length search), stack (our Megatron runner),
baseline (transformers / TRL runner), ratios, report (JSON / Markdown / PNG), sweep (BenchRun: one
invocation's cases and searches); the command (`add_arguments` / `run`, what megatron_solopo.cli calls) is
megatron_solopo/commands/bench.py. The FLOP / MFU formulas are planning's (megatron_solopo/plan/flops.py):
bench imports plan, never the reverse.
The GPU session (benchmarks/gpu_session.sh): gpu_session (plan, runner, dry run), probes (planned max-length
probes and the planner's verdict), junit_live (a pytest plugin rewriting JUnit XML after every test),
gpu_session_sim (simulated steps for the CPU test of the whole plan), gpu_session_report (`--report`).
The package exports only the entry points below; import everything else from its defining module.
They are imported on first use (PEP 562): the GPU session's modules (gpu_session, gpu_session_sim,
gpu_session_report, probes, junit_live) import only the standard library, because the session starts them on
the GPU machine before megatron-core is installed (tests/test_layers.py checks it).
"""

from __future__ import annotations

import importlib

_EXPORTS = {"BenchConfig": "config", "Variant": "config", "parse_variant": "config",
            "regenerate_report": "report", "BenchRun": "sweep"}

__all__ = ["BenchConfig", "BenchRun", "Variant", "parse_variant", "regenerate_report"]


def __getattr__(name: str):
    if name in _EXPORTS:
        return getattr(importlib.import_module(f"megatron_solopo.bench.{_EXPORTS[name]}"), name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
