"""The GPU session: one prepared device call, steps in priority order, each under its own time cap.

A GPU loan is short (15 minutes of device time in all, machine start and idle included; at most 10 minutes
per command; ../shared/device/README.md), and what comes back is small: at most 8 files from $OUT (16 MiB
each, 64 MiB together, at most two folders down, names of letters, digits, '.', '_', '-') and the last
12,000 characters of stdout. So the whole session is ONE call of `benchmarks/gpu_session.sh` with
`carry=[".device/base"]` that ends within 540 s, and:

- the steps run in priority order, each in its own process under its own cap (a slow step is killed, the
  next one still runs); the probes at the end may use what earlier steps left unused;
- the steps write into a work folder OUTSIDE $OUT (logs, bench folders, JUnit, env); this runner is the
  only writer of $OUT, which holds at most these files at any moment: session.json, env.json, the JUnit
  XML, one JSON per bench step (the probes share probes.json) and logs.tgz (every step log, re-packed after
  each step), plus one file being replaced (written beside it, then renamed);
- every figure is printed to stdout as soon as this runner has it (test outcomes and bench cases while
  their step runs, each probe when it ends), compactly, so the output tail alone holds the results;
- SIGTERM (the device tool's limit) stops the step in flight, saves what it measured and ends the session.

    python3 -m megatron_solopo.bench.gpu_session --dry-run [--checkout DIR]  # here: plan, files, carry, device time
    python3 -m megatron_solopo.bench.gpu_session --run --out "$OUT"          # on the GPU machine (gpu_session.sh)
    python3 -m megatron_solopo.bench.gpu_session --run --simulate --out D    # here: the whole plan, simulated
    python3 -m megatron_solopo.bench.gpu_session --report FILES_DIR          # here: results folder + README block

`--plan te` is a session of its own for a later loan (Transformer Engine staged in five carry calls first).
This module imports only the standard library at import time: the GPU machine runs it before
megatron-core is installed (the first step installs it).
"""

from __future__ import annotations

import argparse
import dataclasses
import datetime
import io
import json
import os
import pathlib
import re
import shlex
import shutil
import signal
import subprocess
import sys
import tarfile
import time
from collections.abc import Callable, Sequence
from typing import Any

from megatron_solopo.bench import probes as probes_mod

# ------------------------------------------------------------------------------------ the loan's limits
CALL_LIMIT_S = 540
"""The one device call ends within this (run(..., timeout_s=540)); the runner's own deadline ends it earlier."""
CAPS_BUDGET_S = 525
"""The step caps sum to at most this: the rest of CALL_LIMIT_S covers the runner (kill grace, copies, packing)."""
RUNNER_DEADLINE_S = 532
"""No step runs past this many seconds after the runner started (the last few seconds save and pack)."""
SESSION_BUDGET_S = CAPS_BUDGET_S
DEVICE_TIME_S = 15 * 60
"""Device time of a loan, all calls, machine start and idle included."""
DEVICE_TARGET_S = 13 * 60
"""What the session may plan to use of it: machine start + the call + idle (2 minutes spare)."""
MACHINE_START_S = 180
"""Estimate of a machine start (the device tool: 'minutes')."""
IDLE_S = 30
"""A warm machine goes back after ~30 s idle (give_back at once saves it)."""
MAX_OUT_FILES = 8
MAX_FILE_BYTES = 16 * 2**20
MAX_TOTAL_BYTES = 64 * 2**20
MAX_DEPTH = 2
"""Folders below $OUT that come back (a file at $OUT/a/b/f is two folders down)."""
NAME_RE = re.compile(r"[A-Za-z0-9._-]+")
CARRY_LIMIT_BYTES = 64 * 2**20
"""What one device call carries at most (the `run` tool)."""
KILL_GRACE_S = 6
"""After SIGTERM at its cap a step gets this long to save (the bench saves its JSON) before SIGKILL."""
POLL_S = 1.0
EXTEND_MAX_FACTOR = 2.0
"""A step that may extend runs at most this many times its cap (a hang cannot eat every second left)."""

SESSION_FILE = "session.json"
LOGS_FILE = "logs.tgz"
LOG_KEEP_BYTES = (1 * 2**20, 3 * 2**20)
"""A step log longer than head + tail keeps its first and last bytes in logs.tgz."""
DEFAULT_WORK = "/tmp/solopo-session"
README_START = "<!-- gpu-session-results:start -->"
README_END = "<!-- gpu-session-results:end -->"
BENCH_DIR = "bench"
"""Where older sessions put the bench JSON inside $OUT (--report still reads it)."""
PY = "python3"


@dataclasses.dataclass(frozen=True)
class Step:
    """One step: a command run under `cap_s` seconds in the work folder's terms ({work}), its output in
    <work>/logs/<name>.log; what it produces (`result`, under {work}) reaches $OUT as `out_name`."""

    name: str
    cap_s: int
    argv: tuple[str, ...]
    what: str
    kind: str = "plain"
    """plain | env | tests | bench | probe: how the runner reads, prints and publishes its result."""
    result: str | None = None
    """The file the step writes ({work}/...), read while it runs and when it ends."""
    out_name: str | None = None
    """The file in $OUT it feeds (the probes all feed probes.json)."""
    extend: bool = False
    """May use the time earlier steps left unused (the probes: the last steps, the longest runs)."""
    probe: tuple[str, str] | None = None
    """(mode, kind) of a probe step: kind 'max' or 'over' (megatron_solopo.bench.probes)."""


