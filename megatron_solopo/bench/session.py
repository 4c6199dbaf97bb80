"""The GPU session: one prepared device call, steps in priority order, each under its own time cap.

A GPU loan is short (15 minutes of device time in all, machine start included; at most 10 minutes per
command; ../shared/device/README.md), so the whole session is ONE call of `benchmarks/gpu_session.sh`
with `carry=[".device/base"]` that must end within 8 minutes. The steps run in the order of what
matters most, each in its own process under its own cap (a slow step is killed, the next one still
runs), and each leaves its files under $OUT as soon as it ends:

    python3 -m megatron_solopo.bench.session --dry-run            # here: the plan, caps checked <= 480 s
    python3 -m megatron_solopo.bench.session --run --out "$OUT"   # on the GPU machine (gpu_session.sh)
    python3 -m megatron_solopo.bench.session --report FILES_DIR   # here: results folder + README snippet

`--plan te` is the optional second call (Transformer Engine staged in five carry calls first).
This module imports only the standard library at import time: the GPU machine runs it before
megatron-core is installed (the first step installs it).
"""

from __future__ import annotations

import argparse
import dataclasses
import datetime
import json
import os
import pathlib
import signal
import subprocess
import sys
import time
from collections.abc import Sequence
from typing import Any

SESSION_BUDGET_S = 480
"""The whole session call must end within 8 minutes (the caps below sum to at most this)."""
SESSION_FILE = "session.json"
BENCH_DIR = "bench"
"""Sub-folder of $OUT where the `solopo bench` steps write (bench-<preset>-<tag>.json)."""
README_START = "<!-- gpu-session-results:start -->"
README_END = "<!-- gpu-session-results:end -->"
PY = "python3"


@dataclasses.dataclass(frozen=True)
class Step:
    """One step of a session: a command run under `cap_s` seconds, its output in <OUT>/<name>.log."""

    name: str
    cap_s: int
    argv: tuple[str, ...]
    what: str
    bench_budget_s: int | None = None
    """For `solopo bench` steps: its --time-budget-s (no new case after it), a margin under the cap."""


def _bench(tag: str, cap_s: int, *args: str) -> tuple[str, ...]:
    # --time-budget-s leaves room for the case in flight and the final save before the hard cap
    return (PY, "-m", "megatron_solopo.cli", "bench", "--run-dir", f"{{out}}/{BENCH_DIR}", "--tag", tag,
            "--time-budget-s", str(int(cap_s * 0.6)), *args)


# The ~1.1B preset, bf16, our SDPA path with full recomputation (32K needs it on one GPU; one variant for
# both lengths keeps to one model build), ORPO only.
_HEADLINE_VARIANT = "sdpa-full:backend=sdpa,recompute=full,objectives=orpo,modes=solo+long"
# The search caps usable memory at an 80 GB H100's (the paper's and DESIGN.md's GPU class): on the
# H200's full 141 GB the step's time cap, not memory, would end the doubling (a 256K-token long-ORPO
# step alone takes minutes), and the longest-length ratio would not be measured.
SEARCH_MEMORY_CAP_GIB = 80
# long first: it fails sooner, so the doubling search of solo-ORPO gets the rest of the cap
_SEARCH_VARIANT = "sdpa-full:backend=sdpa,recompute=full,objectives=orpo,modes=long+solo"

# The 135M quality experiment at reduced sizes: its file's sizes (2000 items, 250 steps, 200 questions per
# cell) take hours; these fit the step's cap or are cut by it (then its log says how far it came).
EXPERIMENT_OVERRIDES = ("data.synthetic_num_items=48", "data.num_responses=4", "data.max_new_tokens=48",
                        "train.steps=8", "train.warmup_steps=1", "train.global_batch_pairs=4", "train.log_every=1",
                        "eval.num_samples=12", "eval.batch_size=12", "eval.max_new_tokens=32")


