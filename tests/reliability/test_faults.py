"""Fault injection for `solopo train` (issue 14): each class of fault gives an exit status, a message that
names the path or the setting, and never modifies or deletes an earlier file (the run directory is
hashed before and after).

Classes: a schedule change on resume (lr), divergence (lr=1e30 never reaches a checkpoint; the
printed command continues from the last good one exactly like a clean run from it), damaged
checkpoints (fallback or a one-line refusal), a reused output_dir (another objective refused; force
continues; a live lock refuses; a stale lock is taken over), the distributed optimizer on CPU (save +
resume matches an uninterrupted run), and a dataset smaller than one global batch.

Every `solopo train` here is a separate CPU process on the tiny preset (about 10-20 s each).
"""

from __future__ import annotations

import hashlib
import json
import math
import os
import pathlib
import re
import shutil
import signal
import subprocess
import sys
import time

import pytest
from tiny_runs import tiny_run_env

REPO = pathlib.Path(__file__).resolve().parents[2]
CONFIG = REPO / "examples" / "configs" / "tiny_cpu.yaml"
_TIMING_KEYS = {"time", "step_time_s", "tokens_per_s", "peak_mem_gib", "diag/extra_time_s"}  # wall-clock values


# ------------------------------------------------------------------------------------------ helpers
def _env() -> dict[str, str]:
    return tiny_run_env()


def _command(out_dir: pathlib.Path, cache: pathlib.Path, *overrides: str, config: pathlib.Path = CONFIG):
    return [sys.executable, "-m", "megatron_solopo.cli", "train", "--config", str(config),
            f"train.output_dir={out_dir}", f"data.cache_dir={cache}", "train.global_batch_pairs=2",
            "train.micro_batch_pairs=1", *overrides]


def _train(out_dir: pathlib.Path, cache: pathlib.Path, *overrides: str, config: pathlib.Path = CONFIG,
           env: dict[str, str] | None = None):
    return subprocess.run(_command(out_dir, cache, *overrides, config=config), cwd=REPO, env={**_env(), **(env or {})},
                          capture_output=True, text=True, timeout=600, check=False)


def _error_line(result) -> str:
    lines = [line for line in result.stderr.splitlines() if line.startswith("solopo train: error:")]
    assert len(lines) == 1, result.stderr[-3000:]
    assert "Traceback" not in result.stderr, result.stderr[-3000:]
    return lines[0]


def _tree_hash(directory: pathlib.Path) -> dict[str, str]:
    """{relative path: sha256} of every file under `directory`."""
    return {str(p.relative_to(directory)): hashlib.sha256(p.read_bytes()).hexdigest()
            for p in sorted(directory.rglob("*")) if p.is_file()}


def _records(out_dir: pathlib.Path) -> dict[int, dict]:
    records = [json.loads(line) for line in (out_dir / "metrics.jsonl").read_text().splitlines() if line.strip()]
    return {r["step"]: {k: v for k, v in r.items() if k not in _TIMING_KEYS} for r in records if "error" not in r}


def _steps(out_dir: pathlib.Path) -> list[int]:
    from megatron_solopo.training.run_state import list_checkpoints

    return [step for step, _ in list_checkpoints(out_dir)]


@pytest.fixture(scope="module")
def base(tmp_path_factory, finished_tiny_run):
    """The session's finished 3-step run with a checkpoint after every step (kept; tests change copies of
    it), its data cache, and a folder for this module's runs."""
    run, cache = finished_tiny_run
    assert _steps(run) == [1, 2, 3]
    return tmp_path_factory.mktemp("faults"), cache, run


def _copy(run: pathlib.Path, to: pathlib.Path) -> pathlib.Path:
    shutil.copytree(run, to)
    return to


