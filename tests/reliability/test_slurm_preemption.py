"""Preemption under a real SLURM: a one-node cluster on localhost (munged, slurmctld, slurmd started by the
module fixture in a temporary directory, with their own slurm.conf, state, spool, ports and munge socket)
runs examples/slurm/train_single_node.sbatch on the tiny CPU config.

- `scancel --batch --signal=USR1` (what SLURM does before the time limit, `--signal=B:USR1@300`) makes
  the trainer save and exit 75; torchrun reports that as its own 1, the script reads rank 0's
  $SOLOPO_EXIT_STATUS_FILE, requeues, and the second attempt resumes from the checkpoint the signal wrote
  and ends with the final loss of an uninterrupted run.
- A trainer failing with a real error (an unknown config key) is not requeued: the job ends FAILED.

Marked `slurm`; skipped with the reason where the SLURM/munge daemons are not installed, the test is not
root (slurmd must be), or the cluster does not come up within 60 s. Debian: apt-get install slurmd
slurmctld slurm-client munge.
"""

from __future__ import annotations

import json
import os
import pathlib
import re
import shutil
import socket
import subprocess
import sys
import time

import pytest

pytestmark = pytest.mark.slurm

ROOT = pathlib.Path(__file__).resolve().parents[2]
SCRIPT = ROOT / "examples" / "slurm" / "train_single_node.sbatch"
CONFIG = ROOT / "examples" / "configs" / "tiny_cpu.yaml"
SAMPLE = ROOT / "megatron_solopo" / "resources" / "sample"
TOOLS = ("munged", "slurmctld", "slurmd", "sbatch", "scancel", "scontrol", "squeue", "sinfo")
STEPS = 30  # 0.5-7 s a step on two busy cores: time to signal mid-run
FINAL_STATES = {"COMPLETED", "FAILED", "CANCELLED", "TIMEOUT", "NODE_FAIL", "OUT_OF_MEMORY", "BOOT_FAIL",
                "DEADLINE", "PREEMPTED"}


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def _tail(path: pathlib.Path, lines: int = 15) -> str:
    return "\n".join(path.read_text(errors="replace").splitlines()[-lines:]) if path.exists() else "(none)"


class Cluster:
    """munged + slurmctld + slurmd for one node (this host) with `cpus` CPUs, everything under `base`."""

    def __init__(self, base: pathlib.Path):
        self.base = base
        self.node = socket.gethostname().split(".")[0]
        self.conf = base / "slurm.conf"
        self.munge_dir = base / "munge"
        self.socket = self.munge_dir / "munge.socket"
        self.env = {k: v for k, v in os.environ.items() if not k.startswith("SLURM_")}
        self.env["SLURM_CONF"] = str(self.conf)
        self.pids: list[int] = []

    def write_config(self) -> None:
        for name in ("state", "spool"):
            (self.base / name).mkdir()
        self.munge_dir.mkdir(mode=0o711)
        key = self.munge_dir / "munge.key"
        key.write_bytes(os.urandom(1024))
        key.chmod(0o400)
        b = self.base
        # cred_expire also sets how long SLURM holds a requeued job before it may start again (default 120 s)
        self.conf.write_text(f"""ClusterName=solopotest
SlurmctldHost={self.node}(127.0.0.1)
SlurmctldPort={_free_port()}
SlurmdPort={_free_port()}
AuthType=auth/munge
CredType=cred/munge
AuthInfo=socket={self.socket},cred_expire=10
SlurmUser=root
SlurmdUser=root
StateSaveLocation={b}/state
SlurmdSpoolDir={b}/spool
SlurmctldPidFile={b}/slurmctld.pid
SlurmdPidFile={b}/slurmd.pid
SlurmctldLogFile={b}/slurmctld.log
SlurmdLogFile={b}/slurmd.log
ProctrackType=proctrack/linuxproc
TaskPlugin=task/none
JobRequeue=1
ReturnToService=2
MpiDefault=none
SchedulerType=sched/builtin
SchedulerParameters=sched_interval=2
SelectType=select/cons_tres
SelectTypeParameters=CR_CPU
NodeName={self.node} NodeAddr=127.0.0.1 CPUs={os.cpu_count() or 1} State=UNKNOWN
PartitionName=debug Nodes=ALL Default=YES MaxTime=INFINITE State=UP
""")

    def run(self, *args: str, check: bool = True, **kwargs) -> subprocess.CompletedProcess:
        return subprocess.run(list(args), env=kwargs.pop("env", self.env), capture_output=True, text=True,
                              check=check, timeout=kwargs.pop("timeout", 60), **kwargs)

    def start(self) -> str | None:
        """None when the node is idle, else why not (within ~60 s)."""
        self.write_config()
        m = self.munge_dir
        started = self.run("munged", "--force", f"--socket={self.socket}", f"--key-file={m}/munge.key",
                           f"--log-file={m}/munged.log", f"--pid-file={m}/munged.pid", f"--seed-file={m}/munged.seed",
                           check=False)
        if started.returncode != 0:
            return f"munged did not start: {started.stderr.strip()}"
        for daemon in ("slurmctld", "slurmd"):
            started = self.run(daemon, "-f", str(self.conf), *(["-N", self.node] if daemon == "slurmd" else []),
                               check=False)
            if started.returncode != 0:
                return f"{daemon} did not start: {started.stderr.strip()}\n{_tail(self.base / f'{daemon}.log')}"
        # the daemons delete their pid files on shutdown: remember the pids to wait for them
        self.pids = [pid for name in ("munge/munged.pid", "slurmctld.pid", "slurmd.pid")
                     if (pid := _pid(self.base / name)) is not None]
        deadline = time.time() + 60
        while time.time() < deadline:
            state = self.run("sinfo", "-h", "-n", self.node, "-o", "%T", check=False).stdout.strip()
            if state == "idle":
                return None
            time.sleep(1)
        return (f"the node is not idle after 60 s (state {state!r}):\n{_tail(self.base / 'slurmctld.log')}\n"
                f"{_tail(self.base / 'slurmd.log')}")

    def stop(self) -> None:
        """scontrol shutdown (slurmctld and slurmd), munged --stop; SIGKILL whatever is left after 30 s."""
        self.pids += [pid for name in ("munge/munged.pid", "slurmctld.pid", "slurmd.pid")
                      if (pid := _pid(self.base / name)) is not None and pid not in self.pids]
        self.run("scontrol", "shutdown", check=False)
        self.run("munged", "--stop", f"--socket={self.socket}", check=False)
        deadline = time.time() + 30
        while time.time() < deadline and any(_alive(pid) for pid in self.pids):
            time.sleep(0.5)
        for pid in self.pids:
            if _alive(pid):
                os.kill(pid, 9)

    def job(self, job_id: str) -> dict[str, str]:
        out = self.run("scontrol", "-o", "show", "job", job_id).stdout
        return dict(field.split("=", 1) for field in out.split() if "=" in field)

    def wait_final(self, job_id: str, timeout: float, restarts: int = 0) -> dict[str, str]:
        """The job's record once it reached a final state after at least `restarts` requeues."""
        deadline = time.time() + timeout
        while time.time() < deadline:
            info = self.job(job_id)
            if info.get("JobState") in FINAL_STATES and int(info.get("Restarts", 0)) >= restarts:
                return info
            time.sleep(1)
        raise AssertionError(f"job {job_id} not finished after {timeout:.0f} s: {self.job(job_id)}\n"
                             f"{_tail(self.base / 'slurmctld.log')}")