def base_plan() -> list[Step]:
    """The one-call GPU session without Transformer Engine (carry=[".device/base"]), in priority order."""
    return [
        Step("install", 45, ("bash", ".device/base/install.sh"),
             "megatron-core 0.19.2 and friends from the carried wheels into /tmp/site"),
        Step("env", 20, (PY, "-m", "megatron_solopo.bench.session", "--env-json", "{out}/env.json"),
             "versions, GPU name and memory, what imports (env.json)"),
        Step("gpu-tests", 85, (PY, "-m", "pytest", "-q", "-rA", "--run-gpu", "-p", "no:cacheprovider",
                               "--junitxml={out}/gpu-tests.xml", "tests/attention/test_attention_gpu.py",
                               "tests/training/test_step_gpu.py"),
             "CUDA tests without TE: ring attention's CUDA flash block kernel, bf16 SDPA core attention, "
             "the SDPA training step on CUDA vs the CPU fp32 step (TE tests skip themselves)"),
        Step("headline", 180, _bench("headline", 180, "--device", "cuda", "--preset", "llama-1b", "--dtype", "bf16",
                                     "--variants", _HEADLINE_VARIANT, "--long-lengths", "8K,32K",
                                     "--short-length", "1024", "--no-search", "--baseline", "auto",
                                     "--baseline-grad-ckpt", "on", "--warmup-steps", "1", "--measure-steps", "2"),
             "llama-1b bf16 SDPA: solo-ORPO vs long-ORPO at 8K and 32K (short 1K) + TRL/transformers ORPO "
             "baseline at the same lengths"),
        Step("max-length", 110, _bench("maxlen", 110, "--device", "cuda", "--preset", "llama-1b", "--dtype", "bf16",
                                       "--variants", _SEARCH_VARIANT, "--long-lengths", "64K",
                                       "--search-limit", "512K", "--search-granularity", "65536",
                                       "--gpu-memory-cap-gib", str(SEARCH_MEMORY_CAP_GIB),
                                       "--short-length", "1024", "--baseline", "none",
                                       "--warmup-steps", "0", "--measure-steps", "1"),
             "longest trainable length of long-ORPO and solo-ORPO: doubling 64K, 128K, 256K, 512K, "
             f"memory capped at {SEARCH_MEMORY_CAP_GIB} GiB (an 80 GB H100)"),
        Step("experiment", 40, (PY, "-m", "megatron_solopo.cli", "experiment", "--config",
                                "examples/experiments/solopo_vs_long_135m_gpu.yaml", "--run-dir", "/tmp/experiment",
                                *EXPERIMENT_OVERRIDES),
             "if time is left: the 135M quality experiment end to end on the GPU, REDUCED sizes "
             f"({', '.join(EXPERIMENT_OVERRIDES)}); needs the default model on the machine"),
    ]


def te_plan() -> list[Step]:
    """The optional second call, after staging TE in four carry calls (only if >= 6 min of device time remain).

    Its command runs on the same (still warm) machine: megatron-core is already installed there.
    """
    variants = ("te-full:backend=te,recompute=full,objectives=orpo,modes=solo+long",
                "te-fp8-full:backend=te,fp8=hybrid,recompute=full,objectives=orpo,modes=solo+long")
    return [
        Step("install-te", 60, ("bash", ".device/te5/install.sh"), "Transformer Engine 2.20.2 from /tmp/stage"),
        Step("env-te", 20, (PY, "-m", "megatron_solopo.bench.session", "--env-json", "{out}/env-te.json"),
             "versions with TE"),
        Step("te-tests", 90, (PY, "-m", "pytest", "-q", "-rA", "--run-gpu", "-p", "no:cacheprovider",
                              "--junitxml={out}/te-tests.xml", "tests/attention/test_attention_gpu.py",
                              "tests/training/test_step_gpu.py"),
             "the GPU tests again, now with their TE parts (TE vs SDPA loss, TE core attention)"),
        Step("te-bench", 300, _bench("te", 300, "--device", "cuda", "--preset", "llama-1b", "--dtype", "bf16",
                                     "--variants", *variants, "--long-lengths", "8K,32K", "--short-length", "1024",
                                     "--no-search", "--baseline", "none", "--warmup-steps", "1",
                                     "--measure-steps", "2"),
             "TE and TE+FP8 (delayed scaling) variants at 8K and 32K"),
    ]


PLANS = {"base": base_plan, "te": te_plan}


def check_plan(steps: Sequence[Step], budget_s: int = SESSION_BUDGET_S) -> int:
    """Sum of the caps; ValueError when it exceeds the session budget or a step is malformed."""
    names = [s.name for s in steps]
    if len(set(names)) != len(names):
        raise ValueError(f"session steps need distinct names, got {names}")
    for step in steps:
        if step.cap_s <= 0:
            raise ValueError(f"session step {step.name}: cap {step.cap_s} s must be positive")
    total = sum(s.cap_s for s in steps)
    if total > budget_s:
        raise ValueError(f"session plan caps sum to {total} s > {budget_s} s: the call would not end within "
                         f"{budget_s // 60} minutes; shorten a step's cap")
    return total