# ------------------------------------------------------------------------- 1. schedule changes on resume
def test_lr_and_schedule_change_on_resume_is_logged_and_continues(base):
    root, cache, run = base
    out = _copy(run, root / "lower_lr")
    before = _tree_hash(out / "checkpoints")
    result = _train(out, cache, "train.steps=4", "train.save_every=1", "train.keep_last=0", "train.warmup_steps=0",
                    "train.lr=5.0e-4", "train.min_lr=1.0e-5", "train.weight_decay=0.01", "train.clip_grad=0.5")
    assert result.returncode == 0, result.stderr[-3000:]
    assert "Could not find parameter group" not in result.stderr
    changed = [line for line in result.stderr.splitlines() if "changed schedule" in line]
    assert len(changed) == 1, result.stderr[-3000:]
    for text in ("train.lr 0.001 -> 0.0005", "train.min_lr 0.0 -> 1e-05", "train.weight_decay 0.0 -> 0.01",
                 "train.clip_grad 1.0 -> 0.5", "train.steps 3 -> 4"):
        assert text in changed[0]
    assert str(out / "checkpoints" / "step_000003") in changed[0]
    records = _records(out)
    # cosine from the new lr over 4 steps: step 4 (0-based 3) trains at min_lr + (lr - min_lr) * (1 + cos(3pi/4)) / 2
    expected = 1e-5 + (5e-4 - 1e-5) * (1 + math.cos(math.pi * 3 / 4)) / 2
    assert records[4]["lr"] == pytest.approx(expected, rel=1e-6)
    after = _tree_hash(out / "checkpoints")
    assert {k: v for k, v in after.items() if k in before} == before  # earlier checkpoints untouched
    assert _steps(out) == [1, 2, 3, 4]


# ------------------------------------------------------------------------------------------ 2. divergence
def _all_finite(checkpoint: pathlib.Path, scratch: pathlib.Path) -> bool:
    import torch
    from torch.distributed.checkpoint.format_utils import dcp_to_torch_save

    dcp_to_torch_save(str(checkpoint), str(scratch))
    state = torch.load(scratch, weights_only=False)
    tensors = []

    def walk(value):
        if isinstance(value, dict):
            for item in value.values():
                walk(item)
        elif isinstance(value, (list, tuple)):
            for item in value:
                walk(item)
        elif isinstance(value, torch.Tensor) and value.is_floating_point():
            tensors.append(value)

    walk(state)
    assert tensors
    return all(bool(torch.isfinite(t).all()) and float(t.abs().max()) < 1e6 for t in tensors)


def test_divergence_never_becomes_a_checkpoint_and_the_printed_command_continues(base):
    root, cache, _ = base
    out = root / "diverged"
    # warmup 1: step 1 trains at lr 0 (a sane checkpoint), step 2 applies lr=1e30
    result = _train(out, cache, "train.lr=1.0e+30", "train.save_every=1", "train.steps=4", "train.warmup_steps=1",
                    "train.keep_last=0")
    assert result.returncode == 2, result.stderr[-3000:]
    line = _error_line(result)
    good = out / "checkpoints" / "step_000001"
    assert "step 2" in line and "train.max_param_norm_growth" in line and str(good) in line
    assert _steps(out) == [1]
    assert _all_finite(good, root / "diverged.pt")
    before = _tree_hash(out / "checkpoints")

    command = re.search(r"solopo train (--config \S+ .*)$", line).group(1).split()
    assert command[2:] == [f"train.resume={good}", "train.lr=0.0001"]
    # the clean reference: the same checkpoint alone in a fresh run directory, the same lower lr
    clean = root / "clean"
    shutil.copytree(good, clean / "checkpoints" / good.name)
    reference = _train(clean, cache, "train.resume=auto", "train.lr=0.0001", config=pathlib.Path(command[1]))
    resumed = _train(out, cache, *command[2:], config=pathlib.Path(command[1]))
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    assert reference.returncode == 0, reference.stderr[-3000:]
    assert "train.lr 1e+30 -> 0.0001" in resumed.stderr
    continued = {step: record for step, record in _records(out).items() if step > 1}
    assert sorted(continued) == [2, 3, 4] and continued == _records(clean)
    assert {k: v for k, v in _tree_hash(out / "checkpoints").items() if k in before} == before


