"""Resumable pipelines of `solopo` commands: each stage runs as its own process and leaves a marker.

A stage is one `solopo ...` command line (a fresh process, its own torch.distributed group and
progress bars, exactly what a user would type). When it exits with 0 the runner writes
`<run_dir>/stages/<name>.json` (command, seconds, finish time); a later run skips every stage with a
marker, so a killed experiment continues with the stage it was in. The commands themselves resume
inside a stage where they can (`solopo train` with train.resume=auto, build-data's sampling cache).

SIGTERM or SIGHUP to the runner is forwarded (as SIGTERM) to the running stage, and the runner waits
for it: `solopo train` saves a checkpoint and exits, so nothing of the experiment outlives it and an
immediate rerun finds no run lock held. SIGINT (Ctrl-C reaches the whole process group) is left to
the stage, and forwarded as SIGTERM only if the stage still runs `SIGINT_GRACE_S` later (a SIGINT sent
to the runner alone). The runner then exits with the stage's status if it was 75 (resumable), else
128 + the signal's number.
"""

from __future__ import annotations

import dataclasses
import datetime
import json
import os
import pathlib
import shlex
import signal
import subprocess
import sys
import threading
import time
from collections.abc import Callable
from megatron_solopo.training.run_state import find_latest_checkpoint

__all__ = ["Stage", "StageRunner", "solopo_argv", "latest_checkpoint"]

# Megatron-Core and transformers warn about optional kernels at every import; a pipeline's output is
# its stages' progress, so those warnings are muted in the stage processes (not in `solopo` itself)
_QUIET_WARNINGS = "ignore::UserWarning,ignore::FutureWarning,ignore::DeprecationWarning"


FORWARDED_SIGNALS = (signal.SIGTERM, signal.SIGHUP, signal.SIGINT)
SIGINT_GRACE_S = 2.0
"""How long a stage has to react to a SIGINT of its own (Ctrl-C) before the runner forwards SIGTERM."""
EXIT_RESUMABLE = 75
"""A stage that stopped early with a checkpoint (`solopo train`): the runner keeps that status."""


def run_forwarding_signals(argv: list[str], env: dict[str, str] | None = None) -> tuple[int, int | None]:
    """Runs `argv` to completion, forwarding FORWARDED_SIGNALS to it (see the module docstring); returns
    (its exit status, the first signal this process received or None). Handlers are installed only in the
    main thread and restored afterwards."""
    child = subprocess.Popen(argv, env=env)
    received: list[tuple[int, float]] = []
    forwarded = False

    def forward(signum, frame) -> None:
        nonlocal forwarded
        received.append((signum, time.monotonic()))
        if signum != signal.SIGINT and child.poll() is None:
            forwarded = True
            child.send_signal(signal.SIGTERM)

    previous = {}
    if threading.current_thread() is threading.main_thread():
        previous = {sig: signal.signal(sig, forward) for sig in FORWARDED_SIGNALS}
    try:
        while True:
            try:
                return child.wait(timeout=0.2), (received[0][0] if received else None)
            except subprocess.TimeoutExpired:
                pass
            sigint_at = next((at for sig, at in received if sig == signal.SIGINT), None)
            if not forwarded and sigint_at is not None and time.monotonic() - sigint_at > SIGINT_GRACE_S:
                forwarded = True
                child.send_signal(signal.SIGTERM)
    finally:
        for sig, handler in previous.items():
            signal.signal(sig, handler)


def solopo_argv(*args: str) -> list[str]:
    """The command line of `solopo <args>` with this interpreter (works without the console script)."""
    return [sys.executable, "-m", "megatron_solopo.cli", *args]


def latest_checkpoint(train_dir: str | os.PathLike, command: str = "solopo") -> str:
    """The newest complete checkpoint a `solopo train` stage wrote under `train_dir` (SystemExit if none)."""
    latest = find_latest_checkpoint(pathlib.Path(train_dir))
    if latest is None:
        raise SystemExit(f"{command}: training wrote no complete checkpoint under {train_dir}")
    return str(latest)


@dataclasses.dataclass
class Stage:
    """One pipeline stage: a command line, or a function that builds it once earlier stages ran."""

    name: str
    """Unique within the pipeline; names the marker file (letters, digits, '-', '_')."""
    title: str
    """What the stage does, printed before it runs."""
    argv: list[str] | Callable[[], list[str]]

    def command(self) -> list[str]:
        return self.argv() if callable(self.argv) else list(self.argv)


class StageRunner:
    """Runs stages in order, skipping those whose marker exists under `run_dir/stages/`."""

    def __init__(self, run_dir: str | os.PathLike, quiet_warnings: bool = True, log=print):
        self.run_dir = pathlib.Path(run_dir)
        self.marker_dir = self.run_dir / "stages"
        self.quiet_warnings = quiet_warnings
        self.log = log

    def marker(self, name: str) -> pathlib.Path:
        return self.marker_dir / f"{name}.json"

    def done(self, name: str) -> dict | None:
        """The marker of a finished stage, or None."""
        path = self.marker(name)
        return json.loads(path.read_text(encoding="utf-8")) if path.is_file() else None

    def run(self, stages: list[Stage]) -> dict[str, float]:
        """Runs every unfinished stage; returns {stage name: seconds} over all stages (finished earlier
        included). A failing stage stops the pipeline with SystemExit naming it and its command."""
        names = [stage.name for stage in stages]
        if len(set(names)) != len(names):
            raise ValueError(f"stage names must be unique, got {names}")
        self.marker_dir.mkdir(parents=True, exist_ok=True)
        seconds: dict[str, float] = {}
        for index, stage in enumerate(stages, 1):
            finished = self.done(stage.name)
            if finished is not None:
                self.log(f"[{index}/{len(stages)}] {stage.title}: done earlier ({finished['seconds']:.0f} s), skipped")
                seconds[stage.name] = finished["seconds"]
                continue
            seconds[stage.name] = self._run_one(index, len(stages), stage)
        return seconds

    def _run_one(self, index: int, total: int, stage: Stage) -> float:
        argv = stage.command()
        shown = shlex.join(["solopo", *argv[3:]] if argv[1:3] == ["-m", "megatron_solopo.cli"] else argv)
        self.log(f"\n[{index}/{total}] {stage.title}\n$ {shown}")
        env = dict(os.environ)
        if self.quiet_warnings:
            env["PYTHONWARNINGS"] = _QUIET_WARNINGS
        start = time.perf_counter()
        returncode, signum = run_forwarding_signals(argv, env)
        elapsed = round(time.perf_counter() - start, 1)
        if signum is not None:
            name = signal.Signals(signum).name
            print(f"stage {stage.name!r} ({stage.title}) stopped on {name} (exit code {returncode}); run the same "
                  "command again to continue: finished stages are skipped", file=sys.stderr, flush=True)
            raise SystemExit(returncode if returncode == EXIT_RESUMABLE else 128 + signum)
        if returncode != 0:
            raise SystemExit(f"stage {stage.name!r} ({stage.title}) failed with exit code {returncode}; its "
                             f"output is above. Fix the cause and run the same command again: finished stages are "
                             f"skipped. The failing command: {shown}")
        record = {"name": stage.name, "title": stage.title, "command": shown, "seconds": elapsed,
                  "finished_utc": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds")}
        tmp = self.marker(stage.name).with_suffix(".json.tmp")
        tmp.write_text(json.dumps(record, indent=2) + "\n", encoding="utf-8")
        os.replace(tmp, self.marker(stage.name))
        self.log(f"[{index}/{total}] done in {elapsed:.0f} s")
        return elapsed