def _bench(tag: str, cap_s: int | None, *args: str) -> tuple[str, ...]:
    # --time-budget-s: no new case after 70% of the cap; a case cut at the cap is saved on SIGTERM
    budget = ("--time-budget-s", str(int(cap_s * 0.7))) if cap_s else ()
    return (PY, "-m", "megatron_solopo.cli", "bench", "--run-dir", f"{{work}}/{tag}", "--tag", tag, *budget, *args)


# The ~1.1B preset, bf16, our SDPA path with full recomputation (32K needs it on one GPU; one variant for
# both lengths keeps to one model build), ORPO only.
_HEADLINE_VARIANT = "sdpa-full:backend=sdpa,recompute=full,objectives=orpo,modes=solo+long"
GPU_TESTS = ("tests/model/test_attention_gpu.py", "tests/training/test_step_gpu.py",
             "tests/objectives/test_objectives_values.py::test_cuda_matches_cpu")
PROBE_ORDER = (("long", "max"), ("solo", "max"), ("long", "over"), ("solo", "over"))
"""The maxima first (they give the ratio), then the over-memory probes (they check the planner)."""
PROBE_CAPS_S = {("long", "max"): 60, ("solo", "max"): 95, ("long", "over"): 45, ("solo", "over"): 50}
"""Process start + model build (~20-25 s) + one step: ~30 s for long-ORPO at 116K and ~55 s for solo-ORPO at
232K with full recompute on an H100 (128K long-ORPO ~36 s, 256K ~136 s); the over-memory probes should
fail at the start of the backward, after the forward (~1/4 of a step)."""


def _tests_argv(out_xml: str, *paths: str) -> tuple[str, ...]:
    # -o addopts=: not pytest.ini's `--timeout` (pytest-timeout may not be on the GPU machine; the cap is the
    # timeout); -vv: one line per test in the log; the runner prints each outcome from the live JUnit file
    return (PY, "-m", "pytest", "-o", "addopts=", "-vv", "-rA", "--run-gpu", "-p", "no:cacheprovider", "-p",
            "megatron_solopo.bench.junit_live", f"--junit-live={out_xml}", *paths)


def _install_argv(script: str) -> tuple[str, ...]:
    # byte-compile what was just unpacked (and our package): first imports in later steps skip compiling
    return ("bash", "-c", f"bash {script}; rc=$?; {PY} -m compileall -q -j 0 /tmp/site megatron_solopo "
                          ">/dev/null 2>&1; echo \"compileall rc=$?\"; exit $rc")


def probe_argv(mode: str, length: int, name: str) -> tuple[str, ...]:
    """One probe: one optimizer step of `mode`-ORPO at `length` tokens in its own `solopo bench` process."""
    variant = f"{probes_mod.VARIANT_NAME}:backend=sdpa,recompute={probes_mod.RECOMPUTE},objectives=orpo,modes={mode}"
    return _bench(name, None, "--device", "cuda", "--preset", probes_mod.PRESET, "--dtype", "bf16",
                  "--variants", variant, "--long-lengths", str(length),
                  "--short-length", str(probes_mod.SHORT_LENGTH), "--response-length", str(probes_mod.RESPONSE_LENGTH),
                  "--no-search", "--baseline", "none", "--warmup-steps", "0", "--measure-steps", "1",
                  "--gpu-memory-cap-gib", f"{probes_mod.MEMORY_CAP_GIB:g}")


def probe_steps(memory_gib: float = probes_mod.MEMORY_CAP_GIB) -> list[Step]:
    planned = probes_mod.planned_probes(memory_gib)
    steps = []
    for mode, kind in PROBE_ORDER:
        p = planned[mode]
        length = probes_mod.probe_length(p, kind)
        name = probes_mod.probe_name(mode, kind)
        predicted = "the planned maximum" if kind == "max" else "the shortest length planned over the whole memory"
        steps.append(Step(name, PROBE_CAPS_S[(mode, kind)], probe_argv(mode, length, name),
                          f"{mode}-ORPO, one step at {length} tokens ({predicted}: planned peak "
                          f"{probes_mod.planned_peak(p, kind):.1f} GiB, usable {p.usable_gib:g} of {memory_gib:g} GiB)",
                          kind="probe", result=f"{{work}}/{name}/bench-{probes_mod.PRESET}-{name}.json",
                          out_name=probes_mod.PROBES_FILE, extend=True, probe=(mode, kind)))
    return steps


def base_plan() -> list[Step]:
    """The one-call GPU session without Transformer Engine (carry=[".device/base"]), in priority order."""
    return [
        Step("install", 40, _install_argv(".device/base/install.sh"),
             "megatron-core 0.19.2 and friends from the carried wheels into /tmp/site, byte-compiled"),
        Step("env", 30, (PY, "-m", "megatron_solopo.bench.gpu_session", "--env-json", "{work}/env.json"),
             "versions, GPU name and memory, what imports (env.json)", kind="env", result="{work}/env.json",
             out_name="env.json"),
        Step("gpu-tests", 80, _tests_argv("{work}/gpu-tests.xml", *GPU_TESTS),
             "CUDA tests without TE, one line each as they run: ring attention's CUDA flash block kernel, bf16 "
             "SDPA core attention, the SDPA training step on CUDA vs the CPU fp32 step, objectives on CUDA vs "
             "CPU (TE tests skip themselves)", kind="tests", result="{work}/gpu-tests.xml", out_name="gpu-tests.xml"),
        Step("headline", 120, _bench("headline", 120, "--device", "cuda", "--preset", "llama-1b", "--dtype", "bf16",
                                     "--variants", _HEADLINE_VARIANT, "--long-lengths", "8K,32K",
                                     "--short-length", "1024", "--no-search", "--baseline", "auto",
                                     "--baseline-grad-ckpt", "on", "--warmup-steps", "1", "--measure-steps", "2"),
             "llama-1b bf16 SDPA: solo-ORPO vs long-ORPO at 8K and 32K (short 1K) + TRL/transformers ORPO "
             "baseline at the same lengths", kind="bench", result="{work}/headline/bench-llama-1b-headline.json",
             out_name="bench-llama-1b-headline.json"),
        *probe_steps(),
    ]


