"""The GPU session plan (benchmarks/gpu_session.sh): dry run on CPU, caps, runner, and --report.

No device minute may go to a typo: the dry run checks the plan's caps against the 8-minute call, and
the bench / experiment command lines of the plan are parsed here with the real parsers.
"""

from __future__ import annotations

import argparse
import json
import pathlib
import subprocess
import sys
import textwrap

import pytest

from megatron_solopo.bench import session
from megatron_solopo.bench.session import SESSION_BUDGET_S, Step, base_plan, check_plan, te_plan

ROOT = pathlib.Path(__file__).resolve().parents[2]
BASE_ORDER = ["install", "env", "gpu-tests", "headline", "max-length", "experiment"]


def test_the_dry_run_prints_the_plan_in_priority_order_within_480_s():
    env = {"PATH": f"{pathlib.Path(sys.executable).parent}:/usr/bin:/bin", "PYTHONPATH": str(ROOT), "HOME": "/tmp"}
    out = subprocess.run(["bash", "benchmarks/gpu_session.sh", "--dry-run"], cwd=ROOT, capture_output=True,
                         text=True, timeout=120, env=env)
    assert out.returncode == 0, out.stderr
    names = [line.split()[1] for line in out.stdout.splitlines() if line[:1].isdigit() and ". " in line[:4]]
    assert names == BASE_ORDER
    caps = [int(line.split("cap")[1].split()[0]) for line in out.stdout.splitlines() if line[:1].isdigit()]
    assert sum(caps) <= SESSION_BUDGET_S == 480
    assert f"OK: {sum(caps)} s <= 480 s" in out.stdout
    assert "--device cuda" in out.stdout and "$OUT/bench" in out.stdout


def test_both_plans_fit_the_budget_and_a_plan_over_it_is_refused():
    assert [s.name for s in base_plan()] == BASE_ORDER
    assert check_plan(base_plan()) <= 480 and check_plan(te_plan()) <= 480
    with pytest.raises(ValueError, match="481 s > 480 s"):
        check_plan([Step("a", 300, ("true",), ""), Step("b", 181, ("true",), "")])
    with pytest.raises(ValueError, match="distinct"):
        check_plan([Step("a", 1, ("true",), ""), Step("a", 1, ("true",), "")])
    assert session.main(["--dry-run", "--plan", "te"]) == 0


def _bench_parser():
    from megatron_solopo.bench import commands

    parser = argparse.ArgumentParser()
    commands.add_arguments(parser)
    return parser


@pytest.mark.parametrize("step", [s for s in base_plan() + te_plan() if "bench" in s.argv],
                         ids=lambda s: s.name)
def test_the_plans_bench_command_lines_parse_into_valid_configs(step, monkeypatch):
    import torch

    from megatron_solopo.bench import commands

    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    argv = [a.replace("{out}", "/tmp/out") for a in step.argv]
    args = _bench_parser().parse_args(argv[argv.index("bench") + 1:])
    cfg = commands.config_from_args(args)
    assert cfg.device == "cuda" and cfg.preset == "llama-1b" and cfg.dtype == "bf16"
    assert all(v.objectives == ("orpo",) for v in cfg.variants)
    assert cfg.time_budget_s < step.cap_s
    if step.name == "headline":
        assert cfg.long_lengths == (8192, 32768) and cfg.short_length == 1024 and cfg.baseline == "auto"
        assert {v.attention_backend for v in cfg.variants} == {"sdpa"}
    if step.name == "max-length":
        assert cfg.search and cfg.long_lengths == (65536,) and cfg.search_granularity == 65536
        assert cfg.variants[0].modes == ("long", "solo") and cfg.gpu_memory_cap_gib == 80


def test_the_reduced_experiment_overrides_are_valid():
    from megatron_solopo.experiment.config import load_quality_config

    step = next(s for s in base_plan() if s.name == "experiment")
    config = load_quality_config(ROOT / step.argv[step.argv.index("--config") + 1])
    shared = config.shared_config(list(session.EXPERIMENT_OVERRIDES))
    assert shared.train.steps == 8 and shared.eval.num_samples == 12


