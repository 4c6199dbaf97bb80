"""`solopo bench` command line: arguments, `BenchConfig` from them, and `run`."""

from __future__ import annotations

import argparse
import dataclasses
import datetime
import pathlib
import signal
import sys
import time

from megatron_solopo.bench.baseline import BASELINE_DESCRIPTIONS, HFBaselineRunner, resolve_baseline
from megatron_solopo.bench.config import (
    BASELINE_KINDS,
    DEFAULT_CPU_VARIANTS,
    DEFAULT_GPU_VARIANTS,
    BenchConfig,
    Variant,
    parse_variant,
)
from megatron_solopo.bench.measure import free_memory
from megatron_solopo.bench.report import machine_info, machine_slug, regenerate_report
from megatron_solopo.bench.stack import StackRunner
from megatron_solopo.bench.sweep import BenchRun
from megatron_solopo.parallel import ParallelConfig, destroy_parallel, initialize_parallel, request_device
from megatron_solopo.parallel.device import cuda_in_use
from megatron_solopo.plan.flops import H100_BF16_DENSE_PEAK_TFLOPS


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


    device = args.device or ("cuda" if cuda_in_use() else "cpu")
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
    """Megatron's parallel state for one process (TP = PP = CP = 1) on `cfg.device`; GPU memory cap if asked.

    The device is requested process-wide first (`parallel.request_device`), so `--device cpu` on a GPU
    host runs our stack on the CPU (gloo, CPU shim, model not moved to CUDA) like the baseline.
    """
    import torch


    request_device(cfg.device)
    initialize_parallel(ParallelConfig(), seed=cfg.seed, backend="nccl" if cfg.device == "cuda" else "gloo")
    if cfg.gpu_memory_cap_gib is not None:
        total = torch.cuda.get_device_properties(0).total_memory / 2**30
        torch.cuda.set_per_process_memory_fraction(min(1.0, cfg.gpu_memory_cap_gib / total))


def _save_on_sigterm(bench: BenchRun):
    """SIGTERM (a time cap, the GPU session's runner) ends the run through its `finally`: the JSON is saved
    with status 'aborted (SIGTERM)' and what was measured so far, instead of the process dying unsaved.
    Returns the previous handler (restored when the run ends); None off the main thread (nothing installed)."""
    import threading

    if threading.current_thread() is not threading.main_thread():
        return None

    def stop(signum, frame):  # noqa: ARG001
        signal.signal(signal.SIGTERM, signal.SIG_IGN)  # a second SIGTERM must not cut the save
        bench.doc["status"] = "aborted (SIGTERM)"
        bench.stop_signal = signum  # if library code swallows the SystemExit, the next case boundary raises it again
        raise SystemExit(128 + signum)

    return signal.signal(signal.SIGTERM, stop)


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
    previous_handler = _save_on_sigterm(bench)
    _init_parallel(cfg)
    try:
        bench.save()  # from the start: a run killed before its first case still leaves its settings
        for factory, objectives, modes, label in _runners(cfg, bench.preset, baseline):
            bench.check_stop()
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
        bench.check_stop()
        bench.doc["status"] = "incomplete (time budget)" if bench.out_of_time() else "complete"
    finally:
        if bench.doc["status"] == "running":
            bench.doc["status"] = "aborted"
        bench.save()

        destroy_parallel()
        if previous_handler is not None:
            signal.signal(signal.SIGTERM, previous_handler)
    for path in [bench.path, *regenerate_report(folder)]:
        print(f"wrote {path}")
    return 0