def te_plan() -> list[Step]:
    """A session of its own for a later loan, after staging TE in four carry calls: the TE tests and variants."""
    variants = ("te-full:backend=te,recompute=full,objectives=orpo,modes=solo+long",
                "te-fp8-full:backend=te,fp8=hybrid,recompute=full,objectives=orpo,modes=solo+long")
    return [
        Step("install-te", 60, _install_argv(".device/te5/install.sh"), "Transformer Engine 2.20.2 from /tmp/stage"),
        Step("env-te", 30, (PY, "-m", "megatron_solopo.bench.gpu_session", "--env-json", "{work}/env-te.json"),
             "versions with TE", kind="env", result="{work}/env-te.json", out_name="env-te.json"),
        Step("te-tests", 90, _tests_argv("{work}/te-tests.xml", *GPU_TESTS),
             "the GPU tests again, now with their TE parts (TE vs SDPA loss, TE core attention)", kind="tests",
             result="{work}/te-tests.xml", out_name="te-tests.xml"),
        Step("te-bench", 300, _bench("te", 300, "--device", "cuda", "--preset", "llama-1b", "--dtype", "bf16",
                                     "--variants", *variants, "--long-lengths", "8K,32K", "--short-length", "1024",
                                     "--no-search", "--baseline", "none", "--warmup-steps", "1",
                                     "--measure-steps", "2"),
             "TE and TE+FP8 (delayed scaling) variants at 8K and 32K", kind="bench",
             result="{work}/te/bench-llama-1b-te.json", out_name="bench-llama-1b-te.json"),
    ]


PLANS = {"base": base_plan, "te": te_plan}


def out_files(steps: Sequence[Step]) -> list[str]:
    """Every file the plan leaves in $OUT (in the order they first appear)."""
    names = [SESSION_FILE]
    for step in steps:
        if step.out_name and step.out_name not in names:
            names.append(step.out_name)
    return names + [LOGS_FILE]


def check_plan(steps: Sequence[Step], budget_s: int = CAPS_BUDGET_S) -> int:
    """Sum of the caps; ValueError when it exceeds the budget, a step is malformed, or the plan's files break
    the rules of what comes back (at most MAX_OUT_FILES with the one being replaced, names of NAME_RE)."""
    names = [s.name for s in steps]
    if len(set(names)) != len(names):
        raise ValueError(f"session steps need distinct names, got {names}")
    for step in steps:
        if step.cap_s <= 0:
            raise ValueError(f"session step {step.name}: cap {step.cap_s} s must be positive")
        if any("{out}" in a for a in step.argv):
            raise ValueError(f"session step {step.name}: steps write under {{work}}, never into $OUT")
        if bool(step.result) != bool(step.out_name):
            raise ValueError(f"session step {step.name}: result and out_name go together")
    files = out_files(steps)
    bad = [f for f in files if not NAME_RE.fullmatch(f)]
    if bad:
        raise ValueError(f"session files {bad}: names must be letters, digits, '.', '_', '-' only")
    if len(files) + 1 > MAX_OUT_FILES:
        raise ValueError(f"session plan leaves {len(files)} files in $OUT (+1 being replaced) > {MAX_OUT_FILES}: "
                         f"{files}")
    total = sum(s.cap_s for s in steps)
    if total > budget_s:
        raise ValueError(f"session plan caps sum to {total} s > {budget_s} s: the call would not end within "
                         f"{CALL_LIMIT_S} s; shorten a step's cap")
    return total


def check_out_files(out: pathlib.Path) -> list[str]:
    """What breaks the rules of what comes back from $OUT (empty: all files come back)."""
    problems, files, total = [], [], 0
    for path in sorted(out.rglob("*")):
        rel = path.relative_to(out)
        if path.is_symlink() or not (path.is_file() or path.is_dir()):
            problems.append(f"{rel}: not a plain file")
            continue
        if any(not NAME_RE.fullmatch(part) for part in rel.parts):
            problems.append(f"{rel}: a name outside [A-Za-z0-9._-]")
        if path.is_dir():
            continue
        files.append(rel)
        size = path.stat().st_size
        total += size
        if len(rel.parts) - 1 > MAX_DEPTH:
            problems.append(f"{rel}: more than {MAX_DEPTH} folders down")
        if size > MAX_FILE_BYTES:
            problems.append(f"{rel}: {size / 2**20:.1f} MiB > {MAX_FILE_BYTES // 2**20} MiB")
    if len(files) > MAX_OUT_FILES:
        problems.append(f"{len(files)} files > {MAX_OUT_FILES}: {', '.join(map(str, files))}")
    if total > MAX_TOTAL_BYTES:
        problems.append(f"{total / 2**20:.1f} MiB in all > {MAX_TOTAL_BYTES // 2**20} MiB")
    return problems


