"""Where this process sits in the job (rank, world size, master address), read from torchrun or SLURM variables.

A foundation module: it imports nothing of the project and no torch, so error reporting (console) and
process-group setup (parallel.distributed) can both read the launcher's rank.
"""

from __future__ import annotations

import dataclasses
import os
import socket
import subprocess

__all__ = ["LaunchEnv", "read_launch_env"]


@dataclasses.dataclass(frozen=True)
class LaunchEnv:
    """Where this process sits in the job, read from torchrun or SLURM variables."""

    rank: int
    world_size: int
    local_rank: int
    master_addr: str
    master_port: int


def _slurm_master_addr() -> str:
    nodelist = os.environ.get("SLURM_JOB_NODELIST") or os.environ.get("SLURM_NODELIST")
    if not nodelist:
        return "127.0.0.1"
    try:
        hosts = subprocess.run(["scontrol", "show", "hostnames", nodelist], check=True,
                               capture_output=True, text=True).stdout.split()
        return hosts[0]
    except (OSError, subprocess.CalledProcessError, IndexError):
        return nodelist.split(",")[0].split("[")[0]


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def read_launch_env(environ: dict[str, str] | None = None) -> LaunchEnv:
    """Rank/world/master from torchrun (RANK, WORLD_SIZE, ...), else SLURM (srun), else one process."""
    env = os.environ if environ is None else environ
    if "RANK" in env and "WORLD_SIZE" in env:
        return LaunchEnv(int(env["RANK"]), int(env["WORLD_SIZE"]), int(env.get("LOCAL_RANK", 0)),
                         env.get("MASTER_ADDR", "127.0.0.1"), int(env.get("MASTER_PORT", 29500)))
    if "SLURM_PROCID" in env and int(env.get("SLURM_NTASKS", "1")) > 1:
        return LaunchEnv(int(env["SLURM_PROCID"]), int(env["SLURM_NTASKS"]), int(env.get("SLURM_LOCALID", 0)),
                         env.get("MASTER_ADDR") or _slurm_master_addr(), int(env.get("MASTER_PORT", 29500)))
    return LaunchEnv(0, 1, 0, "127.0.0.1", _free_port())
