"""Process-group setup: torch.distributed (nccl on GPU, gloo on CPU) and Megatron's parallel state."""

from __future__ import annotations

import datetime
import os

import torch
import torch.distributed as dist

from megatron_solopo.launch_env import LaunchEnv, read_launch_env
from megatron_solopo.parallel.config import ParallelConfig
from megatron_solopo.parallel.parallel_context import ParallelContext, _set_current
from megatron_solopo.parallel.device import cuda_in_use
from megatron_solopo.parallel.shim import install_cpu_shim


def default_backend() -> str:
    """nccl when this process computes on CUDA (`cuda_in_use`: visible and not SOLOPO_DEVICE=cpu), else gloo."""
    return "nccl" if cuda_in_use() else "gloo"


def init_process_group(launch: LaunchEnv | None = None, backend: str | None = None,
                       timeout_minutes: int = 30) -> LaunchEnv:
    """Initializes torch.distributed once (no-op when it is already up); returns this process's place."""
    if dist.is_initialized():
        return LaunchEnv(dist.get_rank(), dist.get_world_size(), int(os.environ.get("LOCAL_RANK", 0)),
                         os.environ.get("MASTER_ADDR", ""), int(os.environ.get("MASTER_PORT", 0)))
    launch = launch or read_launch_env()
    backend = backend or default_backend()
    if backend == "nccl":
        torch.cuda.set_device(launch.local_rank % torch.cuda.device_count())
    else:
        install_cpu_shim()
    dist.init_process_group(backend=backend, init_method=f"tcp://{launch.master_addr}:{launch.master_port}",
                            rank=launch.rank, world_size=launch.world_size,
                            timeout=datetime.timedelta(minutes=timeout_minutes))
    return launch


def megatron_gloo_groups_wanted() -> bool:
    """Whether Megatron creates (and its optimizer uses) its gloo side groups: only beside NCCL. With gloo
    they would duplicate the main groups, and on the dry run's fake store (backend "fake", plan/) creating
    them segfaults."""
    return dist.get_backend() not in ("gloo", "fake")


def initialize_parallel(parallel: ParallelConfig | None = None, seed: int = 1234,
                        launch: LaunchEnv | None = None, backend: str | None = None) -> ParallelContext:
    """Brings up torch.distributed and Megatron's TP/PP/CP/DP groups for `parallel`, seeds the RNGs.

    Re-initializes Megatron's groups when they exist (another layout, or the same). Returns this
    rank's `ParallelContext` (sizes, ranks, groups): pass it to collation, the step, the reference
    pass and the model builder. It is also `current_parallel_context()` until the next call.
    """
    from megatron.core import parallel_state
    from megatron.core.tensor_parallel import model_parallel_cuda_manual_seed

    parallel = parallel or ParallelConfig()
    launch = init_process_group(launch, backend)
    parallel.dp_size(dist.get_world_size())  # raises with the sizes when they do not divide the world
    _set_current(None)
    if parallel_state.model_parallel_is_initialized():
        parallel_state.destroy_model_parallel()
    parallel_state.initialize_model_parallel(
        tensor_model_parallel_size=parallel.tp,
        pipeline_model_parallel_size=parallel.pp,
        virtual_pipeline_model_parallel_size=parallel.virtual_pp,
        context_parallel_size=parallel.cp,
        create_gloo_process_groups=megatron_gloo_groups_wanted(),
    )
    torch.manual_seed(seed)
    model_parallel_cuda_manual_seed(seed)
    context = ParallelContext.from_megatron(parallel)
    _set_current(context)
    return context


def release_global_memory_buffer() -> int:
    """Empties Megatron's global memory buffer (megatron.core.utils.GlobalMemoryBuffer); returns the bytes freed.

    Megatron's local attention (and sequence-parallel all-gathers) keep scratch tensors there for the
    life of the process, sized by the largest request so far: a benchmark variant run after another
    would inherit them in its peak memory and its maximum length. The buffer object stays (Megatron
    asserts it exists), only its tensors go; they are re-allocated on the next request.
    """
    from megatron.core import parallel_state

    buffer = getattr(parallel_state, "_GLOBAL_MEMORY_BUFFER", None)
    if buffer is None or not getattr(buffer, "buffer", None):
        return 0
    freed = sum(t.numel() * t.element_size() for t in buffer.buffer.values() if t is not None)
    buffer.buffer.clear()
    return freed


def destroy_parallel() -> None:
    """Tears down Megatron's groups and torch.distributed (the end of a run).

    To change the layout inside one process, call `initialize_parallel` again instead: it rebuilds
    Megatron's groups on the existing torch.distributed group. A multi-process gloo group re-created
    after this call on the same MASTER_PORT has been seen to hang in init_process_group.
    """
    from megatron.core import parallel_state

    _set_current(None)
    if parallel_state.model_parallel_is_initialized():
        parallel_state.destroy_model_parallel()
    if dist.is_initialized():
        dist.destroy_process_group()