def format_plan(steps: Sequence[Step], out: str = "$OUT") -> str:
    """The plan as text: order, cap, cumulative end time, command."""
    lines, end = [], 0
    for index, step in enumerate(steps, 1):
        end += step.cap_s
        command = " ".join(a.replace("{out}", out) for a in step.argv)
        lines.append(f"{index}. {step.name:<11} cap {step.cap_s:>3} s  (ends by {end:>3} s)  {step.what}\n"
                     f"   $ {command}")
    lines.append(f"total of the caps: {end} s (budget {SESSION_BUDGET_S} s)")
    return "\n".join(lines)


CARRY_LIMIT_BYTES = 64 * 2**20
"""What one device call carries at most (the `run` tool)."""


def carry_note(folder: pathlib.Path) -> str:
    """A line on the staged folder the call carries: its size against the 64 MiB limit, or how to stage it."""
    if not folder.is_dir():
        return (f"note: {folder} is not staged here; before the call run "
                f"`EXTRA_WHEELS=\"trl psutil\" ../shared/device/stage.sh base` (benchmarks/README.md)")
    size = sum(f.stat().st_size for f in folder.rglob("*") if f.is_file())
    verdict = "fits" if size <= CARRY_LIMIT_BYTES else "EXCEEDS the 64 MiB carry limit"
    trl = "with" if any(folder.rglob("trl-*")) else "WITHOUT (the baseline falls back to plain transformers)"
    return f"carry: {folder} is {size / 2**20:.1f} MiB ({verdict}), {trl} a TRL wheel"


# ------------------------------------------------------------------------------------- running steps
def _write_json(path: pathlib.Path, obj: Any) -> None:
    tmp = path.with_name(f".{path.name}.tmp")
    tmp.write_text(json.dumps(obj, indent=2) + "\n", encoding="utf-8")
    os.replace(tmp, path)


def run_step(step: Step, out: pathlib.Path, cap_s: float | None = None) -> dict[str, Any]:
    """Runs one step in its own process group under its cap; its output goes to <out>/<name>.log."""
    cap = step.cap_s if cap_s is None else cap_s
    argv = [a.replace("{out}", str(out)) for a in step.argv]
    log = out / f"{step.name}.log"
    started = time.monotonic()
    record: dict[str, Any] = {"name": step.name, "cap_s": step.cap_s, "argv": argv, "log": log.name,
                              "started_at": datetime.datetime.now(datetime.UTC).isoformat(timespec="seconds")}
    with log.open("w", encoding="utf-8") as handle:
        try:
            proc = subprocess.Popen(argv, stdout=handle, stderr=subprocess.STDOUT, start_new_session=True)
        except OSError as err:
            record.update(status="error", rc=None, wall_s=0.0, error=f"{type(err).__name__}: {err}")
            return record
        try:
            rc = proc.wait(timeout=max(cap, 1))
            record.update(status="ok" if rc == 0 else "failed", rc=rc)
        except subprocess.TimeoutExpired:
            os.killpg(proc.pid, signal.SIGTERM)
            try:
                proc.wait(timeout=5)
            except subprocess.TimeoutExpired:
                os.killpg(proc.pid, signal.SIGKILL)
                proc.wait()
            record.update(status="timed_out", rc=proc.returncode)
    record["wall_s"] = round(time.monotonic() - started, 1)
    return record


def run_session(steps: Sequence[Step], out: pathlib.Path, budget_s: int = SESSION_BUDGET_S) -> dict[str, Any]:
    """Runs the steps in order; session.json is rewritten after each one. A step never runs past its cap
    nor past the session budget (it gets what is left, or is skipped when under 5 s are left)."""
    check_plan(steps, budget_s)
    out.mkdir(parents=True, exist_ok=True)
    (out / BENCH_DIR).mkdir(exist_ok=True)
    started = time.monotonic()
    doc: dict[str, Any] = {"schema": "solopo-gpu-session/1", "budget_s": budget_s,
                           "started_at": datetime.datetime.now(datetime.UTC).isoformat(timespec="seconds"),
                           "plan": [{"name": s.name, "cap_s": s.cap_s, "what": s.what} for s in steps],
                           "steps": []}
    for step in steps:
        left = budget_s - (time.monotonic() - started)
        if left < 5:
            doc["steps"].append({"name": step.name, "cap_s": step.cap_s, "status": "skipped (session budget)"})
        else:
            print(f"[session] {step.name} (cap {min(step.cap_s, left):.0f} s)", flush=True)
            record = run_step(step, out, min(step.cap_s, left))
            print(f"[session] {step.name}: {record['status']} in {record.get('wall_s')} s", flush=True)
            doc["steps"].append(record)
        doc["elapsed_s"] = round(time.monotonic() - started, 1)
        _write_json(out / SESSION_FILE, doc)
    return doc