def test_a_step_past_its_cap_is_killed_and_the_next_still_runs(tmp_path):
    py = sys.executable
    steps = [Step("slow", 2, (py, "-c", "import time; print('started', flush=True); time.sleep(30)"), "sleeps"),
             Step("quick", 5, (py, "-c", "import pathlib; pathlib.Path('{out}/q.txt').write_text('x')"), "writes"),
             Step("fails", 5, (py, "-c", "raise SystemExit(3)"), "exits 3")]
    doc = session.run_session(steps, tmp_path, budget_s=20)
    status = {s["name"]: s["status"] for s in doc["steps"]}
    assert status == {"slow": "timed_out", "quick": "ok", "fails": "failed"}
    assert doc["steps"][0]["wall_s"] < 10
    assert (tmp_path / "q.txt").read_text() == "x"
    assert "started" in (tmp_path / "slow.log").read_text()
    assert json.loads((tmp_path / "session.json").read_text())["steps"][-1]["rc"] == 3


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
    (out / "bench").mkdir(parents=True)
    steps = [{"name": n, "cap_s": s.cap_s, "status": "ok", "rc": 0, "wall_s": 10.0, "log": f"{n}.log"}
             for n, s in zip(BASE_ORDER, base_plan())]
    steps[-1].update(status="timed_out", rc=-15)
    (out / "session.json").write_text(json.dumps({"schema": "solopo-gpu-session/1", "budget_s": 480,
                                                  "started_at": "2026-12-01T10:00:00+00:00", "elapsed_s": 470.0,
                                                  "steps": steps}))
    (out / "env.json").write_text(json.dumps({"gpu_name": "NVIDIA H200", "gpu_memory_gib": 139.8,
                                              "torch": "2.11.0+cu130", "cuda": "13.0", "megatron_core": "0.19.2",
                                              "transformer_engine": None, "transformers": "5.17", "trl": "1.16"}))
    for name in BASE_ORDER:
        (out / f"{name}.log").write_text(f"{name} output\n")
    headline = [_case("ours", "sdpa-full", "solo", 8192, 0.20), _case("ours", "sdpa-full", "long", 8192, 0.40),
                _case("ours", "sdpa-full", "solo", 32768, 0.90), _case("ours", "sdpa-full", "long", 32768, 2.0),
                _case("baseline-trl", "gc", "long", 8192, 0.45), _case("baseline-trl", "gc", "long", 32768, 1.5)]
    (out / "bench" / "bench-llama-1b-headline.json").write_text(json.dumps(_bench_doc("headline", headline, [])))
    searches = [{"runner": "ours", "variant": "sdpa-full", "objective": "orpo", "mode": m, "max_ok": ok,
                 "first_fail": fail, "hit_limit": False, "trials": []}
                for m, ok, fail in (("long", 65536, 131072), ("solo", 262144, 524288))]
    maxlen = [_case("ours", "sdpa-full", "long", 65536, 5.0), _case("ours", "sdpa-full", "solo", 65536, 3.0)]
    (out / "bench" / "bench-llama-1b-maxlen.json").write_text(json.dumps(_bench_doc("maxlen", maxlen, searches)))
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
    from megatron_solopo.bench.session_report import build_report

    files = _fake_out(tmp_path)
    readme = tmp_path / "README.md"
    readme.write_text("# x\n\n## Results\n\nsome text\n\n## License\n\nApache-2.0.\n")
    result = build_report(files, tmp_path / "benchmarks" / "results", readme)
    dest = result["dest"]
    assert dest == tmp_path / "benchmarks" / "results" / "2026-12-01-nvidia-h200"
    for name in ("table.md", "session.md", "session.json", "env.json", "gpu-tests.xml",
                 "bench-llama-1b-headline.json", "bench-llama-1b-maxlen.json", "logs/headline.log"):
        assert (dest / name).is_file(), name
    bar = {row["criterion"].split(" <=")[0].split(" >=")[0]: row for row in result["bar"]}
    time_row = bar["solo-ORPO / long-ORPO time per pair at 8K"]
    assert time_row["value"] == pytest.approx(0.5) and time_row["holds"] is True
    length_row = bar["solo-ORPO longest trainable length"]
    assert length_row["value"] == pytest.approx(4.0) and length_row["holds"] is True
    rows = [r for r in result["bar"] if "baseline" in r["criterion"]]
    assert [r["value"] for r in rows] == [pytest.approx(0.45 / 0.20), pytest.approx(1.5 / 0.90)]
    assert [r["holds"] for r in rows] == [True, False]
    session_md = (dest / "session.md").read_text()
    assert "| experiment | 40 | timed_out |" in session_md
    assert "1 passed, 1 failed, 0 errors, 1 skipped" in session_md
    assert "NVIDIA H200" in session_md and "megatron-core 0.19.2" in session_md
    text = readme.read_text()
    assert text.count(session.README_START) == 1 and text.index(session.README_START) < text.index("## License")
    assert "benchmarks/results/2026-12-01-nvidia-h200/session.md" in text
    assert "**2.25** (yes)" in text and "**1.67** (NO)" in text
    build_report(files, tmp_path / "benchmarks" / "results", readme)  # again: the block is replaced, not added
    assert readme.read_text().count(session.README_START) == 1


def test_report_without_session_files_is_a_clear_error(tmp_path):
    from megatron_solopo.bench.session_report import build_report

    with pytest.raises(ValueError, match="session.json"):
        build_report(tmp_path, tmp_path / "results")


def test_run_h100_is_only_a_pointer():
    text = (ROOT / "benchmarks" / "run_h100.sh").read_text()
    assert "gpu_session.sh" in text and "solopo" not in text.replace("megatron_solopo", "")


def test_the_dry_run_checks_the_staged_carry_against_64_mib(tmp_path):
    assert "not staged" in session.carry_note(tmp_path / "missing")
    (tmp_path / "base").mkdir()
    (tmp_path / "base" / "trl-1.16-py3-none-any.whl").write_bytes(b"x" * 1024)
    assert "fits" in session.carry_note(tmp_path / "base") and "with a TRL wheel" in session.carry_note(tmp_path / "base")
    with (tmp_path / "base" / "big.whl").open("wb") as handle:
        handle.truncate(65 * 2**20)  # sparse: no disk used
    assert "EXCEEDS the 64 MiB" in session.carry_note(tmp_path / "base")