def format_plan(steps: Sequence[Step], work: str = "$WORK") -> str:
    """The plan as text: order, cap, cumulative end time, command."""
    lines, end = [], 0
    for index, step in enumerate(steps, 1):
        end += step.cap_s
        command = shlex.join(a.replace("{work}", work) for a in step.argv)
        more = " (+ time left over)" if step.extend else ""
        lines.append(f"{index}. {step.name:<15} cap {step.cap_s:>3} s{more}  (ends by {end:>3} s)  {step.what}\n"
                     f"   $ {command}")
    lines.append(f"total of the caps: {end} s (<= {CAPS_BUDGET_S} s; the runner stops every step by "
                 f"{RUNNER_DEADLINE_S} s and the call ends within {CALL_LIMIT_S} s)")
    return "\n".join(lines)


def device_time_line() -> tuple[str, bool]:
    total = MACHINE_START_S + CALL_LIMIT_S + IDLE_S
    ok = total <= DEVICE_TARGET_S
    return (f"device time: machine start ~{MACHINE_START_S} s + the call <= {CALL_LIMIT_S} s + idle ~{IDLE_S} s "
            f"= {total} s = {total / 60:.1f} min {'<=' if ok else '>'} {DEVICE_TARGET_S // 60} of "
            f"{DEVICE_TIME_S // 60} min (give_back at once after the call saves the idle)"), ok


_REQUIRED_WHEELS = {"megatron_core-0.19": "megatron-core 0.19.x", "datasets-": "datasets"}


def carry_check(folder: pathlib.Path) -> tuple[str, bool]:
    """(a line on the staged folder the call carries, whether it is ready): present, <= 64 MiB, the wheels
    the plan needs and install.sh; a missing TRL wheel only notes that the baseline falls back."""
    stage = "`EXTRA_WHEELS=\"trl psutil\" ../shared/device/stage.sh base` (benchmarks/README.md)"
    if not folder.is_dir():
        return f"carry: {folder} is NOT staged in this checkout; before the call run {stage}", False
    files = [f for f in folder.rglob("*") if f.is_file()]
    size = sum(f.stat().st_size for f in files)
    names = [f.name for f in files]
    missing = [label for prefix, label in _REQUIRED_WHEELS.items() if not any(n.startswith(prefix) for n in names)]
    if "install.sh" not in names:
        missing.append("install.sh")
    fits = size <= CARRY_LIMIT_BYTES
    trl = "with" if any(n.startswith("trl-") for n in names) else \
        "WITHOUT (the baseline falls back to plain transformers)"
    verdict = "fits" if fits else "EXCEEDS the 64 MiB carry limit"
    line = f"carry: {folder} is {size / 2**20:.1f} MiB ({verdict}), {len(names)} files, {trl} a TRL wheel"
    if missing:
        line += f"; MISSING: {', '.join(missing)} (re-run {stage})"
    return line, fits and not missing


def carry_note(folder: pathlib.Path) -> str:
    return carry_check(folder)[0]


# ------------------------------------------------------------------------------------- running steps
def _write_json(path: pathlib.Path, obj: Any) -> None:
    tmp = path.with_name(f".{path.name}.tmp")
    tmp.write_text(json.dumps(obj, indent=2) + "\n", encoding="utf-8")
    os.replace(tmp, path)


def _publish_file(src: pathlib.Path, dest: pathlib.Path) -> bool:
    """Copies `src` into $OUT as `dest` atomically (a reader, or a kill, never sees half of it)."""
    if not src.is_file():
        return False
    tmp = dest.with_name(f".{dest.name}.tmp")
    shutil.copyfile(src, tmp)
    os.replace(tmp, dest)
    return True


def _load(path: pathlib.Path | None) -> Any:
    try:
        return json.loads(path.read_text(encoding="utf-8")) if path else None
    except (OSError, ValueError):
        return None


_STOP: dict[str, int | None] = {"signal": None}
"""Set by SIGTERM / SIGINT / SIGHUP (`_on_signal`): the step in flight is stopped within POLL_S, its results
are saved, the remaining steps are skipped."""


def _kill_group(proc: subprocess.Popen, grace_s: float) -> None:
    try:
        os.killpg(proc.pid, signal.SIGTERM)
    except ProcessLookupError:
        return
    try:
        proc.wait(timeout=grace_s)
    except subprocess.TimeoutExpired:
        try:
            os.killpg(proc.pid, signal.SIGKILL)
        except ProcessLookupError:
            pass
        proc.wait()


def run_step(step: Step, work: pathlib.Path, cap_s: float | None = None,
             watch: Callable[[], None] | None = None, grace_s: float = KILL_GRACE_S) -> dict[str, Any]:
    """Runs one step in its own process group under its cap; its output goes to <work>/logs/<name>.log.
    `watch` is called about every POLL_S seconds while it runs (to print what it has written so far)."""
    cap = step.cap_s if cap_s is None else cap_s
    argv = [a.replace("{work}", str(work)) for a in step.argv]
    (work / "logs").mkdir(parents=True, exist_ok=True)
    log = work / "logs" / f"{step.name}.log"
    started = time.monotonic()
    record: dict[str, Any] = {"name": step.name, "cap_s": round(cap, 1), "planned_cap_s": step.cap_s,
                              "argv": argv, "log": f"logs/{log.name}",
                              "started_at": datetime.datetime.now(datetime.UTC).isoformat(timespec="seconds")}
    with log.open("w", encoding="utf-8") as handle:
        try:
            proc = subprocess.Popen(argv, stdout=handle, stderr=subprocess.STDOUT, start_new_session=True)
        except OSError as err:
            record.update(status="error", rc=None, wall_s=0.0, error=f"{type(err).__name__}: {err}")
            return record
        while True:
            try:
                rc = proc.wait(timeout=POLL_S)
                record.update(status="ok" if rc == 0 else "failed", rc=rc)
                break
            except subprocess.TimeoutExpired:
                pass
            if _STOP["signal"] is not None:
                _kill_group(proc, grace_s)
                record.update(status="killed", rc=proc.returncode,
                              error=f"the session was stopped by signal {_STOP['signal']}")
                break
            if watch is not None:
                watch()
            if time.monotonic() - started >= max(cap, 1):
                _kill_group(proc, grace_s)
                record.update(status="timed_out", rc=proc.returncode)
                break
    record["wall_s"] = round(time.monotonic() - started, 1)
    return record


