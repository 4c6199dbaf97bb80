"""SLURM scripts: syntax (bash -n), --dry-run (layout + memory estimate, 8B at 128K), the time-limit
protocol (SIGUSR1 -> stop file -> trainer exits 75 -> requeue) with fake srun/scontrol. (The memory lower
bound's arithmetic: tests/plan/test_lower_bound.py.)"""

import os
import pathlib
import shutil
import signal
import subprocess
import sys
import time

import pytest

ROOT = pathlib.Path(__file__).resolve().parents[2]
SCRIPTS = sorted((ROOT / "examples" / "slurm").glob("*.sbatch"))
RECIPE_8B_128K = ROOT / "examples" / "configs" / "recipes" / "llama3.1-8b-128k" / "solo-orpo.yaml"


def _env(**extra):
    env = {k: v for k, v in os.environ.items() if not k.startswith("SLURM_")}
    env.update({"PYTHON": sys.executable, "SOLOPO_ROOT": str(ROOT), "VENV": "/nonexistent", **extra})
    return env


def test_scripts_exist_and_parse():
    assert {p.name for p in SCRIPTS} >= {"train_single_node.sbatch", "train_multi_node.sbatch"}
    for script in SCRIPTS:
        result = subprocess.run(["bash", "-n", str(script)], capture_output=True, text=True, check=False)
        assert result.returncode == 0, f"{script.name}: {result.stderr}"
        text = script.read_text()
        assert "#SBATCH --signal=B:USR1@300" in text and "#SBATCH --requeue" in text
        assert "train.resume=auto" in text and "scontrol requeue" in text


def test_dry_run_prints_layout_and_memory_for_8b_at_128k():
    # memory is the dry run's (solopo plan, no sequence parallelism on CPU): without recompute the recipe's
    # TP8 x CP4 rank peaks at ~118 GiB there (an upper bound: SP would lower it), with full recompute ~23 GiB
    result = subprocess.run(["bash", str(ROOT / "examples/slurm/train_multi_node.sbatch"), "--dry-run",
                             str(RECIPE_8B_128K), "model.recompute=full"], capture_output=True, text=True,
                            check=False, env=_env(), timeout=120)
    assert result.returncode == 0, result.stderr
    out = result.stdout
    assert "job: 4 node(s) x 8 GPUs = 32 GPUs" in out  # the node count of the script's #SBATCH header
    assert "layout: TP=8 PP=1 CP=4 DP=1" in out
    assert "model: llama3.1-8b (8.03B params" in out
    for term in ("weights", "gradients", "optimizer", "activations", "LM head", "total"):
        assert term in out
    assert "-> fits" in out
    # an impossible layout is reported with its reason (exit 2), one that does not fit with advice (exit 3)
    bad = subprocess.run(["bash", str(ROOT / "examples/slurm/train_multi_node.sbatch"), "--dry-run",
                          str(RECIPE_8B_128K), "parallel.cp=3"],
                         capture_output=True, text=True, check=False, env=_env(NODES="1"), timeout=120)
    assert bad.returncode == 2 and "not divisible by tp*pp*cp" in bad.stderr, bad.stderr
    too_big = subprocess.run(["bash", str(ROOT / "examples/slurm/train_single_node.sbatch"), "--dry-run",
                              str(RECIPE_8B_128K), "parallel.tp=1", "parallel.cp=1",
                              "parallel.sequence_parallel=false"],
                             capture_output=True, text=True, check=False, env=_env(GPUS_PER_NODE="1"), timeout=120)
    assert too_big.returncode == 3 and "DOES NOT FIT" in too_big.stdout and "try: model.recompute=full" in too_big.stdout


FAKE_SRUN = """#!/bin/bash
# stands in for srun + torchrun + the trainer: waits for the stop file like the trainer's step loop would,
# records 75 in $SOLOPO_EXIT_STATUS_FILE as rank 0 does, and exits 1 as torchrun does for a worker's 75
echo "srun $*" >> "$FAKE_LOG"
if [ -n "${FAKE_FAIL:-}" ]; then echo "config error" >> "$FAKE_LOG"; exit 1; fi
for _ in $(seq 600); do
  if [ -f "$SOLOPO_STOP_FILE" ]; then
    echo "saved checkpoint, stopping" >> "$FAKE_LOG"
    printf '75\\nstop_file at step 3/9; checkpoint ck/step_000003\\n' > "$SOLOPO_EXIT_STATUS_FILE"
    exit 1
  fi
  sleep 0.1
done
exit 1
"""


