"""Parallel layout, process groups, context-parallel sharding and the CPU shim for Megatron-Core."""

from megatron_solopo.launch_env import read_launch_env  # re-exported: parallel.read_launch_env is public
from megatron_solopo.parallel.config import ParallelConfig
from megatron_solopo.parallel.parallel_context import (
    ParallelContext,
    as_parallel_context,
    current_parallel_context,
    fp8_seq_multiple,
    seq_len_divisor,
)
from megatron_solopo.parallel.cp import (
    cp_all_reduce_sum,
    cp_gather,
    cp_shard,
    cp_shard_thd,
    cp_unshard,
    cp_unshard_thd,
)
from megatron_solopo.parallel.device import compute_device, cuda_in_use, request_device, requested_device
from megatron_solopo.parallel.distributed import (
    destroy_parallel,
    initialize_parallel,
    init_process_group,
    release_global_memory_buffer,
)
from megatron_solopo.parallel.session import barrier, check_on_rank0, ensure_parallel, is_rank0, parallel_session
from megatron_solopo.parallel.shim import install_cpu_shim, shim_active

__all__ = [
    "ParallelConfig", "ParallelContext", "current_parallel_context", "as_parallel_context", "fp8_seq_multiple",
    "seq_len_divisor", "initialize_parallel", "destroy_parallel", "init_process_group", "read_launch_env",
    "release_global_memory_buffer",
    "install_cpu_shim", "shim_active", "cuda_in_use", "compute_device", "request_device", "requested_device",
    "parallel_session", "ensure_parallel", "is_rank0", "barrier", "check_on_rank0",
    "cp_shard", "cp_unshard", "cp_shard_thd", "cp_unshard_thd", "cp_gather", "cp_all_reduce_sum",
]