def pack_logs(work: pathlib.Path, out: pathlib.Path) -> None:
    """<work>/logs/*.log -> $OUT/logs.tgz (replaced atomically); a long log keeps its head and tail."""
    head, tail = LOG_KEEP_BYTES
    tmp = out / f".{LOGS_FILE}.tmp"
    with tarfile.open(tmp, "w:gz") as tar:
        for log in sorted((work / "logs").glob("*.log")):
            data = log.read_bytes()
            if len(data) > head + tail:
                cut = len(data) - head - tail
                data = data[:head] + f"\n[... {cut} bytes cut by the session runner ...]\n".encode() + data[-tail:]
            info = tarfile.TarInfo(f"logs/{log.name}")
            info.size, info.mtime = len(data), int(time.time())
            tar.addfile(info, io.BytesIO(data))
    os.replace(tmp, out / LOGS_FILE)


def _say(line: str) -> None:
    print(line, flush=True)


def _fmt(value: Any, digits: int = 3) -> str:
    if value is None:
        return "-"
    return f"{value:.{digits}g}" if isinstance(value, float) else str(value)


def _length(tokens: int) -> str:
    return f"{tokens // 1024}K" if tokens % 1024 == 0 else str(tokens)


def case_line(tag: str, c: dict[str, Any]) -> str:
    """One bench case, compactly (every figure of it that was measured)."""
    head = f"[{tag}] {c['runner']}/{c['variant']} {c['mode']}-{c['objective']} {_length(c['long_length'])}: {c['status']}"
    if c["status"] != "ok":
        return f"{head} ({(c.get('error') or '')[:120]}; peak {_fmt(c.get('peak_memory_gib'))} GiB)"
    return (f"{head} {_fmt(c['time_per_pair_s'], 4)} s/pair, {_fmt(c['pairs_per_s'])} pairs/s, "
            f"{_fmt(c['tokens_per_s'])} tok/s, {_fmt(c['model_tflops_per_s'])} TFLOP/s, MFU {_fmt(c['mfu'], 2)}, "
            f"peak {_fmt(c['peak_memory_gib'])} GiB")


def ratio_lines(tag: str, doc: dict[str, Any]) -> list[str]:
    ratios = doc.get("ratios") or {}
    lines = [f"[{tag}] ratio solo/long time per pair {r['variant']} {_length(r['long_length'])}: {_fmt(r['ratio'])}"
             for r in ratios.get("solo_over_long_time_per_pair", [])]
    lines += [f"[{tag}] ratio ours {r['mode']}-orpo ({r['variant']}) / {r['baseline']} long-orpo pairs/s "
              f"{_length(r['long_length'])}: {_fmt(r['ratio'])}" for r in ratios.get("ours_over_baseline_pairs_per_s", [])]
    lines += [f"[{tag}] runner {r['runner']}: {r['status']}" + (f" ({r['error'][:120]})" if r.get("error") else "")
              for r in doc.get("runners", []) if r.get("status") != "built"]
    return lines + [f"[{tag}] bench status: {doc.get('status')}"]


def junit_cases(path: pathlib.Path) -> list[dict[str, Any]]:
    """(test, outcome, time, message) of a JUnit file; [] while it is missing or being written."""
    import xml.etree.ElementTree as ET

    try:
        root = ET.parse(path).getroot()
    except (OSError, ET.ParseError):
        return []
    cases = []
    for case in root.iter("testcase"):
        outcome, message = "PASSED", ""
        for child in case:
            if child.tag in ("failure", "error", "skipped"):
                outcome = {"failure": "FAILED", "error": "ERROR", "skipped": "SKIPPED"}[child.tag]
                message = (child.get("message") or "").strip()
        cases.append({"test": f"{case.get('classname')}::{case.get('name')}", "outcome": outcome,
                      "time_s": float(case.get("time") or 0.0), "message": message})
    return cases


