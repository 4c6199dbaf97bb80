"""Simulated GPU-session steps (`session.py --run --simulate`): what each real step writes, without a GPU.

Each step of the plan is replaced by `python -m megatron_solopo.bench.gpu_session_sim KIND NAME --work W ...`,
which writes what the real command would write, where it would write it, from MADE-UP figures (every
file says `simulated`): the install lines, env.json, a live JUnit file from a real pytest run of three
small tests (one passes, one fails, one skips) through the junit_live plugin, a bench JSON rewritten case
by case, and each probe's bench JSON: the maxima train, the long-ORPO over-memory probe runs out of
memory, and the solo-ORPO one hangs until its cap kills it (it saves an aborted JSON on SIGTERM, as
`solopo bench` does). So a CPU test runs the session runner end to end -- caps, kills, printing, $OUT's
files -- in seconds. Imports only the standard library (and the bench modules that do).
"""

from __future__ import annotations

import argparse
import json
import os
import pathlib
import signal
import subprocess
import sys
import textwrap
import time
from collections.abc import Sequence
from typing import Any
from megatron_solopo.bench import probes
from megatron_solopo.bench.ratios import compute_ratios
from megatron_solopo.bench.report import SCHEMA

SIMULATED_GPU = "SIMULATED NVIDIA H100 80GB HBM3"


def _write(path: pathlib.Path, obj: Any) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.tmp")
    tmp.write_text(json.dumps(obj, indent=2) + "\n", encoding="utf-8")
    os.replace(tmp, path)


def _case(runner: str, variant: str, mode: str, length: int, time_per_pair: float | None, status: str = "ok",
          peak: float = 10.0, error: str | None = None) -> dict[str, Any]:
    ok = status == "ok"
    tokens = 2 * length if mode == "long" else 2048 + length
    return {"runner": runner, "variant": variant, "objective": "orpo", "mode": mode, "long_length": length,
            "status": status, "sequences_per_pair": [], "tokens_per_step": tokens, "model_flops_per_step": tokens * 7e9,
            "step_times_s": [time_per_pair] if ok else [], "time_per_pair_s": time_per_pair if ok else None,
            "pairs_per_s": 1 / time_per_pair if ok else None, "tokens_per_s": tokens / time_per_pair if ok else None,
            "model_tflops_per_s": tokens * 7e9 / time_per_pair / 1e12 if ok else None,
            "mfu": tokens * 7e9 / time_per_pair / 989e12 if ok else None, "peak_memory_gib": peak,
            "allocated_after_free_gib": None if ok else 18.6, "error": error}


def _bench_doc(tag: str, cases: list[dict[str, Any]], status: str) -> dict[str, Any]:
    meta = {"gpu_name": SIMULATED_GPU, "gpu_memory_gib": 79.6, "torch": "2.11.0+cu130", "cuda": "13.0",
            "megatron_core": "0.19.2", "transformer_engine": None, "transformers": "5.17.0", "trl": "1.16.0",
            "device": "cuda", "simulated": True}
    settings = {"preset": "llama-1b", "dtype": "bf16", "short_length": 1024, "response_length": 256,
                "pairs_per_step": 1, "measure_steps": 2, "warmup_steps": 1, "simulate_oom_above_step_tokens": None}
    return {"schema": SCHEMA, "date": "2026-12-06", "tag": tag, "status": status, "simulated": True, "meta": meta,
            "settings": settings, "runners": [{"runner": "sdpa-full", "status": "built"}], "cases": cases,
            "searches": [], "ratios": compute_ratios(cases, [])}


def sim_install(args) -> int:
    print("ok megatron.core 0.19.2\nok datasets 4.4.1\nmissing transformer_engine.pytorch ModuleNotFoundError")
    print("compileall rc=0")
    return 0


def sim_env(args) -> int:
    _write(pathlib.Path(args.result), {
        "simulated": True, "python": "3.12.3", "gpu_name": SIMULATED_GPU, "gpu_memory_gib": 79.6, "torch": "2.11.0+cu130",
        "cuda": "13.0", "megatron_core": "0.19.2", "transformer_engine": None, "transformers": "5.17.0",
        "trl": "1.16.0", "imports": {"torch": "ok", "megatron.core": "ok", "transformers": "ok",
                                     "transformer_engine.pytorch": "ModuleNotFoundError: No module named 'x'"}})
    return 0


