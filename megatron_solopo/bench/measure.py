"""One measured case: timed steps, throughput / MFU summary, out-of-memory caught as a result."""

from __future__ import annotations

import dataclasses
import gc
import statistics
import time
from collections.abc import Callable, Sequence

from megatron_solopo.bench.random_pairs import pair_sequences
from megatron_solopo.bench.config import BenchConfig
from megatron_solopo.plan.flops import sequence_train_flops


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


# Allocation failures that libraries report as plain RuntimeErrors (cuBLAS / cuDNN workspaces, TE's
# "CUDA Error: out of memory"); matched case-insensitively.
_OOM_MARKERS = ("cuda out of memory", "cublas_status_alloc_failed", "cudnn_status_alloc_failed",
                "cuda error: out of memory", "out of memory")


def _is_oom(err: BaseException) -> bool:
    """torch.OutOfMemoryError, or a library's RuntimeError that reports a failed GPU allocation."""
    import torch

    if isinstance(err, torch.OutOfMemoryError):
        return True
    text = str(err).lower()
    return isinstance(err, RuntimeError) and any(marker in text for marker in _OOM_MARKERS)


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