class SessionRunner:
    """Runs the plan and is the only writer of $OUT (see the module docstring)."""

    def __init__(self, steps: Sequence[Step], out: pathlib.Path, work: pathlib.Path, budget_s: int = CAPS_BUDGET_S,
                 deadline_s: float = RUNNER_DEADLINE_S, memory_gib: float = probes_mod.MEMORY_CAP_GIB,
                 strict_files: bool = False, grace_s: float = KILL_GRACE_S):
        self.steps, self.out, self.work = list(steps), out, work
        self.budget_s, self.deadline_s, self.memory_gib = budget_s, deadline_s, memory_gib
        self.strict_files, self.grace_s = strict_files, grace_s
        self.total_caps = check_plan(self.steps, budget_s)
        self.started = time.monotonic()
        self.printed: dict[str, set] = {}
        self.probes: list[dict[str, Any]] = []
        self.max_files_seen = 0
        self.doc: dict[str, Any] = {
            "schema": "solopo-gpu-session/2", "budget_s": budget_s, "call_limit_s": CALL_LIMIT_S,
            "started_at": datetime.datetime.now(datetime.UTC).isoformat(timespec="seconds"),
            "plan": [{"name": s.name, "cap_s": s.cap_s, "what": s.what} for s in self.steps], "steps": [],
            "out_files_expected": out_files(self.steps)}

    # -- $OUT
    def _path(self, template: str | None) -> pathlib.Path | None:
        return pathlib.Path(template.replace("{work}", str(self.work))) if template else None

    def _check_files(self) -> None:
        problems = check_out_files(self.out)
        count = sum(1 for p in self.out.rglob("*") if p.is_file())
        self.max_files_seen = max(self.max_files_seen, count)
        for problem in problems:
            _say(f"[session] WARNING $OUT: {problem}")
        if problems and self.strict_files:
            raise RuntimeError(f"$OUT breaks the rules of what comes back: {problems}")

    def _save(self) -> None:
        self.doc["elapsed_s"] = round(time.monotonic() - self.started, 1)
        self.doc["out_files_max_seen"] = self.max_files_seen
        _write_json(self.out / SESSION_FILE, self.doc)
        pack_logs(self.work, self.out)
        self._check_files()

    # -- printing what a step has so far
    def _new(self, step: Step, key: str) -> bool:
        seen = self.printed.setdefault(step.name, set())
        if key in seen:
            return False
        seen.add(key)
        return True

    def watch(self, step: Step) -> None:
        """Prints what the running step has written since the last call, and copies it into $OUT at once
        (a call killed outright, SIGKILL included, still returns every test and case printed)."""
        path = self._path(step.result)
        fresh = False
        if step.kind == "tests" and path is not None:
            for c in junit_cases(path):
                if self._new(step, c["test"]):
                    fresh = True
                    why = f" -- {c['message'][:150]}" if c["message"] else ""
                    _say(f"[{step.name}] {c['outcome']} {c['test']} ({c['time_s']:.1f} s){why}")
        elif step.kind == "bench" and path is not None:
            for c in (_load(path) or {}).get("cases", []):
                key = f"{c['runner']}/{c['variant']}/{c['objective']}/{c['mode']}/{c['long_length']}"
                if self._new(step, key):
                    fresh = True
                    _say(case_line(step.name, c))
        if fresh and step.out_name:
            _publish_file(path, self.out / step.out_name)

    def finish(self, step: Step, record: dict[str, Any]) -> None:
        """After the step's process ended (or was killed): print its figures, publish its result."""
        self.watch(step)
        path = self._path(step.result)
        if step.kind == "tests" and path is not None:
            counts: dict[str, int] = {}
            for c in junit_cases(path):
                counts[c["outcome"]] = counts.get(c["outcome"], 0) + 1
            record["tests"] = counts
            _say(f"[{step.name}] " + (", ".join(f"{n} {k.lower()}" for k, n in sorted(counts.items()))
                                      or "no test finished"))
        elif step.kind == "bench" and path is not None:
            doc = _load(path)
            for line in ratio_lines(step.name, doc) if doc else [f"[{step.name}] no results file"]:
                _say(line)
        elif step.kind == "env" and path is not None:
            env = _load(path) or {}
            failing = [f"{m} ({v.split(':')[0]})" for m, v in (env.get("imports") or {}).items() if v != "ok"]
            _say(f"[{step.name}] {env.get('gpu_name')} {_fmt(env.get('gpu_memory_gib'))} GiB, torch {env.get('torch')}, "
                 f"CUDA {env.get('cuda')}, Python {env.get('python')}, megatron-core {env.get('megatron_core')}, "
                 f"transformers {env.get('transformers')}, trl {env.get('trl')}, TE {env.get('transformer_engine')}; "
                 f"not importable: {', '.join(failing) or 'none'}")
        elif step.kind == "probe":
            mode, kind = step.probe
            planned = probes_mod.planned_probes(self.memory_gib)[mode]
            probe = probes_mod.probe_record(mode, kind, planned, record, _load(path))
            self.probes.append(probe)
            _say(probes_mod.probe_line(probe))
            doc = probes_mod.probes_document(self.memory_gib, self.probes)
            _write_json(self.out / probes_mod.PROBES_FILE, doc)
            if not any(s.kind == "probe" for s in self.steps[self.steps.index(step) + 1:]):
                for line in probes_mod.summary_lines(doc["summary"]):
                    _say(line)
            return
        else:  # install and other plain steps: the lines that say what imports
            log = self.work / "logs" / f"{step.name}.log"
            text = log.read_text(encoding="utf-8", errors="replace") if log.is_file() else ""
            lines = [ln for ln in text.splitlines() if re.match(r"^(ok|missing) |^compileall", ln)]
            _say(f"[{step.name}] " + ("; ".join(lines) if lines else text.strip()[-300:] or "(no output)"))
        if step.out_name and path is not None:
            _publish_file(path, self.out / step.out_name)

    def _log_tail(self, step: Step, lines: int = 3, chars: int = 300) -> str:
        """The last lines of a step's log (why it failed, in stdout: the files may not come back)."""
        log = self.work / "logs" / f"{step.name}.log"
        text = log.read_text(encoding="utf-8", errors="replace") if log.is_file() else ""
        tail = " | ".join(ln.strip() for ln in text.strip().splitlines()[-lines:])
        return tail[-chars:] or "(empty)"

    def _clean_work(self) -> None:
        """A work folder left by an earlier call on the same machine must not pass for this call's results."""
        shutil.rmtree(self.work / "logs", ignore_errors=True)
        for step in self.steps:
            path = self._path(step.result)
            if path is not None and path.is_file():
                path.unlink()
        (self.work / "logs").mkdir(parents=True, exist_ok=True)

    # -- the loop
    def effective_cap(self, index: int) -> float:
        """The step's cap, within the deadline; a step that may extend also gets what earlier steps left."""
        step = self.steps[index]
        left = self.deadline_s - (time.monotonic() - self.started)
        if not step.extend:
            return min(step.cap_s, left)
        slack = left - sum(s.cap_s for s in self.steps[index:])
        return min(step.cap_s + max(0.0, slack), EXTEND_MAX_FACTOR * step.cap_s, left)

    def run(self) -> dict[str, Any]:
        self.out.mkdir(parents=True, exist_ok=True)
        self._clean_work()
        _say(f"[session] {len(self.steps)} steps, caps {self.total_caps} s; $OUT files: "
             f"{', '.join(out_files(self.steps))}")
        self._save()
        for index, step in enumerate(self.steps):
            if _STOP["signal"] is not None:
                self.doc["steps"].append({"name": step.name, "cap_s": step.cap_s, "status": "skipped (session stopped)"})
                continue
            cap = self.effective_cap(index)
            if cap < min(5, step.cap_s):
                self.doc["steps"].append({"name": step.name, "cap_s": step.cap_s, "status": "skipped (session budget)"})
                _say(f"[session] {step.name}: skipped ({cap:.0f} s left)")
                self._save()
                continue
            _say(f"[session] {step.name} (cap {cap:.0f} s) at {time.monotonic() - self.started:.0f} s")
            record = run_step(step, self.work, cap, watch=lambda s=step: self.watch(s), grace_s=self.grace_s)
            self.doc["steps"].append(record)
            try:
                self.finish(step, record)
            except Exception as err:  # noqa: BLE001 - a result that cannot be read must not end the session
                _say(f"[session] {step.name}: could not read its result ({type(err).__name__}: {err})")
                record["collect_error"] = f"{type(err).__name__}: {err}"
            if record["status"] != "ok":
                _say(f"[{step.name}] log tail: {self._log_tail(step)}")
            _say(f"[session] {step.name}: {record['status']} in {record.get('wall_s')} s")
            self._save()
        if _STOP["signal"] is not None:
            self.doc["stopped"] = f"signal {_STOP['signal']}"
        self._save()
        _say("[session] " + ", ".join(f"{s['name']} {s['status']}" for s in self.doc["steps"]) +
             f"; {self.doc['elapsed_s']} s; $OUT: " + ", ".join(sorted(p.name for p in self.out.iterdir())))
        return self.doc