SIM_TESTS = textwrap.dedent('''\
    import pytest

    def test_simulated_pass():
        assert 1 + 1 == 2

    def test_simulated_failure():
        assert 1 == 2, "a simulated failure"

    @pytest.mark.skip(reason="could not import 'transformer_engine.pytorch'")
    def test_simulated_te():
        pass
    ''')


def sim_tests(args) -> int:
    """A real pytest run (three small tests) through the junit_live plugin, as the GPU tests step runs."""
    folder = pathlib.Path(args.work) / f"{args.name}-sim"
    folder.mkdir(parents=True, exist_ok=True)
    (folder / "test_gpu_simulated.py").write_text(SIM_TESTS, encoding="utf-8")
    cmd = [sys.executable, "-m", "pytest", "-o", "addopts=", "-vv", "-rA", "-p", "no:cacheprovider", "-p",
           "megatron_solopo.bench.junit_live", f"--junit-live={args.result}", "--rootdir", str(folder),
           "-c", os.devnull, str(folder / "test_gpu_simulated.py")]
    return subprocess.call(cmd)


def sim_bench(args) -> int:
    """The headline: cases appear one by one in the JSON (the runner prints them as they come)."""
    path = pathlib.Path(args.result)
    planned = [_case("ours", "sdpa-full", "solo", 8192, 0.21, peak=24.1),
               _case("ours", "sdpa-full", "solo", 32768, 0.93, peak=31.0),
               _case("ours", "sdpa-full", "long", 8192, 0.41, peak=25.2),
               _case("ours", "sdpa-full", "long", 32768, 2.05, peak=38.7),
               _case("baseline-trl", "gc", "long", 8192, 0.47, peak=22.0),
               _case("baseline-trl", "gc", "long", 32768, 1.61, peak=41.5)]
    cases: list[dict[str, Any]] = []
    for case in planned:
        time.sleep(0.2)
        cases.append(case)
        _write(path, _bench_doc(args.name, cases, "running"))
    _write(path, _bench_doc(args.name, cases, "complete"))
    return 0


def sim_probe(args) -> int:
    """max: trains at 97% of the planned peak; long over: OOM; solo over: hangs until SIGTERM (saves, exits)."""
    path = pathlib.Path(args.result)
    planned = probes.planned_probes()[args.mode]
    if args.mode == "solo" and args.probe_kind == "over":
        def stop(signum, frame):  # noqa: ARG001 - what `solopo bench` does on SIGTERM
            _write(path, _bench_doc(args.name, [], f"aborted (signal {signum})"))
            raise SystemExit(128 + signum)

        signal.signal(signal.SIGTERM, stop)
        print(f"simulated probe {args.name}: hanging until the cap", flush=True)
        while True:
            time.sleep(0.2)
    if args.probe_kind == "max":
        step = 0.3 * args.length / 1024
        case = _case("ours", probes.VARIANT_NAME, args.mode, args.length, step, peak=round(0.97 * planned.peak_gib, 2))
    else:
        case = _case("ours", probes.VARIANT_NAME, args.mode, args.length, None, status="oom", peak=79.2,
                     error="OutOfMemoryError: CUDA out of memory. Tried to allocate 2.1 GiB (simulated)")
    time.sleep(0.2)
    _write(path, _bench_doc(args.name, [case], "complete"))
    return 0


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python3 -m megatron_solopo.bench.gpu_session_sim")
    parser.add_argument("kind", choices=("plain", "env", "tests", "bench", "probe"))
    parser.add_argument("name")
    parser.add_argument("--work", required=True)
    parser.add_argument("--result", default=None)
    parser.add_argument("--mode", default=None)
    parser.add_argument("--probe-kind", default=None)
    parser.add_argument("--length", type=int, default=None)
    args = parser.parse_args(argv)
    print(f"simulated step {args.name} ({args.kind}); figures are made up", flush=True)
    return {"plain": sim_install, "env": sim_env, "tests": sim_tests, "bench": sim_bench, "probe": sim_probe}[args.kind](args)


if __name__ == "__main__":
    raise SystemExit(main())