def _pid(pid_file: pathlib.Path) -> int | None:
    try:
        return int(pid_file.read_text().strip())
    except (OSError, ValueError):
        return None


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except OSError:
        return False
    try:  # a zombie (exited, not yet reaped by its parent) counts as gone
        return pathlib.Path(f"/proc/{pid}/stat").read_text().split(")")[-1].split()[0] != "Z"
    except OSError:
        return False


@pytest.fixture(scope="module")
def cluster(tmp_path_factory):
    missing = [tool for tool in TOOLS if shutil.which(tool) is None]
    if missing:
        pytest.skip(f"SLURM/munge not installed (missing {', '.join(missing)}; Debian: apt-get install slurmd "
                    "slurmctld slurm-client munge)")
    if os.geteuid() != 0:
        pytest.skip("starting a local SLURM cluster needs root (slurmd)")
    # short path: the munge socket must stay within the 108 characters of a Unix socket address
    base = pathlib.Path(tmp_path_factory.mktemp("slurm"))
    c = Cluster(base)
    try:
        problem = c.start()
        if problem:
            pytest.skip(f"could not start a one-node SLURM cluster: {problem}")
        yield c
    finally:
        c.stop()


def _overrides(work: pathlib.Path, *extra: str) -> list[str]:
    """The tiny CPU config with absolute paths (the job runs in `work`, not in the checkout)."""
    return [f"model.tokenizer={SAMPLE / 'tokenizer'}", f"data.pairs_path={SAMPLE / 'pairs.jsonl'}",
            f"data.cache_dir={work / 'cache'}", f"train.output_dir={work / 'run'}", f"train.steps={STEPS}",
            "train.save_every=0", *extra]


def _job_env(cluster: Cluster, work: pathlib.Path) -> dict[str, str]:
    python_path = os.pathsep.join(p for p in (str(ROOT), os.environ.get("PYTHONPATH", "")) if p)
    return {**cluster.env, "PYTHON": sys.executable, "VENV": "/nonexistent", "SOLOPO_ROOT": str(work),
            "GPUS_PER_NODE": "1", "SOLOPO_DEVICE": "cpu", "CUDA_VISIBLE_DEVICES": "", "PYTHONPATH": python_path}


