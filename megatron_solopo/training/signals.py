"""What passes between a run and its job scheduler: SIGTERM and the stop file in, the exit status out.

A run stops early, with a complete checkpoint, when the file named by $SOLOPO_STOP_FILE appears (the
SLURM scripts create it shortly before the time limit; it is removed once honoured) or the process
gets SIGTERM (within train.sigterm_grace_s). `solopo train` then exits with EXIT_RESUMABLE (75), and
rank 0 writes that status to $SOLOPO_EXIT_STATUS_FILE: torchrun turns a worker's 75 into its own 1,
so the job script reads the file to tell a resumable stop (requeue) from a failure.
"""

from __future__ import annotations

import os
import pathlib
import signal
import sys
import threading
from typing import TYPE_CHECKING

import torch
import torch.distributed as dist

from megatron_solopo.training.logging import peak_memory_gib

if TYPE_CHECKING:
    from megatron_solopo.training.summary import RunSummary

__all__ = ["EXIT_RESUMABLE", "EXIT_STATUS_FILE_ENV", "STOP_FILE_ENV", "TermSignal", "poll_stop_requests",
           "record_exit_status", "remove_stop_file"]

EXIT_RESUMABLE = 75
"""Exit status of `solopo train` when it stopped early with a checkpoint (run it again to continue)."""
STOP_FILE_ENV = "SOLOPO_STOP_FILE"
"""Environment variable naming a file whose appearance asks the run to save and stop at the next step."""
EXIT_STATUS_FILE_ENV = "SOLOPO_EXIT_STATUS_FILE"
"""Environment variable naming a file where rank 0 records the run's exit status (first line: 0 or
EXIT_RESUMABLE) once training returned: a launcher such as torchrun reports any non-zero worker status as
its own 1, so the SLURM scripts read this file to tell a resumable stop (requeue) from a failure."""


class TermSignal:
    """SIGTERM (what SLURM and Kubernetes send before a kill) asks the run to save at the next step boundary,
    like the stop file. If the process has not finished `grace_s` seconds after the signal, it terminates
    its own child processes (dist_checkpointing's multiprocessing manager) and exits with 128 + SIGTERM
    without a new checkpoint, so nothing of it outlives the grace period. Installed only in the main thread."""

    def __init__(self, grace_s: float):
        self.grace_s, self.received, self._previous = grace_s, False, None

    def __enter__(self) -> TermSignal:
        if threading.current_thread() is threading.main_thread():
            self._previous = signal.signal(signal.SIGTERM, self._handle)
        return self

    def __exit__(self, *exc) -> None:
        if self._previous is not None:
            signal.signal(signal.SIGTERM, self._previous)

    def _handle(self, signum, frame) -> None:
        if self.received:
            return
        self.received = True
        print(f"SIGTERM received: saving a checkpoint at the end of this step (train.sigterm_grace_s = "
              f"{self.grace_s:g} s)", file=sys.stderr, flush=True)
        timer = threading.Timer(self.grace_s, self._expire)
        timer.daemon = True
        timer.start()

    @staticmethod
    def _expire() -> None:
        import multiprocessing

        print("SIGTERM grace period (train.sigterm_grace_s) over before the checkpoint was saved; exiting without "
              "one", file=sys.stderr, flush=True)
        for child in multiprocessing.active_children():
            child.terminate()
        os._exit(128 + signal.SIGTERM)


def poll_stop_requests(term: TermSignal | None = None) -> tuple[bool, bool, float]:
    """(the stop file exists on any rank, SIGTERM reached any rank, peak memory over all ranks in GiB): one
    small all-reduce per step, which the peak memory rides along with."""
    stop_file = os.environ.get(STOP_FILE_ENV)
    requested = bool(stop_file) and os.path.exists(stop_file)
    signalled = term is not None and term.received
    flags = torch.tensor([float(requested), float(signalled), peak_memory_gib()],
                         device="cuda" if torch.cuda.is_available() else "cpu")
    dist.all_reduce(flags, op=dist.ReduceOp.MAX)
    return bool(flags[0].item()), bool(flags[1].item()), float(flags[2].item())


def remove_stop_file() -> None:
    """The stop file has been honoured (checkpoint saved): remove it so the requeued job runs on."""
    stop_file = os.environ.get(STOP_FILE_ENV)
    if stop_file and dist.get_rank() == 0:
        try:
            os.remove(stop_file)
        except FileNotFoundError:
            pass
        except OSError as err:
            print(f"warning: could not remove the stop file {stop_file}: {err}", file=sys.stderr)


def record_exit_status(summary: RunSummary) -> None:
    """Writes summary.exit_code (and what it means) to $SOLOPO_EXIT_STATUS_FILE, if set; rank 0 only, after the
    final checkpoint. Written under a temporary name and renamed, so a reader never sees half a file."""
    path = os.environ.get(EXIT_STATUS_FILE_ENV)
    if not path:
        return
    target = pathlib.Path(path)
    tmp = target.with_name(target.name + ".tmp")
    try:
        target.parent.mkdir(parents=True, exist_ok=True)
        tmp.write_text(f"{summary.exit_code}\n{summary.stop_reason} at step {summary.final_step}/{summary.total_steps}"
                       f"; checkpoint {summary.checkpoint}\n", encoding="utf-8")
        os.replace(tmp, target)
    except OSError as err:
        print(f"warning: could not write the exit status file {path}: {err}", file=sys.stderr)
