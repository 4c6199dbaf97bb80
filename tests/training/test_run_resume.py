"""`solopo train` end to end on the tiny preset and the packaged sample pairs (CPU, separate processes).

Three runs of examples/configs/tiny_cpu.yaml, 4 steps each:
  A  uninterrupted (timed: the tiny preset must train on CPU in about a minute, with TensorBoard on);
  B1 the same run stopped after 2 steps by train.max_steps_per_run (exit status 75, checkpoint step 2);
  B2 a fresh process continuing B with train.resume=auto, next to a fake half-written step-3 checkpoint.
B1 + B2 must reproduce A's metrics at every step exactly (CPU, one thread per process).
"""

from __future__ import annotations

import json
import os
import pathlib
import subprocess
import sys
import time

import pytest

REPO = pathlib.Path(__file__).resolve().parents[2]
CONFIG = REPO / "examples" / "configs" / "tiny_cpu.yaml"
STEPS = 4
# metrics that depend on wall time or memory, not on the computation
_TIMING_KEYS = {"time", "step_time_s", "tokens_per_s", "peak_mem_gib", "diag/extra_time_s"}
# training diagnostics (train.diagnostics and train.ra_grad_share, on by default; tests/training/test_diagnostics.py)
DIAG_KEYS = {"diag/short_chosen_mean_logp", "diag/short_rejected_mean_logp", "diag/long_chosen_mean_logp",
             "diag/chosen_gap_short_minus_long", "diag/push_po/short_chosen", "diag/push_po/short_rejected",
             "diag/push_ra/short_chosen", "diag/push_ra/long_chosen", "diag/grad_norm_total", "diag/grad_norm_po",
             "diag/grad_norm_ra", "diag/ra_grad_share", "diag/ra_po_grad_ratio", "diag/grad_cos_ra_po",
             "diag/extra_time_s"}
EXPECTED_KEYS = {"step", "loss", "loss/po", "loss/ra", "loss/orpo_nll", "loss/orpo_or", "rewards/chosen",
                 "rewards/rejected", "rewards/margin", "rewards/accuracy", "rewards/long_chosen", "ra/distance",
                 "grad_norm", "lr", "step_time_s", "tokens_per_s", "tokens", "tokens/padded", "tokens/response",
                 "pairs", "epoch", "peak_mem_gib", "time", "orpo/clamped", "update_skipped"} | DIAG_KEYS


def _command(out_dir: pathlib.Path, cache_dir: pathlib.Path, *overrides: str) -> list[str]:
    return [sys.executable, "-m", "megatron_solopo.cli", "train", "--config", str(CONFIG),
            f"train.output_dir={out_dir}", f"data.cache_dir={cache_dir}", f"train.steps={STEPS}",
            "train.global_batch_pairs=2", "train.micro_batch_pairs=1", "train.warmup_steps=0", "train.save_every=0",
            *overrides]


def _env() -> dict[str, str]:
    env = {k: v for k, v in os.environ.items()
           if k not in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "SOLOPO_STOP_FILE", "SOLOPO_EXIT_STATUS_FILE")}
    env.update(OMP_NUM_THREADS="1", PYTHONPATH=str(REPO))  # one thread: bitwise-reproducible CPU reductions
    return env