def _submit(cluster: Cluster, work: pathlib.Path, overrides: list[str]) -> str:
    (work / "logs").mkdir(parents=True, exist_ok=True)
    # the script asks for 8 GPUs and 96 CPUs per task; this node has neither
    result = cluster.run("sbatch", "--parsable", "--gpus-per-node=0", "--cpus-per-task=1", str(SCRIPT),
                         str(CONFIG), *overrides, env=_job_env(cluster, work), cwd=work)
    return result.stdout.strip().split(";")[0]


def _steps_logged(metrics: pathlib.Path) -> int:
    if not metrics.exists():
        return 0
    steps = [json.loads(line).get("step", 0) for line in metrics.read_text().splitlines() if line.strip()]
    return max(steps, default=0)


def _final_loss(output_dir: pathlib.Path) -> float:
    summary = json.loads((output_dir / "run_summary.json").read_text())
    assert summary["finished"], summary
    return summary["last_metrics"]["loss"]


def test_usr1_saves_requeues_and_resumes_to_the_uninterrupted_loss(cluster, tmp_path):
    # the reference: the same config without interruption, directly (no SLURM, no torchrun), first (the
    # machine may have only two cores); one thread, as torchrun gives its workers
    reference = tmp_path / "reference"
    env = {**_job_env(cluster, reference), "SOLOPO_STOP_FILE": "", "SOLOPO_EXIT_STATUS_FILE": "",
           "OMP_NUM_THREADS": "1"}
    direct = subprocess.run([sys.executable, "-m", "megatron_solopo.cli", "train", "--config", str(CONFIG),
                             *_overrides(reference)], env=env, cwd=ROOT, capture_output=True, text=True, timeout=600,
                            check=False)
    assert direct.returncode == 0, direct.stderr[-3000:]

    work = tmp_path / "slurm"
    job_id = _submit(cluster, work, _overrides(work))
    deadline = time.time() + 180
    while _steps_logged(work / "run" / "metrics.jsonl") < 2:
        assert time.time() < deadline, f"no training steps after 180 s: {cluster.job(job_id)}"
        assert cluster.job(job_id).get("JobState") in {"PENDING", "RUNNING"}, cluster.job(job_id)
        time.sleep(0.5)
    cluster.run("scancel", "--batch", "--signal=USR1", job_id)  # SLURM's --signal=B:USR1@300, now

    info = cluster.wait_final(job_id, timeout=600, restarts=1)
    job_dir = work / "logs" / f"solopo-train-{job_id}"
    first, second = (job_dir / "attempt-0"), (job_dir / "attempt-1")
    first_log, second_log = (first / "command.txt").read_text(), (second / "command.txt").read_text()
    context = f"{info}\n--- attempt 0\n{first_log}\n--- attempt 1\n{second_log}\n{_tail(second / 'node.log', 30)}"
    assert info["JobState"] == "COMPLETED" and info["Restarts"] == "1" and info["ExitCode"] == "0:0", context

    # attempt 0: the signal, the trainer's 75 behind torchrun's 1, the requeue
    assert "SIGUSR1" in first_log, context
    status = (first / "trainer-exit-status").read_text().split("\n")
    match = re.fullmatch(r"stop_file at step (\d+)/(\d+); checkpoint (\S+)", status[1])
    assert status[0] == "75" and match and int(match.group(2)) == STEPS, status
    stop_step, checkpoint = int(match.group(1)), match.group(3)
    assert 2 <= stop_step < STEPS and checkpoint.endswith(f"step_{stop_step:06d}"), status
    assert f"requeueing job {job_id}" in first_log and "(launcher status 1)" in first_log, context
    assert "exitcode  : 75" in (first / "node.log").read_text()  # torchrun's ChildFailedError report

    # attempt 1: resumed from exactly that checkpoint and finished
    assert f"resuming from {checkpoint} (step {stop_step})" in (second / "node.log").read_text(), context
    assert (second / "trainer-exit-status").read_text().startswith("0\nfinished"), context
    assert "training exited with status 0" in second_log and "requeueing" not in second_log, context

    # the interrupted run ends where the uninterrupted one does
    assert _final_loss(work / "run") == pytest.approx(_final_loss(reference / "run"), rel=1e-6, abs=1e-7)


def test_a_real_failure_is_not_requeued(cluster, tmp_path):
    work = tmp_path / "slurm"
    job_id = _submit(cluster, work, _overrides(work, "train.no_such_key=1"))
    info = cluster.wait_final(job_id, timeout=300)
    log = (work / "logs" / f"solopo-train-{job_id}" / "attempt-0" / "command.txt").read_text()
    assert info["JobState"] == "FAILED" and info["Restarts"] == "0" and info["ExitCode"] != "0:0", (info, log)
    assert re.search(r"training exited with status [1-9]", log) and "requeueing" not in log, log
    assert not (work / "logs" / f"solopo-train-{job_id}" / "attempt-0" / "trainer-exit-status").exists()
