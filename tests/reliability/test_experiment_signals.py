"""`solopo experiment` / `solopo demo` run their stages as child processes (experiment/stages.py): a signal to
the runner reaches the running stage, and the runner waits for it (issue 26). A stage here is a small Python
process that behaves like `solopo train` on SIGTERM (records it, exits 75), so the test takes about a second.
"""

from __future__ import annotations

import os
import pathlib
import signal
import subprocess
import sys
import textwrap
import time

import pytest

REPO = pathlib.Path(__file__).resolve().parents[2]

_STAGE = textwrap.dedent('''
    import os, pathlib, signal, sys, time
    out = pathlib.Path(sys.argv[1])
    def stop(signum, frame):
        out.write_text(f"{os.getpid()} {signal.Signals(signum).name}")
        sys.exit(75)
    signal.signal(signal.SIGTERM, stop)
    signal.signal(signal.SIGINT, signal.SIG_IGN)  # a stage that ignores Ctrl-C: the runner must still stop it
    out.with_suffix(".pid").write_text(str(os.getpid()))
    while True:
        time.sleep(0.05)
''')

_RUNNER = textwrap.dedent('''
    import sys
    from megatron_solopo.experiment.stages import Stage, StageRunner
    stage = Stage("train-x", "a stage like solopo train", [sys.executable, "-c", sys.argv[1], sys.argv[2]])
    StageRunner(sys.argv[3], log=lambda m: None).run([stage])
''')


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    return not pathlib.Path(f"/proc/{pid}/stat").read_text().split()[2] == "Z"


@pytest.mark.parametrize("sent", [signal.SIGTERM, signal.SIGINT])
def test_a_signal_to_the_runner_reaches_the_stage_and_the_runner_waits(tmp_path, sent):
    record = tmp_path / "stage.txt"
    env = {**os.environ, "PYTHONPATH": str(REPO)}
    runner = subprocess.Popen([sys.executable, "-c", _RUNNER, _STAGE, str(record), str(tmp_path / "run")], env=env,
                              stderr=subprocess.PIPE, text=True)
    deadline = time.monotonic() + 60
    while not record.with_suffix(".pid").exists():
        assert time.monotonic() < deadline and runner.poll() is None, runner.stderr.read()
        time.sleep(0.05)
    stage_pid = int(record.with_suffix(".pid").read_text())
    runner.send_signal(sent)  # to the runner only, not to its process group
    code = runner.wait(timeout=30)
    stderr = runner.stderr.read()
    assert record.read_text() == f"{stage_pid} SIGTERM", stderr  # the stage got SIGTERM, once
    assert not _alive(stage_pid), "the stage outlived the runner"
    assert code == 75, stderr  # the stage's "resumable" status is kept
    assert "Traceback" not in stderr and f"stopped on {signal.Signals(sent).name}" in stderr, stderr
    assert not (tmp_path / "run" / "stages" / "train-x.json").exists()  # not marked finished: a rerun continues it