def _on_signal(signum, frame) -> None:  # noqa: ARG001
    _STOP["signal"] = signum


def run_session(steps: Sequence[Step], out: pathlib.Path, budget_s: int = CAPS_BUDGET_S,
                work: pathlib.Path | None = None, **kwargs: Any) -> dict[str, Any]:
    """Runs the steps in order (SessionRunner); session.json and logs.tgz are rewritten after each one."""
    work = work or out.parent / f"{out.name}-work"
    return SessionRunner(steps, out, work, budget_s, **kwargs).run()


SIMULATED_FLOORS_S = {"tests": 30, "bench": 15}
"""Shortest caps of simulated steps (a real pytest run; a bench writing six cases) on a busy 2-core machine;
other steps get SIMULATED_FLOOR_S (the hanging probe is killed at twice that)."""
SIMULATED_FLOOR_S = 4


def simulated_plan(steps: Sequence[Step], scale: float = 0.01) -> list[Step]:
    """The same steps, caps scaled down, each command replaced by megatron_solopo.bench.gpu_session_sim, which
    writes what the real command would write (env, live JUnit from a real pytest run, bench JSON case by
    case, probe results) from made-up figures; one probe hangs until its cap kills it."""
    out = []
    for step in steps:
        extra = ()
        if step.probe:
            mode, kind = step.probe
            length = probes_mod.probe_length(probes_mod.planned_probes()[mode], kind)
            extra = ("--mode", mode, "--probe-kind", kind, "--length", str(length))
        argv = (sys.executable, "-m", "megatron_solopo.bench.gpu_session_sim", step.kind, step.name,
                "--work", "{work}", *(("--result", step.result) if step.result else ()), *extra)
        floor = SIMULATED_FLOORS_S.get(step.kind, SIMULATED_FLOOR_S)
        out.append(dataclasses.replace(step, argv=argv, cap_s=max(floor, round(step.cap_s * scale))))
    return out


def collect_env(path: pathlib.Path) -> dict[str, Any]:
    """Versions, GPU name and memory, and which optional packages import; written to `path`."""
    import importlib

    info: dict[str, Any] = {"python": sys.version.split()[0]}
    try:  # deferred, with torch: this module imports only the standard library (see the module docstring)
        from megatron_solopo.bench.report import machine_info

        import torch

        info.update(machine_info("cuda" if torch.cuda.is_available() else "cpu"))
        if torch.cuda.is_available():
            info["compute_capability"] = list(torch.cuda.get_device_capability())
        info["nccl"] = ".".join(map(str, torch.cuda.nccl.version())) if torch.cuda.is_available() else None
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


