"""`die_with_parent`: run in a helper process so that it ends when the process that started it ends.

Kept in its own module without heavy imports: it is the initializer of a spawned process (the
dist_checkpointing writer's multiprocessing Manager, training/run_state.py), which imports the
module that defines it.
"""

from __future__ import annotations

import os
import signal


def die_with_parent() -> None:
    """Asks Linux to send this process SIGTERM when its parent dies (prctl PR_SET_PDEATHSIG), so a
    SIGKILL-ed trainer leaves no orphan; exits at once if the parent is already gone."""
    import ctypes

    parent = os.getppid()
    try:
        ctypes.CDLL("libc.so.6", use_errno=True).prctl(1, signal.SIGTERM)  # 1 = PR_SET_PDEATHSIG
    except (OSError, AttributeError):  # not Linux/glibc: the helper still ends with a normal exit
        return
    if os.getppid() != parent:  # the parent died before prctl took effect
        os._exit(0)
