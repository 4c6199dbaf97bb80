"""The GPU session (benchmarks/gpu_session.sh): dry run, plan, runner, simulated session, probes, --report.

No device minute may go to a typo or to files that do not come back: the dry run checks the caps, $OUT's
files, the staged carry and the device minutes; the bench command lines of the plan are parsed here with
the real parsers; and the whole plan runs here in simulated mode, its $OUT checked against the rules of
what comes back (<= 8 files, <= 16 MiB each, <= 2 folders down, names of [A-Za-z0-9._-]) and its stdout
against every figure its files hold.
"""

from __future__ import annotations

import argparse
import io
import json
import os
import pathlib
import re
import signal
import subprocess
import sys
import tarfile
import textwrap
import time

import pytest

from megatron_solopo.bench import gpu_session as session, probes
from megatron_solopo.bench.gpu_session import CAPS_BUDGET_S, Step, base_plan, check_plan, te_plan

ROOT = pathlib.Path(__file__).resolve().parents[2]
BASE_ORDER = ["install", "env", "gpu-tests", "headline", "probe-long-max", "probe-solo-max", "probe-long-over",
              "probe-solo-over"]
OUT_FILES = {"session.json", "env.json", "gpu-tests.xml", "bench-llama-1b-headline.json", "probes.json", "logs.tgz"}
ENV = {"PATH": f"{pathlib.Path(sys.executable).parent}:/usr/bin:/bin", "PYTHONPATH": str(ROOT), "HOME": "/tmp",
       "OMP_NUM_THREADS": "1"}


def _staged_checkout(root: pathlib.Path, trl: bool = True) -> pathlib.Path:
    base = root / ".device" / "base"
    base.mkdir(parents=True)
    wheels = ["megatron_core-0.19.2-cp312-cp312-manylinux_2_28_x86_64.whl", "datasets-5.2.0-py3-none-any.whl"]
    for name in wheels + (["trl-1.16.0-py3-none-any.whl"] if trl else []):
        (base / name).write_bytes(b"x" * 1024)
    (base / "install.sh").write_text("echo ok\n")
    return root