def dry_run(plan: str, checkout: pathlib.Path) -> int:
    """Prints the plan and checks everything the call needs; 0 when it is ready, 1 when something is not."""
    steps = PLANS[plan]()
    ok = True
    print(f"GPU session plan '{plan}' (dry run: nothing runs)")
    try:
        total = check_plan(steps)
        print(format_plan(steps))
        print(f"OK caps: {total} s <= {CAPS_BUDGET_S} s")
    except ValueError as err:
        print(f"FAIL plan: {err}")
        total, ok = None, False
    files = out_files(steps)
    print(f"OK files in $OUT: {', '.join(files)} ({len(files)}, + 1 being replaced <= {MAX_OUT_FILES}; names of "
          "[A-Za-z0-9._-], none in folders; logs packed into logs.tgz, a long log cut to its head and tail)"
          if len(files) + 1 <= MAX_OUT_FILES else f"FAIL files: {files}")
    if any(s.kind == "probe" for s in steps):
        print(f"probes: planned by the dry run of the real step (`solopo plan --scaled`; bench/probes.py PLANNED), "
              f"{probes_mod.PRESET}, usable memory the loan's capped at {probes_mod.MEMORY_CAP_GIB:g} GiB:")
        for mode, p in probes_mod.planned_probes().items():
            print(f"  {mode}-ORPO: max {p.max_length} tokens (planned peak {p.peak_gib:.1f} GiB <= {p.usable_gib:g} "
                  f"usable), over {p.over_length} (planned {p.over_peak_gib:.1f} GiB > {p.memory_gib:g})")
    line, staged = carry_check(checkout / ".device" / "base")
    print(("OK " if staged else "FAIL ") + line)
    ok &= staged
    if plan == "te":  # the TE wheel in five parts, one carry call each (../shared/device/stage.sh te)
        parts = [checkout / ".device" / f"te{i}" for i in range(1, 6)]
        missing = [p.name for p in parts if not p.is_dir()]
        big = [p.name for p in parts if p.is_dir() and
               sum(f.stat().st_size for f in p.rglob("*") if f.is_file()) > CARRY_LIMIT_BYTES]
        te_ok = not missing and not big
        print(("OK " if te_ok else "FAIL ") + "carry: .device/te1..te5 "
              + ("staged" if te_ok else f"missing {missing}, over 64 MiB {big} (../shared/device/stage.sh te)"))
        ok &= te_ok
    line, fits = device_time_line()
    print(("OK " if fits else "FAIL ") + line)
    ok &= fits
    print("call: run(carry=[\".device/base\"], command=\"bash benchmarks/gpu_session.sh\", timeout_s=540), "
          "then give_back")
    print("READY for the call" if ok else "NOT READY: fix the FAIL lines above first")
    return 0 if ok else 1


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python3 -m megatron_solopo.bench.gpu_session", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    action = parser.add_mutually_exclusive_group(required=True)
    action.add_argument("--dry-run", action="store_true", help="print the plan and check it (CPU, here)")
    action.add_argument("--run", action="store_true", help="run the plan (on the GPU machine, --out $OUT)")
    action.add_argument("--report", metavar="FILES_DIR", help="turn a returned $OUT folder into a results folder")
    action.add_argument("--env-json", metavar="PATH", help=argparse.SUPPRESS)
    parser.add_argument("--plan", choices=sorted(PLANS), default="base", help="base (the call) or te (a later loan)")
    parser.add_argument("--out", help="with --run: the folder whose files come back ($OUT)")
    parser.add_argument("--work", default=None, help=f"with --run: the steps' own folder (default {DEFAULT_WORK})")
    parser.add_argument("--simulate", action="store_true",
                        help="with --run: the whole plan with simulated steps and shortened caps (CPU, tests)")
    parser.add_argument("--checkout", default=".", help="with --dry-run: the checkout whose .device/ travels")
    parser.add_argument("--results-root", default="benchmarks/results", help="with --report: where <date>-<machine>/ goes")
    parser.add_argument("--readme", default=None, help="with --report: update this README's GPU results block")
    args = parser.parse_args(argv)
    if args.env_json:
        collect_env(pathlib.Path(args.env_json))
        return 0
    if args.report:  # deferred: the report needs the installed package's dependencies, --run does not
        from megatron_solopo.bench.gpu_session_report import build_report

        try:
            result = build_report(pathlib.Path(args.report), pathlib.Path(args.results_root),
                                  pathlib.Path(args.readme) if args.readme else None)
        except ValueError as err:
            print(f"gpu session --report: error: {err}", file=sys.stderr)
            return 2
        print(result["snippet"])
        for path in result["written"]:
            print(f"wrote {path}")
        return 0
    if args.dry_run:
        return dry_run(args.plan, pathlib.Path(args.checkout))
    if not args.out:
        print("gpu session: error: --run needs --out (the device tool's $OUT)", file=sys.stderr)
        return 2
    steps = PLANS[args.plan]()
    deadline, budget = RUNNER_DEADLINE_S, CAPS_BUDGET_S
    grace = KILL_GRACE_S
    if args.simulate:
        steps = simulated_plan(steps)
        budget = sum(s.cap_s for s in steps)
        deadline, grace = budget + 5, 2
    work = pathlib.Path(args.work or DEFAULT_WORK)
    for signum in (signal.SIGTERM, signal.SIGINT, signal.SIGHUP):
        signal.signal(signum, _on_signal)
    runner = SessionRunner(steps, pathlib.Path(args.out), work, budget, deadline_s=deadline,
                           strict_files=args.simulate, grace_s=grace)
    runner.doc["simulated"] = args.simulate
    doc = runner.run()
    return 0 if doc.get("stopped") is None else 143


if __name__ == "__main__":
    raise SystemExit(main())


__all__ = ["Step", "base_plan", "te_plan", "probe_steps", "check_plan", "check_out_files", "out_files",
           "format_plan", "run_step", "run_session", "SessionRunner", "simulated_plan", "dry_run", "main",
           "CALL_LIMIT_S", "CAPS_BUDGET_S", "SESSION_BUDGET_S"]
