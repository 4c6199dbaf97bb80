"""Process-group sessions for commands (convert, eval, reference, train): join an existing layout or set up
a single process, and the rank-0 / barrier helpers every command uses."""

from __future__ import annotations

import contextlib
from collections.abc import Callable, Iterator

import torch.distributed as dist

from megatron_solopo.console import USER_ERRORS
from megatron_solopo.launch_env import read_launch_env
from megatron_solopo.parallel.config import ParallelConfig
from megatron_solopo.parallel.parallel_context import (
    ParallelContext,
    _megatron_initialized,
    _set_current,
    as_parallel_context,
    current_parallel_context,
)
from megatron_solopo.parallel.distributed import destroy_parallel, initialize_parallel


def ensure_parallel(parallel: ParallelConfig, backend: str | None = None) -> ParallelContext:
    """Makes the process groups match `parallel`; returns this rank's `ParallelContext`.

    No process group yet: one is created from the torchrun/SLURM environment, or a single gloo/nccl
    process without a launcher. A group that exists with another TP/PP/CP layout is an error (we do
    not silently re-initialize groups a caller may be using).
    """
    return _ensure_parallel(parallel, backend)[0]


def _ensure_parallel(parallel: ParallelConfig, backend: str | None) -> tuple[ParallelContext, bool]:
    """(context, whether this call created the process group: the caller then owns its teardown)."""
    if not dist.is_initialized():
        world = _launch_world_size()
        if world % parallel.model_parallel_size:
            raise ValueError(
                f"tp*pp*cp = {parallel.model_parallel_size} does not divide the {world} process(es) of this "
                f"run; launch with `torchrun --nproc-per-node {parallel.model_parallel_size} ...` (a "
                "Megatron distributed checkpoint reshards on load, so converting at tp=pp=1 is enough)")
        return initialize_parallel(parallel, backend=backend), True
    current = current_parallel_context(required=False)
    if current is None and not _megatron_initialized():
        return initialize_parallel(parallel, backend=backend), False
    layout = ((current.tp_size, current.pp_size, current.cp_size) if current is not None
              else _megatron_layout())
    if layout != (parallel.tp, parallel.pp, parallel.cp):
        raise ValueError(f"Megatron's parallel state is initialized with (tp, pp, cp) = {layout}, but the "
                         f"conversion asked for {(parallel.tp, parallel.pp, parallel.cp)}; pass the "
                         "ParallelConfig the process group was initialized with")
    if current is None:  # Megatron's groups were set up outside initialize_parallel: adopt them
        current = ParallelContext.from_megatron(parallel)
        _set_current(current)
        return current, False
    return as_parallel_context(parallel), False


def _megatron_layout() -> tuple[int, int, int]:
    from megatron.core import parallel_state as ps

    return (ps.get_tensor_model_parallel_world_size(), ps.get_pipeline_model_parallel_world_size(),
            ps.get_context_parallel_world_size())


def _launch_world_size() -> int:
    return read_launch_env().world_size


@contextlib.contextmanager
def parallel_session(parallel: ParallelConfig, backend: str | None = None) -> Iterator[ParallelContext]:
    """`ensure_parallel` for the duration of a command (yields the context); tears down only what it created."""
    context, created = _ensure_parallel(parallel, backend)
    try:
        yield context
    finally:
        if created:
            destroy_parallel()


def is_rank0() -> bool:
    """True on global rank 0, and in a process without torch.distributed."""
    return not dist.is_initialized() or dist.get_rank() == 0


def barrier() -> None:
    """dist.barrier() when torch.distributed is up, else nothing."""
    if dist.is_initialized():
        dist.barrier()


def check_on_rank0(check: Callable[[], None]) -> None:
    """Runs `check` on rank 0 and raises its error on every rank, so that all ranks stop together
    instead of the others waiting forever in the next collective."""
    error = None
    if is_rank0():
        try:
            check()
        except USER_ERRORS as err:
            error = err
    if dist.is_initialized() and dist.get_world_size() > 1:
        box = [error]
        dist.broadcast_object_list(box, src=0)
        error = box[0]
    if error is not None:
        raise error