def collect_env(path: pathlib.Path) -> dict[str, Any]:
    """Versions, GPU name and memory, and which optional packages import; written to `path`."""
    import importlib

    info: dict[str, Any] = {"python": sys.version.split()[0]}
    try:
        from megatron_solopo.bench.report import machine_info

        import torch

        info.update(machine_info("cuda" if torch.cuda.is_available() else "cpu"))
        if torch.cuda.is_available():
            info["compute_capability"] = list(torch.cuda.get_device_capability())
    except Exception as err:  # noqa: BLE001 - the report is what matters, whatever fails
        info["machine_info_error"] = f"{type(err).__name__}: {err}"
    imports = {}
    for module in ("torch", "megatron.core", "transformer_engine.pytorch", "transformers", "trl", "flash_attn",
                   "datasets", "matplotlib"):
        try:
            importlib.import_module(module)
            imports[module] = "ok"
        except Exception as err:  # noqa: BLE001
            imports[module] = f"{type(err).__name__}: {str(err)[:200]}"
    info["imports"] = imports
    try:
        info["nvidia_smi"] = subprocess.run(
            ["nvidia-smi", "--query-gpu=name,memory.total,driver_version", "--format=csv,noheader"],
            capture_output=True, text=True, timeout=10).stdout.strip()
    except (OSError, subprocess.SubprocessError) as err:
        info["nvidia_smi"] = f"unavailable ({type(err).__name__})"
    path.parent.mkdir(parents=True, exist_ok=True)
    _write_json(path, info)
    print(json.dumps(info, indent=2))
    return info


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python3 -m megatron_solopo.bench.session", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    action = parser.add_mutually_exclusive_group(required=True)
    action.add_argument("--dry-run", action="store_true", help="print the plan and check its caps (CPU, here)")
    action.add_argument("--run", action="store_true", help="run the plan (on the GPU machine, --out $OUT)")
    action.add_argument("--report", metavar="FILES_DIR", help="turn a returned $OUT folder into a results folder")
    action.add_argument("--env-json", metavar="PATH", help=argparse.SUPPRESS)
    parser.add_argument("--plan", choices=sorted(PLANS), default="base", help="base (one call) or te (second call)")
    parser.add_argument("--out", help="with --run: the folder whose files come back ($OUT)")
    parser.add_argument("--results-root", default="benchmarks/results", help="with --report: where <date>-<machine>/ goes")
    parser.add_argument("--readme", default=None, help="with --report: update this README's GPU results block")
    args = parser.parse_args(argv)
    if args.env_json:
        collect_env(pathlib.Path(args.env_json))
        return 0
    if args.report:
        from megatron_solopo.bench.session_report import build_report

        result = build_report(pathlib.Path(args.report), pathlib.Path(args.results_root),
                              pathlib.Path(args.readme) if args.readme else None)
        print(result["snippet"])
        for path in result["written"]:
            print(f"wrote {path}")
        return 0
    steps = PLANS[args.plan]()
    try:
        total = check_plan(steps)
    except ValueError as err:
        print(f"gpu session: error: {err}", file=sys.stderr)
        return 2
    if args.dry_run:
        print(f"GPU session plan '{args.plan}' (dry run: nothing runs)")
        print(format_plan(steps, args.out or "$OUT"))
        print(carry_note(pathlib.Path(".device/base")))
        print(f"OK: {total} s <= {SESSION_BUDGET_S} s")
        return 0
    if not args.out:
        print("gpu session: error: --run needs --out (the device tool's $OUT)", file=sys.stderr)
        return 2
    doc = run_session(steps, pathlib.Path(args.out))
    print(json.dumps({s["name"]: s["status"] for s in doc["steps"]}, indent=2))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())


__all__ = ["Step", "base_plan", "te_plan", "check_plan", "format_plan", "run_step", "run_session", "main",
           "SESSION_BUDGET_S"]