def _dry_run(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run(["bash", "benchmarks/gpu_session.sh", "--dry-run", *args], cwd=ROOT, capture_output=True,
                          text=True, timeout=120, env=ENV)


# ------------------------------------------------------------------------------------------- the dry run
def test_the_dry_run_checks_plan_files_carry_and_device_minutes(tmp_path):
    out = _dry_run("--checkout", str(_staged_checkout(tmp_path)))
    assert out.returncode == 0, out.stdout + out.stderr
    names = [line.split()[1] for line in out.stdout.splitlines() if re.match(r"^\d+\. ", line)]
    assert names == BASE_ORDER
    caps = [int(line.split(" cap")[1].split()[0]) for line in out.stdout.splitlines() if re.match(r"^\d+\. ", line)]
    assert sum(caps) <= CAPS_BUDGET_S == 525 and session.CALL_LIMIT_S == 540
    assert f"OK caps: {sum(caps)} s <= 525 s" in out.stdout
    files_line = next(line for line in out.stdout.splitlines() if line.startswith("OK files in $OUT"))
    assert all(name in files_line for name in OUT_FILES) and "(6, + 1 being replaced <= 8" in files_line
    assert "OK carry:" in out.stdout and "fits" in out.stdout and "with a TRL wheel" in out.stdout
    assert "180 s + the call <= 540 s + idle ~30 s = 750 s = 12.5 min <= 13 of 15 min" in out.stdout
    commands = [line for line in out.stdout.splitlines() if line.startswith("   $ ")]
    assert len(commands) == len(BASE_ORDER) and not any("$OUT" in line for line in commands)  # steps write to $WORK
    assert "--device cuda" in out.stdout and "$WORK/headline" in out.stdout
    assert "--long-lengths 118784" in out.stdout and "--long-lengths 237568" in out.stdout
    assert out.stdout.rstrip().endswith("READY for the call")


def test_the_dry_run_is_not_ready_without_the_staged_carry(tmp_path):
    out = _dry_run("--checkout", str(tmp_path))
    assert out.returncode == 1
    assert "FAIL carry" in out.stdout and "NOT staged" in out.stdout and "stage.sh base" in out.stdout
    assert "NOT READY" in out.stdout


def test_the_carry_check_names_what_is_missing_and_the_64_mib_limit(tmp_path):
    line, ready = session.carry_check(tmp_path / "missing")
    assert not ready and "NOT staged" in line
    base = _staged_checkout(tmp_path / "a", trl=False) / ".device" / "base"
    line, ready = session.carry_check(base)
    assert ready and "WITHOUT (the baseline falls back" in line
    (base / "install.sh").unlink()
    line, ready = session.carry_check(base)
    assert not ready and "MISSING: install.sh" in line
    (base / "install.sh").write_text("x")
    with (base / "big.whl").open("wb") as handle:
        handle.truncate(65 * 2**20)  # sparse: no disk used
    line, ready = session.carry_check(base)
    assert not ready and "EXCEEDS the 64 MiB" in line


# ---------------------------------------------------------------------------------------------- the plan
def test_both_plans_fit_the_budget_and_the_rules_of_what_comes_back():
    assert [s.name for s in base_plan()] == BASE_ORDER
    assert check_plan(base_plan()) <= 525 and check_plan(te_plan()) <= 525
    assert set(session.out_files(base_plan())) == OUT_FILES
    assert [s.name for s in base_plan() if s.extend] == BASE_ORDER[4:]  # only the probes take time left over
    with pytest.raises(ValueError, match="526 s > 525 s"):
        check_plan([Step("a", 300, ("true",), ""), Step("b", 226, ("true",), "")])
    with pytest.raises(ValueError, match="distinct"):
        check_plan([Step("a", 1, ("true",), ""), Step("a", 1, ("true",), "")])
    with pytest.raises(ValueError, match="never into"):
        check_plan([Step("a", 1, ("touch", "{out}/x"), "")])
    many = [Step(f"s{i}", 1, ("true",), "", kind="bench", result=f"{{work}}/{i}.json", out_name=f"r{i}.json")
            for i in range(6)]
    with pytest.raises(ValueError, match=r"8 files in \$OUT \(\+1 being replaced\) > 8"):
        check_plan(many)
    with pytest.raises(ValueError, match="names must be"):
        check_plan([Step("a", 1, ("true",), "", kind="bench", result="{work}/x", out_name="bad name.json")])
    assert session.main(["--dry-run", "--plan", "te", "--checkout", "/nonexistent"]) == 1  # TE is not staged


def test_the_probe_lengths_come_from_the_planned_table():
    planned = probes.planned_probes(80.0)
    by_name = {s.name: s for s in base_plan()}
    for mode in ("long", "solo"):
        p = planned[mode]
        assert p.peak_gib <= p.usable_gib < p.next_peak_gib and p.over_peak_gib > p.memory_gib
        assert p.max_length % probes.GRANULARITY == 0 and p.over_length % probes.GRANULARITY == 0
        assert p.max_length < p.over_length and p.usable_gib == pytest.approx(0.9 * p.memory_gib)
        argv = by_name[f"probe-{mode}-max"].argv
        assert argv[argv.index("--long-lengths") + 1] == str(p.max_length)
        argv = by_name[f"probe-{mode}-over"].argv
        assert argv[argv.index("--long-lengths") + 1] == str(p.over_length)
    assert planned["solo"].max_length >= 2 * planned["long"].max_length  # what the planner predicts for the bar
    with pytest.raises(KeyError, match="--table"):
        probes.planned_probes(40.0)


def test_the_planned_maximum_search_on_a_known_linear_planner():
    calls = []

    def peak(mode, length):  # GiB: 18 + 0.0004 / token; usable 72 -> max 135000 -> 131072; over 80 -> 155648
        calls.append(length)
        return 18 + 0.0004 * length

    p = probes.planned_max("long", 80.0, peak_gib=peak, granularity=4096, reserve=0.1)
    assert (p.max_length, p.over_length) == (131072, 155648)
    assert p.peak_gib == pytest.approx(18 + 0.0004 * 131072, abs=1e-3) and p.next_peak_gib > 72
    assert p.over_peak_gib > 80 >= 18 + 0.0004 * (155648 - 4096)
    assert len(set(calls)) <= 6  # an affine fit, then a step or two: each call is a ~10 s dry run


@pytest.fixture
def _cuda_parsers(monkeypatch):
    import torch

    from megatron_solopo.commands import bench as commands

    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    parser = argparse.ArgumentParser()
    commands.add_arguments(parser)
    return parser, commands


@pytest.mark.parametrize("step", [s for s in base_plan() + te_plan() if "bench" in s.argv], ids=lambda s: s.name)
def test_the_plans_bench_command_lines_parse_into_valid_configs(step, _cuda_parsers):
    parser, commands = _cuda_parsers
    argv = [a.replace("{work}", "/tmp/work") for a in step.argv]
    cfg = commands.config_from_args(parser.parse_args(argv[argv.index("bench") + 1:]))
    assert cfg.device == "cuda" and cfg.preset == "llama-1b" and cfg.dtype == "bf16"
    assert all(v.objectives == ("orpo",) for v in cfg.variants) and not cfg.search
    if step.name == "headline":
        assert cfg.long_lengths == (8192, 32768) and cfg.short_length == 1024 and cfg.baseline == "auto"
        assert {v.attention_backend for v in cfg.variants} == {"sdpa"} and cfg.time_budget_s < step.cap_s
    if step.probe:
        mode, kind = step.probe
        planned = probes.planned_probes()[mode]
        assert cfg.long_lengths == (probes.probe_length(planned, kind),) and cfg.variants[0].modes == (mode,)
        assert cfg.gpu_memory_cap_gib == 80 and cfg.baseline == "none"
        assert (cfg.warmup_steps, cfg.measure_steps, cfg.short_length, cfg.response_length) == (0, 1, 1024, 256)
        assert cfg.variants[0].recompute == "full" and cfg.variants[0].attention_backend == "sdpa"


def test_the_gpu_tests_step_names_tests_that_exist():
    for path in session.GPU_TESTS:
        file, _, test = path.partition("::")
        assert (ROOT / file).is_file(), file
        assert not test or f"def {test}(" in (ROOT / file).read_text(), path


# ---------------------------------------------------------------------------------------------- the runner
def test_a_step_past_its_cap_is_killed_the_next_still_runs_and_logs_are_packed(tmp_path):
    py = sys.executable
    steps = [Step("slow", 2, (py, "-c", "import time; print('started', flush=True); time.sleep(30)"), "sleeps"),
             Step("quick", 5, (py, "-c", "import pathlib; pathlib.Path('{work}/q.txt').write_text('x')"), "writes"),
             Step("fails", 5, (py, "-c", "raise SystemExit(3)"), "exits 3")]
    out, work = tmp_path / "out", tmp_path / "work"
    doc = session.run_session(steps, out, budget_s=20, work=work, deadline_s=30, grace_s=2)
    status = {s["name"]: s["status"] for s in doc["steps"]}
    assert status == {"slow": "timed_out", "quick": "ok", "fails": "failed"}
    assert doc["steps"][0]["wall_s"] < 10
    assert (work / "q.txt").read_text() == "x"
    assert json.loads((out / "session.json").read_text())["steps"][-1]["rc"] == 3
    assert sorted(p.name for p in out.iterdir()) == ["logs.tgz", "session.json"]
    with tarfile.open(out / "logs.tgz") as tar:
        assert sorted(tar.getnames()) == ["logs/fails.log", "logs/quick.log", "logs/slow.log"]
        assert b"started" in tar.extractfile("logs/slow.log").read()


def test_a_step_may_extend_into_time_left_over_but_never_past_twice_its_cap(tmp_path):
    steps = [Step("a", 100, ("true",), ""), Step("p1", 50, ("true",), "", extend=True),
             Step("p2", 50, ("true",), "", extend=True)]
    runner = session.SessionRunner(steps, tmp_path / "o", tmp_path / "w", budget_s=200, deadline_s=205)
    runner.started = time.monotonic() - 10  # step a ended after 10 s of its 100: 95 s left over
    assert runner.effective_cap(1) == pytest.approx(100, abs=0.5)  # 50 + 95, at most 2 x 50
    runner.started = time.monotonic() - 120  # a ran its full cap and more: no slack
    assert runner.effective_cap(1) == pytest.approx(50, abs=0.5)
    assert runner.effective_cap(0) == pytest.approx(85, abs=0.5)  # a plain step: its cap, within the deadline


def test_a_long_log_keeps_its_head_and_tail_in_the_archive(tmp_path, monkeypatch):
    monkeypatch.setattr(session, "LOG_KEEP_BYTES", (10, 20))
    (tmp_path / "w" / "logs").mkdir(parents=True)
    (tmp_path / "o").mkdir()
    (tmp_path / "w" / "logs" / "x.log").write_text("HEAD" + "m" * 1000 + "TAIL")
    session.pack_logs(tmp_path / "w", tmp_path / "o")
    with tarfile.open(tmp_path / "o" / "logs.tgz") as tar:
        text = tar.extractfile("logs/x.log").read().decode()
    assert text.startswith("HEAD") and text.endswith("TAIL") and "bytes cut" in text and len(text) < 100


def test_the_out_files_check_names_every_broken_rule(tmp_path):
    assert session.check_out_files(tmp_path) == []
    for i in range(9):
        (tmp_path / f"f{i}.json").write_text("{}")
    (tmp_path / "a" / "b" / "c").mkdir(parents=True)
    (tmp_path / "a" / "b" / "c" / "deep.txt").write_text("x")
    (tmp_path / "bad name.txt").write_text("x")
    with (tmp_path / "huge.bin").open("wb") as handle:
        handle.truncate(17 * 2**20)
    problems = "\n".join(session.check_out_files(tmp_path))
    assert "12 files > 8" in problems and "more than 2 folders down" in problems
    assert "bad name.txt: a name outside" in problems and "huge.bin: 17.0 MiB > 16 MiB" in problems


def test_the_live_junit_file_holds_each_test_as_soon_as_it_ends(tmp_path):
    live = tmp_path / "live.xml"
    (tmp_path / "test_live.py").write_text(textwrap.dedent(f"""\
        import xml.etree.ElementTree as ET
        import pytest

        def test_first():
            pass

        def test_second_sees_the_first_in_the_file():
            names = [c.get("name") for c in ET.parse({str(live)!r}).getroot().iter("testcase")]
            assert names == ["test_first"]

        def test_third_fails():
            assert 2 + 2 == 5

        @pytest.mark.skip(reason="no TE here")
        def test_fourth_skips():
            pass
        """))
    proc = subprocess.run([sys.executable, "-m", "pytest", "-o", "addopts=", "-p", "no:cacheprovider", "-p",
                           "megatron_solopo.bench.junit_live", f"--junit-live={live}", "-c", os.devnull,
                           "--rootdir", str(tmp_path), str(tmp_path / "test_live.py")],
                          capture_output=True, text=True, timeout=120, env=ENV)
    assert proc.returncode == 1, proc.stdout[-2000:]
    cases = {c["test"].split("::")[1]: c for c in session.junit_cases(live)}
    assert [c["outcome"] for c in cases.values()] == ["PASSED", "PASSED", "FAILED", "SKIPPED"]
    assert "assert (2 + 2) == 5" in cases["test_third_fails"]["message"] or "assert 4 == 5" in \
        cases["test_third_fails"]["message"]
    assert cases["test_fourth_skips"]["message"] == "no TE here"
    from megatron_solopo.bench.gpu_session_report import junit_summary

    assert junit_summary(live)["counts"] == {"passed": 2, "failed": 1, "error": 0, "skipped": 1}


# ------------------------------------------------------------------------------------ the simulated session
@pytest.fixture(scope="module")
def simulated(tmp_path_factory):
    root = tmp_path_factory.mktemp("sim")
    started = time.monotonic()
    proc = subprocess.run(["bash", "benchmarks/gpu_session.sh", "--simulate", str(root / "out")], cwd=ROOT,
                          capture_output=True, text=True, timeout=240, env=ENV)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    return root / "out", proc.stdout, time.monotonic() - started


def test_the_simulated_session_leaves_at_most_8_files_that_all_come_back(simulated):
    out, _, wall = simulated
    files = [p for p in out.rglob("*") if p.is_file()]
    assert {p.name for p in files} == OUT_FILES and len(files) <= 8
    for path in files:
        rel = path.relative_to(out)
        assert len(rel.parts) - 1 <= 2 and all(re.fullmatch(r"[A-Za-z0-9._-]+", part) for part in rel.parts)
        assert path.stat().st_size <= 16 * 2**20
    assert sum(p.stat().st_size for p in files) <= 64 * 2**20
    doc = json.loads((out / "session.json").read_text())
    assert doc["out_files_max_seen"] <= 8 and doc["simulated"] is True
    status = {s["name"]: s["status"] for s in doc["steps"]}
    assert status == {**{n: "ok" for n in BASE_ORDER}, "gpu-tests": "failed", "probe-solo-over": "timed_out"}
    with tarfile.open(out / "logs.tgz") as tar:
        assert sorted(tar.getnames()) == sorted(f"logs/{n}.log" for n in BASE_ORDER)
    assert wall < 120


def test_the_simulated_session_prints_every_figure_its_files_hold(simulated):
    out, stdout, _ = simulated
    assert len(stdout) < 10_000  # the reply keeps the last 12,000 characters of stdout + stderr
    env = json.loads((out / "env.json").read_text())
    assert f"[env] {env['gpu_name']} 79.6 GiB, torch {env['torch']}" in stdout
    for case in session.junit_cases(out / "gpu-tests.xml"):
        assert f"[gpu-tests] {case['outcome']} {case['test']}" in stdout
    assert "[gpu-tests] 1 failed, 1 passed, 1 skipped" in stdout
    tails = {ln.split("]")[0][1:]: ln for ln in stdout.splitlines() if "] log tail: " in ln}
    assert set(tails) == {"gpu-tests", "probe-solo-over"}  # the steps that did not end ok say why, in stdout
    assert "1 failed, 1 passed, 1 skipped" in tails["gpu-tests"] and "hanging until the cap" in tails["probe-solo-over"]
    assert "[install] ok megatron.core 0.19.2; ok datasets" in stdout and "compileall rc=0" in stdout
    bench = json.loads((out / "bench-llama-1b-headline.json").read_text())
    assert len(bench["cases"]) == 6
    for case in bench["cases"]:
        line = next(ln for ln in stdout.splitlines() if ln.startswith(
            f"[headline] {case['runner']}/{case['variant']} {case['mode']}-orpo {case['long_length'] // 1024}K: ok"))
        assert f"{case['time_per_pair_s']:.4g} s/pair" in line and f"peak {case['peak_memory_gib']:.3g} GiB" in line
    for ratio in bench["ratios"]["solo_over_long_time_per_pair"] + bench["ratios"]["ours_over_baseline_pairs_per_s"]:
        assert f": {ratio['ratio']:.3g}\n" in stdout
    doc = json.loads((out / "probes.json").read_text())
    assert [p["name"] for p in doc["probes"]] == BASE_ORDER[4:]
    for probe in doc["probes"]:
        assert probes.probe_line(probe) in stdout
    for line in probes.summary_lines(doc["summary"]):
        assert line in stdout
    assert "[probes] solo/long longest trainable length: 2.00 (lower_bound)" in stdout


def test_the_report_of_the_simulated_session_says_it_is_simulated(simulated, tmp_path):
    from megatron_solopo.bench.gpu_session_report import build_report

    out, _, _ = simulated
    result = build_report(out, tmp_path / "results")
    dest = result["dest"]
    assert sorted(p.name for p in (dest / "logs").iterdir()) == sorted(f"{n}.log" for n in BASE_ORDER)
    text = (dest / "session.md").read_text()
    assert "SIMULATED session" in text and "SIMULATED session" in result["snippet"]
    assert "| long-ORPO max | 118784 | 70.8 | fits | ok | 68.7 |" in text
    assert "| solo-ORPO over | 278528 | 80.4 | oom | timed_out |" in text
    row = next(r for r in result["bar"] if "longest trainable" in r["criterion"])
    assert row["value"] == pytest.approx(2.0) and "lower_bound" in row["source"]


def test_sigterm_stops_the_session_saves_and_packs(tmp_path):
    out = tmp_path / "out"
    proc = subprocess.Popen([sys.executable, "-m", "megatron_solopo.bench.gpu_session", "--run", "--simulate", "--out",
                             str(out), "--work", str(tmp_path / "work")], cwd=ROOT, env=ENV,
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    deadline = time.monotonic() + 120
    while time.monotonic() < deadline:  # wait until the headline step runs
        done = json.loads((out / "session.json").read_text())["steps"] if (out / "session.json").is_file() else []
        if len(done) >= 3:
            break
        time.sleep(0.2)
    proc.send_signal(signal.SIGTERM)
    stdout, _ = proc.communicate(timeout=60)
    assert proc.returncode == 143, stdout[-2000:]
    doc = json.loads((out / "session.json").read_text())
    assert doc["stopped"] == f"signal {int(signal.SIGTERM)}"
    status = [s["status"] for s in doc["steps"]]
    assert "killed" in status and status[-1] == "skipped (session stopped)" and len(status) == len(BASE_ORDER)
    assert (out / "logs.tgz").is_file() and session.check_out_files(out) == []


@pytest.mark.slow
def test_solopo_bench_saves_its_json_on_sigterm(tmp_path):
    run_dir = tmp_path / "run"
    cmd = [sys.executable, "-m", "megatron_solopo.cli", "bench", "--device", "cpu", "--variants", "sdpa",
           "--objectives", "orpo", "--baseline", "none", "--no-search", "--long-lengths", "128,256,512,1024,2048",
           "--measure-steps", "20", "--run-dir", str(run_dir), "--tag", "t"]
    proc = subprocess.Popen(cmd, cwd=ROOT, env=ENV, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    path = run_dir / "bench-tiny-t.json"
    deadline = time.monotonic() + 180
    while time.monotonic() < deadline and not path.is_file():  # saved from the start (status running)
        time.sleep(0.2)
    assert path.is_file(), proc.communicate(timeout=30)[0][-2000:] if proc.poll() is not None else "no JSON"
    proc.send_signal(signal.SIGTERM)
    stdout, _ = proc.communicate(timeout=60)
    assert proc.returncode == 128 + signal.SIGTERM, stdout[-2000:]
    doc = json.loads(path.read_text())
    assert doc["status"] == "aborted (SIGTERM)" and doc["settings"]["long_lengths"][-1] == 2048
    assert len(doc["cases"]) < 5


# ------------------------------------------------------------------------------------------ probe verdicts
def _probe(mode, kind, status, peak=None, step=None):
    planned = probes.planned_probes()[mode]
    record = probes.probe_record(mode, kind, planned, {"status": "ok", "wall_s": 50.0, "cap_s": 60}, None)
    record.update(status=status, peak_memory_gib=peak, step_time_s=step)
    return record


def test_probe_verdicts_held_missed_and_open():
    held = probes.summarize_probes([_probe("long", "max", "ok", 68.0, 30.0), _probe("long", "over", "oom", 79.0),
                                    _probe("solo", "max", "ok", 72.0, 55.0), _probe("solo", "over", "oom", 79.5)])
    assert held["modes"]["long"]["verdict"].startswith("held: 118784 trained")
    assert held["modes"]["long"]["peak_error"] == pytest.approx(68.0 / 70.839 - 1)
    assert held["solo_over_long_max_length"] == pytest.approx(2.0) and held["ratio_kind"] == "measured"
    missed = probes.summarize_probes([_probe("long", "max", "oom", 79.9), _probe("solo", "max", "ok", 60.0, 50.0),
                                      _probe("solo", "over", "ok", 75.0, 70.0)])
    long_, solo = missed["modes"]["long"], missed["modes"]["solo"]
    assert long_["verdict"].startswith("MISSED: 118784 tokens were planned to fit")
    assert f"at least {80 / 70.839 - 1:+.1%} over the plan" in long_["verdict"] and long_["max_ok"] is None
    assert solo["verdict"].startswith("MISSED: 278528 tokens trained") and solo["max_ok"] == 278528
    assert solo["peak_error"] == pytest.approx(75.0 / 80.358 - 1) and missed["solo_over_long_max_length"] is None
    open_ = probes.summarize_probes([_probe("long", "max", "timed_out")])
    assert open_["modes"]["long"]["verdict"] == "open (max timed_out)"
    assert open_["modes"]["solo"]["verdict"] == "open (not probed)"


def test_a_probe_without_a_case_is_timed_out_or_an_error():
    planned = probes.planned_probes()["solo"]
    killed = probes.probe_record("solo", "max", planned, {"status": "timed_out", "wall_s": 96.1, "cap_s": 95}, None)
    assert killed["status"] == "timed_out" and "96.1 s" in killed["error"]
    crashed = probes.probe_record("solo", "max", planned, {"status": "failed", "rc": 1, "wall_s": 9.0},
                                  {"status": "aborted", "cases": []})
    assert crashed["status"] == "error" and "bench status aborted" in crashed["error"]


# ------------------------------------------------------------------------------ --report on a fake $OUT
def _case(runner, variant, mode, length, time_per_pair, status="ok"):
    return {"runner": runner, "variant": variant, "objective": "orpo", "mode": mode, "long_length": length,
            "status": status, "sequences_per_pair": [], "tokens_per_step": length, "model_flops_per_step": 1,
            "step_times_s": [time_per_pair] if status == "ok" else [],
            "time_per_pair_s": time_per_pair if status == "ok" else None,
            "pairs_per_s": 1 / time_per_pair if status == "ok" else None, "tokens_per_s": None,
            "model_tflops_per_s": None, "mfu": None, "peak_memory_gib": 10.0, "allocated_after_free_gib": None,
            "error": None}


def _bench_doc(tag, cases, searches):
    from megatron_solopo.bench.ratios import compute_ratios
    from megatron_solopo.bench.report import SCHEMA

    meta = {"gpu_name": "NVIDIA H200", "torch": "2.11.0+cu130", "megatron_core": "0.19.2", "transformer_engine": None,
            "transformers": "5.17", "trl": "1.16", "device": "cuda", "cuda": "13.0"}
    settings = {"preset": "llama-1b", "dtype": "bf16", "short_length": 1024, "response_length": 256,
                "pairs_per_step": 1, "measure_steps": 2, "warmup_steps": 1, "simulate_oom_above_step_tokens": None}
    return {"schema": SCHEMA, "date": "2026-12-01", "tag": tag, "status": "complete", "meta": meta,
            "settings": settings, "runners": [], "cases": cases, "searches": searches,
            "ratios": compute_ratios(cases, searches)}


def _fake_out(root: pathlib.Path) -> pathlib.Path:
    out = root / "files"
    out.mkdir(parents=True)
    steps = [{"name": n, "cap_s": s.cap_s, "status": "ok", "rc": 0, "wall_s": 10.0, "log": f"logs/{n}.log"}
             for n, s in zip(BASE_ORDER, base_plan())]
    steps[-1].update(status="timed_out", rc=-15)
    (out / "session.json").write_text(json.dumps({"schema": "solopo-gpu-session/2", "budget_s": 525,
                                                  "started_at": "2026-12-01T10:00:00+00:00", "elapsed_s": 520.0,
                                                  "steps": steps}))
    (out / "env.json").write_text(json.dumps({"gpu_name": "NVIDIA H200", "gpu_memory_gib": 139.8,
                                              "torch": "2.11.0+cu130", "cuda": "13.0", "megatron_core": "0.19.2",
                                              "transformer_engine": None, "transformers": "5.17", "trl": "1.16"}))
    with tarfile.open(out / "logs.tgz", "w:gz") as tar:
        for name in BASE_ORDER + ["../evil"]:
            data = f"{name} output\n".encode()
            info = tarfile.TarInfo(f"logs/{name}.log")
            info.size = len(data)
            tar.addfile(info, io.BytesIO(data))
    headline = [_case("ours", "sdpa-full", "solo", 8192, 0.20), _case("ours", "sdpa-full", "long", 8192, 0.40),
                _case("ours", "sdpa-full", "solo", 32768, 0.90), _case("ours", "sdpa-full", "long", 32768, 2.0),
                _case("baseline-trl", "gc", "long", 8192, 0.45), _case("baseline-trl", "gc", "long", 32768, 1.5)]
    (out / "bench-llama-1b-headline.json").write_text(json.dumps(_bench_doc("headline", headline, [])))
    records = [_probe("long", "max", "ok", 69.0, 31.0), _probe("solo", "max", "ok", 70.1, 57.0),
               _probe("long", "over", "oom", 79.3), _probe("solo", "over", "oom", 79.6)]
    (out / "probes.json").write_text(json.dumps(probes.probes_document(80.0, records)))
    (out / "gpu-tests.xml").write_text(textwrap.dedent("""\
        <?xml version="1.0" encoding="utf-8"?><testsuites><testsuite name="pytest" tests="3">
        <testcase classname="tests.attention.test_attention_gpu" name="test_cuda_flash_block" time="1.5"/>
        <testcase classname="tests.training.test_step_gpu" name="test_te_and_sdpa_paths_agree" time="0.1">
          <skipped message="could not import 'transformer_engine.pytorch'"/></testcase>
        <testcase classname="tests.training.test_step_gpu" name="test_sdpa_step" time="9.0">
          <failure message="assert 1 == 2">trace</failure></testcase>
        </testsuite></testsuites>"""))
    return out


def test_report_turns_the_returned_files_into_a_results_folder_and_a_readme_block(tmp_path):
    from megatron_solopo.bench.gpu_session_report import build_report

    files = _fake_out(tmp_path)
    readme = tmp_path / "README.md"
    readme.write_text("# x\n\n## Results\n\nsome text\n\n## License\n\nApache-2.0.\n")
    result = build_report(files, tmp_path / "benchmarks" / "results", readme)
    dest = result["dest"]
    assert dest == tmp_path / "benchmarks" / "results" / "2026-12-01-nvidia-h200"
    for name in ("table.md", "session.md", "session.json", "env.json", "gpu-tests.xml", "probes.json",
                 "bench-llama-1b-headline.json", "logs/headline.log", "logs/probe-solo-over.log"):
        assert (dest / name).is_file(), name
    assert not (dest / "evil.log").exists() and not (dest / "logs" / "evil.log").exists()  # no path escapes
    bar = {row["criterion"].split(" <=")[0].split(" >=")[0]: row for row in result["bar"]}
    time_row = bar["solo-ORPO / long-ORPO time per pair at 8K"]
    assert time_row["value"] == pytest.approx(0.5) and time_row["holds"] is True
    length_row = bar["solo-ORPO longest trainable length"]
    assert length_row["value"] == pytest.approx(2.0) and length_row["holds"] is True
    assert "solo 237568 vs long 118784 tokens, measured" in length_row["source"]
    rows = [r for r in result["bar"] if "baseline" in r["criterion"]]
    assert [r["value"] for r in rows] == [pytest.approx(0.45 / 0.20), pytest.approx(1.5 / 0.90)]
    assert [r["holds"] for r in rows] == [True, False]
    session_md = (dest / "session.md").read_text()
    assert "| probe-solo-over | 50 | timed_out |" in session_md and "SIMULATED" not in session_md
    assert "1 passed, 1 failed, 0 errors, 1 skipped" in session_md
    assert "NVIDIA H200" in session_md and "megatron-core 0.19.2" in session_md
    assert "- long-ORPO: largest that trained **118784** tokens, shortest out of memory 143360; the planner's " \
           "prediction held" in session_md
    text = readme.read_text()
    assert text.count(session.README_START) == 1 and text.index(session.README_START) < text.index("## License")
    assert "benchmarks/results/2026-12-01-nvidia-h200/session.md" in text
    assert "**2.25** (yes)" in text and "**1.67** (NO)" in text and "planned maximum length of solo-ORPO: held" in text
    build_report(files, tmp_path / "benchmarks" / "results", readme)  # again: the block is replaced, not added
    assert readme.read_text().count(session.README_START) == 1


def test_report_of_an_older_session_without_session_json_still_works(tmp_path):
    from megatron_solopo.bench.gpu_session_report import build_report

    files = tmp_path / "files"
    (files / "bench").mkdir(parents=True)
    searches = [{"runner": "ours", "variant": "sdpa-full", "objective": "orpo", "mode": m, "max_ok": ok,
                 "first_fail": fail, "hit_limit": False, "trials": []}
                for m, ok, fail in (("long", 65536, 131072), ("solo", 262144, 524288))]
    maxlen = [_case("ours", "sdpa-full", "long", 65536, 5.0), _case("ours", "sdpa-full", "solo", 65536, 3.0)]
    (files / "bench" / "bench-llama-1b-maxlen.json").write_text(json.dumps(_bench_doc("maxlen", maxlen, searches)))
    (files / "max-length.log").write_text("old log\n")
    result = build_report(files, tmp_path / "results")
    row = next(r for r in result["bar"] if "longest trainable" in r["criterion"])
    assert row["value"] == pytest.approx(4.0) and row["holds"] is True
    assert "session.json did not come back" in (result["dest"] / "session.md").read_text()
    assert (result["dest"] / "logs" / "max-length.log").is_file()


def test_report_without_session_files_is_a_clear_error(tmp_path):
    from megatron_solopo.bench.gpu_session_report import build_report

    with pytest.raises(ValueError, match="session.json"):
        build_report(tmp_path, tmp_path / "results")


def test_run_h100_is_only_a_pointer():
    text = (ROOT / "benchmarks" / "run_h100.sh").read_text()
    assert "gpu_session.sh" in text and "solopo" not in text.replace("megatron_solopo", "")
