"""The run lock: output_dir/.solopo_train.lock holds {"host", "pid"} of the rank 0 training there.

Two runs writing checkpoints into one directory would corrupt each other's `latest` and rotation; the
second one refuses to start instead. A lock whose process is gone (same host) is taken over.
"""

from __future__ import annotations

import json
import os
import pathlib
import sys

from megatron_solopo.training.run_state import CheckpointError

__all__ = ["LOCK_FILE", "acquire_run_lock"]

LOCK_FILE = ".solopo_train.lock"
"""In output_dir while a run trains there: {"host", "pid"} of its rank 0 (a second run refuses to start)."""


def _pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # alive, owned by another user
        return True
    return True


def _lock_owner(lock: pathlib.Path) -> tuple[str, int]:
    """(host, pid) recorded in the lock file; ("?", -1) when it cannot be read (half written, damaged)."""
    try:
        owner = json.loads(lock.read_text(encoding="utf-8"))
        return str(owner["host"]), int(owner["pid"])
    except (OSError, ValueError, KeyError, TypeError):
        return "?", -1


def acquire_run_lock(output_dir: pathlib.Path) -> pathlib.Path:
    """Creates output_dir/.solopo_train.lock for this process; CheckpointError when a live run holds it.

    A lock left by a dead process on this host is taken over with a warning; a lock of another host is
    never taken over (the message says how to remove it once that job is gone).
    """
    import socket

    lock = output_dir / LOCK_FILE
    me = {"host": socket.gethostname(), "pid": os.getpid()}
    for _ in range(2):  # a second try after removing a stale lock
        try:
            fd = os.open(lock, os.O_CREAT | os.O_EXCL | os.O_WRONLY, 0o644)
        except FileExistsError:
            host, pid = _lock_owner(lock)
            if host == me["host"] and (pid == me["pid"] or not _pid_alive(pid)):
                if pid != me["pid"]:
                    print(f"warning: taking over {lock}: its owner (pid {pid} on {host}) is no longer running",
                          file=sys.stderr)
                lock.unlink(missing_ok=True)
                continue
            raise CheckpointError(
                f"{output_dir} is in use by another training run (pid {pid} on host {host}, lock file {lock}); "
                "wait for it to finish or use another train.output_dir (delete the lock file only if that run "
                "is gone)") from None
        with os.fdopen(fd, "w", encoding="utf-8") as f:
            json.dump(me, f)
        return lock
    raise CheckpointError(f"could not create the lock file {lock}; another run keeps recreating it")