# --------------------------------------------------------------------------------- 3. damaged checkpoints
def _damage(checkpoint: pathlib.Path, how: str) -> pathlib.Path:
    if how == "truncated_distcp":
        victim = sorted(checkpoint.glob("*.distcp"))[0]
        victim.write_bytes(victim.read_bytes()[: victim.stat().st_size // 2])
    elif how == "missing_distcp":
        victim = sorted(checkpoint.glob("*.distcp"))[0]
        victim.unlink()
    elif how == "empty_metadata":
        victim = checkpoint / ".metadata"
        victim.write_bytes(b"")
    else:  # garbled marker
        victim = checkpoint / "solopo_checkpoint.json"
        victim.write_text('{"format": "megatron_solopo.checkpoint", "kind": tr', encoding="utf-8")
    return victim


@pytest.mark.parametrize("how", ["truncated_distcp", "missing_distcp", "empty_metadata", "garbled_marker"])
def test_damaged_latest_checkpoint_is_named_and_skipped(base, how, capsys):
    from megatron_solopo.training.run_state import resolve_resume

    root, _, run = base
    out = _copy(run, root / f"damaged_{how}")
    victim = _damage(out / "checkpoints" / "step_000003", how)
    assert resolve_resume("auto", out) == out / "checkpoints" / "step_000002"
    warning = capsys.readouterr().err
    assert str(out / "checkpoints" / "step_000003") in warning and "previous complete one" in warning
    assert victim.name in warning or str(victim) in warning


def test_resume_skips_a_damaged_checkpoint_and_refuses_an_explicitly_named_one(base):
    root, cache, run = base
    out = _copy(run, root / "damaged_run")
    _damage(out / "checkpoints" / "step_000003", "truncated_distcp")
    before = _tree_hash(out)
    bad = out / "checkpoints" / "step_000003"
    refused = _train(out, cache, f"train.resume={bad}", "train.steps=3")
    assert refused.returncode == 2
    line = _error_line(refused)
    assert str(bad) in line and str(out / "checkpoints" / "step_000002") in line and ".distcp" in line
    assert _tree_hash(out) == before

    resumed = _train(out, cache, "train.steps=3", "train.keep_last=0", "train.warmup_steps=0", "train.save_every=1")
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    assert f"checkpoint {bad} is damaged" in resumed.stderr and "step_000002" in resumed.stderr
    assert "Traceback" not in resumed.stderr
    assert _records(out)[3] == _records(run)[3]  # step 3 again from step 2: the same numbers
    after = _tree_hash(out)
    assert all(after[k] == v for k, v in before.items() if "step_000001" in k or "step_000002" in k)


def test_every_checkpoint_damaged_names_them_all(base, tmp_path):
    from megatron_solopo.training.run_state import CheckpointError, resolve_resume

    _, _, run = base
    out = _copy(run, tmp_path / "all_bad")
    for step in (1, 2, 3):
        _damage(out / "checkpoints" / f"step_00000{step}", "empty_metadata")
    with pytest.raises(CheckpointError) as err:
        resolve_resume("auto", out)
    assert all(f"step_00000{step}" in str(err.value) for step in (1, 2, 3))


# ------------------------------------------------------------------------------- 4. reused output_dir
def test_another_objective_in_the_same_output_dir_is_refused_and_force_continues(base):
    root, cache, run = base
    out = _copy(run, root / "reused")
    before = _tree_hash(out)
    refused = _train(out, cache, "objective.alpha=2.0", "train.steps=4", "train.keep_last=1")
    assert refused.returncode == 2
    line = _error_line(refused)
    assert "objective.alpha" in line and "train.resume=force" in line and "step_000003" in line
    assert _tree_hash(out) == before  # nothing written, nothing pruned, no lock left behind

    batch = _train(out, cache, "train.steps=4", "train.keep_last=1", "train.global_batch_pairs=1")
    assert batch.returncode == 2 and "train.global_batch_pairs" in _error_line(batch)
    assert _tree_hash(out) == before

    forced = _train(out, cache, "objective.alpha=2.0", "train.steps=4", "train.keep_last=0", "train.resume=force")
    assert forced.returncode == 0, forced.stderr[-3000:]
    assert "train.resume=force" in forced.stderr and "objective.alpha" in forced.stderr
    assert _steps(out) == [1, 2, 3, 4]


def test_config_comparison_separates_math_from_schedule():
    from megatron_solopo.training.resume import compare_with_checkpoint_config

    saved = {"model": {"preset": "tiny", "attention_backend": "auto"}, "objective": {"name": "orpo"},
             "data": {"pairs_path": "a.jsonl", "cache_dir": "x"},
             "train": {"lr": 1e-3, "global_batch_pairs": 4, "seed": 1, "output_dir": "o", "keep_last": 2}}
    current = json.loads(json.dumps(saved))
    current["model"]["attention_backend"] = "sdpa"
    current["data"]["cache_dir"] = "y"
    current["train"].update(lr=1e-4, output_dir="p", keep_last=0)
    assert compare_with_checkpoint_config(saved, current) == ([], [("train.lr", 1e-3, 1e-4)])
    current["objective"]["name"] = "simpo"
    current["data"]["pairs_path"] = "b.jsonl"
    current["train"]["global_batch_pairs"] = 8
    differing, _ = compare_with_checkpoint_config(saved, current)
    assert differing == ["objective.name", "data.pairs_path", "train.global_batch_pairs"]


def test_run_lock_refuses_a_live_owner_and_takes_over_a_dead_one(tmp_path, capsys):
    import socket

    from megatron_solopo.training.run_state import CheckpointError
    from megatron_solopo.training.run_lock import LOCK_FILE, acquire_run_lock

    lock = tmp_path / LOCK_FILE
    sleeper = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(60)"])
    try:
        lock.write_text(json.dumps({"host": socket.gethostname(), "pid": sleeper.pid}))
        with pytest.raises(CheckpointError) as err:
            acquire_run_lock(tmp_path)
        assert str(lock) in str(err.value) and f"pid {sleeper.pid}" in str(err.value)
        lock.write_text(json.dumps({"host": "some-other-node", "pid": 1}))
        with pytest.raises(CheckpointError, match="some-other-node"):
            acquire_run_lock(tmp_path)
    finally:
        sleeper.kill()
        sleeper.wait()
    lock.write_text(json.dumps({"host": socket.gethostname(), "pid": sleeper.pid}))  # now dead
    assert acquire_run_lock(tmp_path) == lock
    assert json.loads(lock.read_text())["pid"] == os.getpid()
    assert "taking over" in capsys.readouterr().err


def test_a_second_run_into_a_locked_output_dir_refuses(base):
    import socket

    from megatron_solopo.training.run_lock import LOCK_FILE

    root, cache, run = base
    out = _copy(run, root / "locked")
    sleeper = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(120)"])
    try:
        (out / LOCK_FILE).write_text(json.dumps({"host": socket.gethostname(), "pid": sleeper.pid}))
        before = _tree_hash(out)
        result = _train(out, cache, "train.steps=4")
        assert result.returncode == 2
        line = _error_line(result)
        assert str(out / LOCK_FILE) in line and str(sleeper.pid) in line
        assert _tree_hash(out) == before
    finally:
        sleeper.kill()
        sleeper.wait()


# ------------------------------------------------------------------------- 5. distributed optimizer on CPU
def test_distributed_optimizer_checkpoint_resumes_like_an_uninterrupted_run(base):
    root, cache, _ = base
    common = ("train.distributed_optimizer=true", "train.steps=3", "train.warmup_steps=0", "train.save_every=1")
    whole, split = root / "distopt_whole", root / "distopt_split"
    first = _train(whole, cache, *common)
    assert first.returncode == 0, first.stderr[-3000:]
    stopped = _train(split, cache, *common, "train.max_steps_per_run=1")
    assert stopped.returncode == 75, stopped.stderr[-3000:]
    resumed = _train(split, cache, *common)
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    assert "KeyError" not in resumed.stderr
    assert _records(split) == _records(whole)


# -------------------------------------------------------------------------------------------- 6. small data
def test_fewer_pairs_than_one_global_batch_says_how_many(base):
    root, cache, _ = base
    out = root / "small"
    result = _train(out, cache, "train.steps=2", "train.global_batch_pairs=64")
    assert result.returncode == 2
    line = _error_line(result)
    assert "35 preference pairs" in line and "(64)" in line and "train.global_batch_pairs" in line
    assert "data.pairs_path=" in line
    assert "StopIteration" not in result.stderr


# ----------------------------------------------------------------------------- 7. SIGTERM and the stop file

def _assert_process_group_gone(pgid: int, seconds: float, message: str) -> None:
    """Waits up to `seconds` for every process of session/process group `pgid` to exit."""
    gone_by = time.monotonic() + seconds
    while True:
        try:
            os.killpg(pgid, 0)
        except ProcessLookupError:
            return
        assert time.monotonic() < gone_by, message
        time.sleep(0.2)


def test_sigterm_saves_at_the_step_boundary_leaves_no_process_and_resumes(base):
    root, cache, _ = base
    out = root / "sigterm"
    process = subprocess.Popen(_command(out, cache, "train.steps=200", "train.warmup_steps=0", "train.save_every=0"),
                               cwd=REPO, env=_env(), stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                               start_new_session=True)
    metrics = out / "metrics.jsonl"
    deadline = time.monotonic() + 300
    while not (metrics.is_file() and metrics.read_text().strip()):
        assert process.poll() is None and time.monotonic() < deadline, process.communicate()[1][-3000:]
        time.sleep(0.2)
    os.kill(process.pid, signal.SIGTERM)
    _, stderr = process.communicate(timeout=300)
    assert process.returncode == 75, stderr[-3000:]
    assert "SIGTERM received" in stderr and "Traceback" not in stderr
    # nothing of the run (dist_checkpointing's manager process included) is alive 10 s later
    _assert_process_group_gone(process.pid, 10.0, "a process of the SIGTERM-ed run is still alive")
    summary = json.loads((out / "run_summary.json").read_text())
    assert summary["stop_reason"] == "sigterm"
    saved = summary["final_step"]
    assert _steps(out) == [saved] and 1 <= saved < 200

    resumed = _train(out, cache, "train.steps=200", "train.warmup_steps=0", "train.save_every=0",
                     "train.max_steps_per_run=1")
    assert resumed.returncode == 75, resumed.stderr[-3000:]
    assert f"step_{saved:06d} (step {saved})" in resumed.stdout + resumed.stderr
    assert _steps(out)[-1] == saved + 1


def test_stop_file_is_removed_once_honoured(base):
    root, cache, _ = base
    out, stop = root / "stopfile", root / "stop-now"
    stop.touch()
    result = _train(out, cache, "train.steps=3", env={"SOLOPO_STOP_FILE": str(stop)})
    assert result.returncode == 75, result.stderr[-3000:]
    assert _steps(out) == [1] and not stop.exists()


def test_sigkill_leaves_no_checkpoint_writer_behind(base):
    root, cache, _ = base
    out = root / "sigkill"
    process = subprocess.Popen(_command(out, cache, "train.steps=200", "train.warmup_steps=0", "train.save_every=1"),
                               cwd=REPO, env=_env(), stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
                               start_new_session=True)
    deadline = time.monotonic() + 300
    while not _steps(out):  # the writer's helper process exists from the first save on
        assert process.poll() is None and time.monotonic() < deadline
        time.sleep(0.2)
    os.kill(process.pid, signal.SIGKILL)
    process.wait(timeout=60)
    _assert_process_group_gone(process.pid, 10.0, "dist_checkpointing's helper outlived the SIGKILL-ed trainer")
