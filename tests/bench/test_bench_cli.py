"""`solopo bench --device cpu` end to end in one subprocess: JSON schema, ratios, a caught OOM, report.

The run uses `--simulate-oom-above-step-tokens 400` so out-of-memory happens where a GPU would put
it relative to the two modes: long-ORPO holds 2 x L tokens per pair, solo-ORPO 2 x 64 + L. Hand-derived:
at L=256 long holds 512 > 400 (OOM) and solo 384 (fits). Search (granularity 64): long bisects
between 128 (ok) and 256 (oom): 192 holds 384 -> max 192; solo doubles from 256 to 512 (640, oom),
then 384 (512, oom), 320 (448, oom) -> max 256. Max-length ratio 256 / 192 = 4/3.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest

TOP_KEYS = {"schema", "tag", "status", "date", "command", "meta", "settings", "model", "paper_reference",
            "runners", "cases", "searches", "ratios", "baseline"}
CASE_KEYS = {"runner", "variant", "objective", "mode", "long_length", "status", "sequences_per_pair",
             "tokens_per_step", "model_flops_per_step", "step_times_s", "time_per_pair_s", "pairs_per_s",
             "tokens_per_s", "model_tflops_per_s", "mfu", "peak_memory_gib", "allocated_after_free_gib", "error"}


@pytest.fixture(scope="module")
def result(tmp_path_factory):
    out = tmp_path_factory.mktemp("bench")
    cmd = [sys.executable, "-m", "megatron_solopo.cli", "bench", "--device", "cpu", "--variants", "sdpa",
           "--objectives", "orpo", "--baseline", "auto", "--simulate-oom-above-step-tokens", "400",
           "--run-dir", str(out), "--tag", "t"]
    env = dict(os.environ, OMP_NUM_THREADS="1")
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=300, env=env)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    return out, json.loads((out / "bench-tiny-t.json").read_text()), proc.stdout


def _cases(doc, runner, mode):
    return {c["long_length"]: c for c in doc["cases"] if c["runner"].startswith(runner) and c["mode"] == mode}


def test_schema_and_settings(result):
    _, doc, _ = result
    assert TOP_KEYS <= set(doc) and doc["schema"] == "solopo-bench/1" and doc["status"] == "complete"
    assert doc["meta"]["device"] == "cpu" and doc["meta"]["torch"] and doc["meta"]["megatron_core"]
    s = doc["settings"]
    assert (s["preset"], s["long_lengths"], s["short_length"], s["response_length"]) == ("tiny", [128, 256], 64, 16)
    assert s["simulate_oom_above_step_tokens"] == 400 and s["variants"][0]["attention_backend"] == "sdpa"
    for case in doc["cases"]:
        assert set(case) == CASE_KEYS
    assert [r["status"] for r in doc["runners"]] == ["built", "built"]
    assert doc["baseline"]["kind"] in ("trl", "transformers") and doc["baseline"]["description"]


def test_ours_and_baseline_measured_and_oom_caught(result):
    _, doc, _ = result
    for runner in ("ours", "baseline"):
        long_, solo = _cases(doc, runner, "long"), _cases(doc, runner, "solo" if runner == "ours" else "long")
        assert long_[128]["status"] == "ok" and long_[128]["time_per_pair_s"] > 0
        assert long_[128]["tokens_per_step"] == 256 and long_[128]["peak_memory_gib"] is None
        assert long_[256]["status"] == "oom" and "OutOfMemoryError" in long_[256]["error"]
        assert long_[256]["time_per_pair_s"] is None
    solo = _cases(doc, "ours", "solo")
    assert solo[256]["status"] == "ok" and solo[256]["tokens_per_step"] == 64 + 64 + 256
    assert len(solo[256]["step_times_s"]) == doc["settings"]["measure_steps"]


def test_search_and_ratios(result):
    _, doc, _ = result
    ours = {s["mode"]: s for s in doc["searches"] if s["runner"] == "ours"}
    assert (ours["long"]["max_ok"], ours["long"]["first_fail"]) == (192, 256)
    assert (ours["solo"]["max_ok"], ours["solo"]["first_fail"]) == (256, 320)
    assert [t["long_length"] for t in ours["solo"]["trials"]] == [512, 384, 320]
    ratios = doc["ratios"]
    (length_ratio,) = [r for r in ratios["max_length_solo_over_long"] if r["runner"] == "ours"]
    assert length_ratio["ratio"] == pytest.approx(256 / 192) and length_ratio["kind"] == "measured"
    time_ratios = {r["long_length"]: r for r in ratios["solo_over_long_time_per_pair"] if r["runner"] == "ours"}
    assert time_ratios[128]["ratio"] > 0 and time_ratios[256]["ratio"] is None
    assert time_ratios[256]["long_status"] == "oom"
    base = {(r["mode"], r["long_length"]): r for r in ratios["ours_over_baseline_pairs_per_s"]}
    solo128 = _cases(doc, "ours", "solo")[128]["pairs_per_s"]
    base128 = _cases(doc, "baseline", "long")[128]["pairs_per_s"]
    assert base[("solo", 128)]["ratio"] == pytest.approx(solo128 / base128)
    assert base[("solo", 256)]["ratio"] is None and base[("solo", 256)]["baseline_status"] == "oom"


def test_report_files(result):
    out, _, stdout = result
    assert {"table.md", "time_per_pair.png", "memory.png"} <= {p.name for p in out.iterdir()}
    table = (out / "table.md").read_text()
    assert "not a measurement" in table and "| ours | sdpa | orpo | solo | 256 | ok |" in table
    assert "wrote" in stdout