def _fake_slurm_bin(tmp_path, fake_srun: str, node: str):
    """A bin/ directory with stand-ins for srun and scontrol (scontrol logs its calls; `show` names `node`)."""
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir()
    fake_scontrol = f'#!/bin/bash\necho "scontrol $*" >> "$FAKE_LOG"\nif [ "$1" = show ]; then echo {node}; fi\n'
    for name, body in (("srun", fake_srun), ("scontrol", fake_scontrol)):
        (bin_dir / name).write_text(body)
        (bin_dir / name).chmod(0o755)
    return bin_dir


@pytest.mark.skipif(shutil.which("bash") is None, reason="needs bash")
def test_time_limit_signal_saves_and_requeues(tmp_path):
    bin_dir = _fake_slurm_bin(tmp_path, FAKE_SRUN, "node001")
    log = tmp_path / "fake.log"
    env = _env(PATH=f"{bin_dir}:{os.environ['PATH']}", FAKE_LOG=str(log), SOLOPO_ROOT=str(tmp_path),
               SLURM_JOB_ID="4242", SLURM_JOB_NAME="solopo-train", SLURM_JOB_NODELIST="node001",
               SLURM_JOB_NUM_NODES="1", SLURM_RESTART_COUNT="0")
    proc = subprocess.Popen(["bash", str(ROOT / "examples/slurm/train_multi_node.sbatch"), "recipe.yaml",
                             "train.lr=1e-6"], env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    deadline = time.time() + 30
    while not (log.exists() and "srun" in log.read_text()) and time.time() < deadline:
        time.sleep(0.1)
    proc.send_signal(signal.SIGUSR1)  # what SLURM does 300 s before the time limit
    output, _ = proc.communicate(timeout=60)
    assert proc.returncode == 0, output
    calls = log.read_text()
    assert "--config recipe.yaml train.resume=auto train.lr=1e-6" in calls
    assert "saved checkpoint, stopping" in calls and "scontrol requeue 4242" in calls
    job_dir = tmp_path / "logs" / "solopo-train-4242"
    assert (job_dir / "stop-requested").exists() and (job_dir / "attempt-0" / "command.txt").exists()
    assert "(launcher status 1): requeueing job 4242" in output


@pytest.mark.skipif(shutil.which("bash") is None, reason="needs bash")
@pytest.mark.parametrize("script", ["train_single_node.sbatch", "train_multi_node.sbatch"])
def test_a_failure_is_not_requeued(tmp_path, script):
    """torchrun's 1 without the trainer's record of 75 is a failure: no requeue, the job fails."""
    bin_dir = _fake_slurm_bin(tmp_path, FAKE_SRUN, "node001")
    log = tmp_path / "fake.log"
    env = _env(PATH=f"{bin_dir}:{os.environ['PATH']}", FAKE_LOG=str(log), FAKE_FAIL="1", SOLOPO_ROOT=str(tmp_path),
               SLURM_JOB_ID="4243", SLURM_JOB_NAME="solopo-train", SLURM_JOB_NODELIST="node001",
               SLURM_JOB_NUM_NODES="1", SLURM_RESTART_COUNT="0")
    result = subprocess.run(["bash", str(ROOT / "examples/slurm" / script), "recipe.yaml"], env=env,
                            capture_output=True, text=True, check=False, timeout=60)
    assert result.returncode == 1, result.stdout + result.stderr
    assert "training exited with status 1" in result.stdout and "scontrol requeue" not in log.read_text()


# ------------------------------------------------------------------------------------------ two "nodes" on one host
FAKE_SRUN_NODES = """#!/bin/bash
# stands in for `srun --ntasks-per-node=1 [--opts] CMD...` on $SLURM_JOB_NUM_NODES nodes: starts CMD once per
# "node" on this host (node0, node1, ...; --output's %n is the node), waits for all, exits with the worst status
output=
while [ $# -gt 0 ] && [ "${1#--}" != "$1" ]; do
  case $1 in --output=*) output=${1#--output=} ;; esac
  shift
done
pids=()
for ((n = 0; n < SLURM_JOB_NUM_NODES; n++)); do
  SLURM_NODEID=$n "$@" > "${output//%n/node$n}" 2>&1 &
  pids+=($!)
done
worst=0
for pid in "${pids[@]}"; do
  while kill -0 "$pid" 2>/dev/null; do wait "$pid" || true; done
  status=0; wait "$pid" || status=$?
  [ "$status" -gt "$worst" ] && worst=$status
done
exit "$worst"
"""


def _free_port() -> int:
    import socket

    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


@pytest.mark.slow
@pytest.mark.skipif(shutil.which("bash") is None, reason="needs bash")
def test_multi_node_script_two_torchrun_agents_stop_requeue_and_resume(tmp_path):
    """train_multi_node.sbatch's real launch line, with srun replaced by a stand-in that starts one torchrun
    agent per "node" on this host (--nnodes 2, c10d rendezvous on the first node, one CPU rank each): the two
    agents rendezvous, SIGUSR1 makes both ranks stop at the same step with a checkpoint, the script reads rank
    0's 75 behind the launcher's 1 and requeues, and the next attempt resumes from that checkpoint and ends."""
    bin_dir = _fake_slurm_bin(tmp_path, FAKE_SRUN_NODES, "localhost")
    log, run_dir, sample = tmp_path / "fake.log", tmp_path / "run", ROOT / "megatron_solopo" / "resources" / "sample"
    python_path = os.pathsep.join(p for p in (str(ROOT), os.environ.get("PYTHONPATH", "")) if p)
    overrides = [f"model.tokenizer={sample / 'tokenizer'}", f"data.pairs_path={sample / 'pairs.jsonl'}",
                 f"data.cache_dir={tmp_path / 'cache'}", f"train.output_dir={run_dir}", "train.steps=12",
                 "train.save_every=0"]
    job_dir = tmp_path / "logs" / "solopo-train-4244"

    def attempt(restart: int, signal_after_step: int | None) -> str:
        env = _env(PATH=f"{bin_dir}:{os.environ['PATH']}", FAKE_LOG=str(log), SOLOPO_ROOT=str(tmp_path),
                   SLURM_JOB_ID="4244", SLURM_JOB_NAME="solopo-train", SLURM_JOB_NODELIST="node[0-1]",
                   SLURM_JOB_NUM_NODES="2", SLURM_RESTART_COUNT=str(restart), GPUS_PER_NODE="1",
                   MASTER_PORT=str(_free_port()), PYTHONPATH=python_path, CUDA_VISIBLE_DEVICES="")
        proc = subprocess.Popen(["bash", str(ROOT / "examples/slurm/train_multi_node.sbatch"),
                                 str(ROOT / "examples/configs/tiny_cpu.yaml"), *overrides], env=env,
                                stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
        if signal_after_step is not None:
            deadline = time.time() + 300
            metrics = run_dir / "metrics.jsonl"
            while not (metrics.exists() and metrics.read_text().count('"step"') >= signal_after_step):
                assert proc.poll() is None and time.time() < deadline, (proc.poll(), proc.stdout.read()
                                                                         if proc.poll() is not None else "")
                time.sleep(0.3)
            proc.send_signal(signal.SIGUSR1)
        output, _ = proc.communicate(timeout=600)
        attempt_dir = job_dir / f"attempt-{restart}"
        logs = "\n".join(p.read_text(errors="replace") for p in sorted(attempt_dir.glob("node-*.log")))
        assert proc.returncode == 0, f"{output}\n{logs[-6000:]}"
        return output + logs

    first = attempt(0, signal_after_step=2)
    status = (job_dir / "attempt-0" / "trainer-exit-status").read_text().split("\n")
    assert status[0] == "75" and status[1].startswith("stop_file at step "), status
    stop_step = int(status[1].split("step ")[1].split("/")[0])
    assert "(launcher status 1): requeueing job 4244" in first and "scontrol requeue 4244" in log.read_text()
    assert "on 2 node(s)" in first and "dp=2" in first, first[-6000:]  # two agents, one rank each, one group

    second = attempt(1, signal_after_step=None)
    assert f"resuming from {run_dir / 'checkpoints' / f'step_{stop_step:06d}'} (step {stop_step})" in second, second[-6000:]
    assert (job_dir / "attempt-1" / "trainer-exit-status").read_text().startswith("0\nfinished at step 12/12")
    assert "training exited with status 0" in second and log.read_text().count("scontrol requeue") == 1