def _records(out_dir: pathlib.Path) -> list[dict]:
    lines = (out_dir / "metrics.jsonl").read_text().splitlines()
    return [json.loads(line) for line in lines if line.strip()]


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    root = tmp_path_factory.mktemp("tiny_runs")
    cache = root / "cache"
    a_dir, b_dir = root / "A", root / "B"
    started = time.perf_counter()
    a = subprocess.Popen(_command(a_dir, cache, "train.tensorboard=true"), cwd=REPO, env=_env(),
                         stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    # rank 0 records its exit status where $SOLOPO_EXIT_STATUS_FILE says (the SLURM scripts read it)
    b1 = subprocess.run(_command(b_dir, cache, "train.max_steps_per_run=2"), check=False, cwd=REPO,
                        env={**_env(), "SOLOPO_EXIT_STATUS_FILE": str(root / "b1" / "exit-status")},
                        capture_output=True, text=True, timeout=600)
    a_out, _ = a.communicate(timeout=600)
    a_seconds = time.perf_counter() - started
    # a save killed mid-way leaves a temporary directory; a hand-made step_3 lacks the completion marker
    (b_dir / "checkpoints" / ".step_000003.incomplete").mkdir()
    (b_dir / "checkpoints" / "step_000003").mkdir()
    (b_dir / "checkpoints" / "step_000003" / "metadata.json").write_text("{}")
    b2 = subprocess.run(_command(b_dir, cache), check=False, cwd=REPO, env=_env(), capture_output=True, text=True,
                        timeout=600)
    return {"a": (a.returncode, a_out), "a_seconds": a_seconds, "b1": b1, "b2": b2, "a_dir": a_dir, "b_dir": b_dir,
            "b1_status_file": root / "b1" / "exit-status"}


def test_tiny_run_finishes_on_cpu(runs):
    code, output = runs["a"]
    assert code == 0, output[-3000:]
    assert f"finished at step {STEPS}/{STEPS}" in output
    # about a minute on an idle 2-core machine, in parallel with run B1 here: a loose bound
    assert runs["a_seconds"] < 180, f"tiny run took {runs['a_seconds']:.0f} s"
    summary = json.loads((runs["a_dir"] / "run_summary.json").read_text())
    assert summary["finished"] and summary["final_step"] == STEPS and summary["stop_reason"] == "finished"
    assert summary["checkpoint"].endswith("step_000004")
    assert list((runs["a_dir"] / "tensorboard").glob("events.out.tfevents.*"))


def test_metrics_jsonl_has_every_step_and_key(runs):
    records = _records(runs["a_dir"])
    assert [r["step"] for r in records] == list(range(1, STEPS + 1))
    for record in records:
        assert set(record) == EXPECTED_KEYS, sorted(set(record) ^ EXPECTED_KEYS)
        assert record["pairs"] == 2
        assert record["tokens"] > record["tokens/response"] > 0
        assert 0.0 <= record["rewards/accuracy"] <= 1.0
    assert records[0]["loss"] != records[-1]["loss"]  # it trains


def test_interrupted_run_exits_resumable_with_a_checkpoint(runs):
    b1 = runs["b1"]
    assert b1.returncode == 75, b1.stdout[-2000:] + b1.stderr[-3000:]
    assert "stopped early (max_steps_per_run)" in b1.stdout
    ckpt = runs["b_dir"] / "checkpoints" / "step_000002"
    assert (ckpt / "solopo_checkpoint.json").is_file()
    assert (ckpt / "hf_assets" / "tokenizer.json").is_file()  # usable as model.checkpoint (tokenizer)
    marker = json.loads((ckpt / "solopo_checkpoint.json").read_text())
    assert marker["preset"]["name"] == "tiny" and marker["step"] == 2
    status = runs["b1_status_file"].read_text().splitlines()
    assert status == ["75", f"max_steps_per_run at step 2/{STEPS}; checkpoint {ckpt}"], status


def test_resumed_run_matches_uninterrupted_run_exactly(runs):
    b2 = runs["b2"]
    assert b2.returncode == 0, b2.stdout[-2000:] + b2.stderr[-3000:]
    summary = json.loads((runs["b_dir"] / "run_summary.json").read_text())
    assert summary["start_step"] == 2  # resumed from step 2: the incomplete step-3 directories were ignored
    a_records, b_records = _records(runs["a_dir"]), _records(runs["b_dir"])
    assert [r["step"] for r in b_records] == list(range(1, STEPS + 1))
    for a_rec, b_rec in zip(a_records, b_records):
        a_values = {k: v for k, v in a_rec.items() if k not in _TIMING_KEYS}
        b_values = {k: v for k, v in b_rec.items() if k not in _TIMING_KEYS}
        assert a_values == b_values, f"step {a_rec['step']}"
