"""The one documented compatibility shim that lets Megatron-Core run on CPU with gloo.

Megatron-Core 0.19 assumes CUDA in a few kinds of places (../shared/MEGATRON_NOTES.md):
`torch.cuda.current_device()` used as a device, literal `device="cuda"` allocations and `.cuda()`
calls (schedules, DDP buffers, optimizer, timers, rotary embeddings), the CUDA RNG get/set/seed used
by its RNG tracker, and CUDA streams/events/synchronize in DDP and checkpointing. On a machine without
CUDA, `install_cpu_shim()` redirects exactly these to the CPU:

1. a `TorchFunctionMode` that rewrites any CUDA device ('cuda', 'cuda:N', an int index) given to a
   torch factory function, `Tensor.to` or `Tensor.cuda` into 'cpu', and drops `pin_memory=True` /
   `Tensor.pin_memory()` (pinned host memory needs a driver; e.g. RoPE's CP index in rope_utils.py);
2. `torch.cuda.current_device` returns 0 (an index that rule 1 then maps to the CPU);
3. the CUDA RNG functions act on the CPU default generator (so Megatron's RNG tracker forks the
   generator that CPU dropout and initialization actually use);
4. streams, events, synchronize and memory statistics become no-ops;
5. backward passes run with the mode of rule 1 active (torch.autograd's engine entry point is wrapped:
   a mode's handler runs `Tensor.backward` with the mode popped, which would leave Megatron's backward
   code, e.g. sequence-parallel buffers, allocating on 'cuda');
6. Megatron's batched pipeline p2p (activations, gradients and their shapes) is issued as two batches,
   one per direction of data flow, because gloo pairs the messages between two ranks in FIFO order
   and mismatches a mixed-direction batch when the previous and next stage are the same rank (pp=2);
7. `Tensor.type()` reports a CPU float tensor as 'torch.cuda.FloatTensor' (Megatron's grad clipping
   asserts that string, its optimizers select fp32 params by it), and `Tensor.type('torch.cuda.X')`
   converts to the CPU type X.

The same Megatron code paths that run on GPU therefore run in the CPU tests. When CUDA is in use
(`parallel.device.cuda_in_use`: a GPU is visible and SOLOPO_DEVICE is not cpu) the shim does nothing
at all; on a GPU host with the CPU requested it installs as without CUDA. It is idempotent and
process-wide (call it before building models).
"""

from __future__ import annotations

import contextlib
import threading

import torch
from torch.overrides import TorchFunctionMode
from megatron_solopo.parallel.device import cuda_in_use

_installed = False
_lock = threading.Lock()


def _is_cuda_device(device) -> bool:
    if isinstance(device, torch.device):
        return device.type == "cuda"
    if isinstance(device, str):
        return device.startswith("cuda")
    return isinstance(device, int) and not isinstance(device, bool)


def _tensor_type(tensor: torch.Tensor, dtype=None, *args, **kwargs):
    """`Tensor.type()` as Megatron expects it on a GPU: the legacy type name of a CUDA tensor.

    Megatron asserts `param.grad.type() == 'torch.cuda.FloatTensor'` (grad clipping) and selects
    fp32 params by the same string (Float16/distributed optimizers). Without an argument this returns
    the CUDA name of the CPU tensor's type; a CUDA type name as the argument converts on the CPU.
    """
    if dtype is None and not args and not kwargs:
        name = torch.Tensor.type(tensor)
        return name if tensor.device.type != "cpu" or ".cuda." in name else name.replace("torch.", "torch.cuda.", 1)
    if isinstance(dtype, str) and dtype.startswith("torch.cuda."):
        dtype = dtype.replace("torch.cuda.", "torch.", 1)
    return torch.Tensor.type(tensor, dtype, *args, **kwargs)


class _CudaToCpuMode(TorchFunctionMode):
    """Rewrites CUDA device arguments to the CPU for every torch function call."""

    def __torch_function__(self, func, types, args=(), kwargs=None):
        kwargs = dict(kwargs or {})
        if _is_cuda_device(kwargs.get("device")):
            kwargs["device"] = "cpu"
        if kwargs.get("pin_memory"):  # page-locked host memory needs a CUDA driver
            kwargs["pin_memory"] = False
        if func is torch.Tensor.cuda or func is torch.Tensor.pin_memory:
            return args[0]
        if func is torch.Tensor.to and len(args) > 1 and _is_cuda_device(args[1]):
            args = (args[0], "cpu", *args[2:])
        if func is torch.Tensor.type:  # (the mode is off inside this handler: no recursion)
            return _tensor_type(*args, **kwargs)
        return func(*args, **kwargs)


class _NullStream:
    """Stands in for torch.cuda.Stream / Event on the CPU: every operation is already synchronous."""

    def __init__(self, *args, **kwargs):
        pass

    def __getattr__(self, name):
        return lambda *args, **kwargs: None

    def query(self) -> bool:
        return True

    def elapsed_time(self, other) -> float:
        return 0.0

    def record_event(self, event=None):
        return event or _NullStream()


def _mode_active() -> bool:
    from torch.overrides import _get_current_function_mode_stack

    return any(isinstance(mode, _CudaToCpuMode) for mode in _get_current_function_mode_stack())


def _patch_autograd_engine() -> None:
    """Runs every backward pass with the redirection mode active.

    `Tensor.backward` and `torch.autograd.backward/grad` are torch functions: when the mode is active
    they are dispatched to its handler, which runs them with the mode popped (as every
    TorchFunctionMode does), so Megatron's backward code (sequence-parallel reduce-scatter buffers,
    recomputation) would allocate on 'cuda' again. torch.autograd calls the engine through the
    module-level name `_engine_run_backward`; wrapping it re-enters the mode for the engine's run.
    """
    from torch import autograd

    engine_run_backward = autograd._engine_run_backward

    def run_backward_on_cpu(*args, **kwargs):
        if _mode_active():
            return engine_run_backward(*args, **kwargs)
        with _CudaToCpuMode():
            return engine_run_backward(*args, **kwargs)

    autograd._engine_run_backward = run_backward_on_cpu


def _patch_megatron_p2p() -> None:
    """Pipeline p2p over gloo: one batch per direction of data flow.

    Megatron batches [send_prev, recv_prev, send_next, recv_next] into one `batch_isend_irecv`. NCCL
    pairs such a batch's messages correctly, gloo pairs the messages between two ranks first-in
    first-out. With two pipeline ranks the previous and next rank are the same process, so a rank's
    send_prev (a gradient) meets its peer's recv_prev (an activation) whenever both directions move
    in one call: silently wrong activations when the shapes agree (interleaved pipeline, pp=2), a
    size error otherwise. Splitting every batch into its forward-flow half (send_next, recv_prev) and
    then its backward-flow half (send_prev, recv_next), on every rank, makes FIFO order match.
    """
    from megatron.core.pipeline_parallel import p2p_communication as p2p

    batched = p2p._batched_p2p_ops

    def batched_by_direction(*, tensor_send_prev, tensor_recv_prev, tensor_send_next, tensor_recv_next, **kwargs):
        forward_flow = batched(tensor_send_prev=None, tensor_recv_prev=tensor_recv_prev,
                               tensor_send_next=tensor_send_next, tensor_recv_next=None, **kwargs)
        backward_flow = batched(tensor_send_prev=tensor_send_prev, tensor_recv_prev=None,
                                tensor_send_next=None, tensor_recv_next=tensor_recv_next, **kwargs)
        return list(forward_flow) + list(backward_flow)

    communicate_shapes = p2p.P2PCommunicator._communicate_shapes

    def shapes_by_direction(self, tensor_send_next, tensor_send_prev, recv_prev, recv_next):
        recv_prev_shape, _ = communicate_shapes(self, tensor_send_next, None, recv_prev, False)
        _, recv_next_shape = communicate_shapes(self, None, tensor_send_prev, False, recv_next)
        return recv_prev_shape, recv_next_shape

    p2p._batched_p2p_ops = batched_by_direction
    p2p.P2PCommunicator._communicate_shapes = shapes_by_direction


def _cpu_rng_functions():
    def get_rng_state(device="cuda"):
        return torch.get_rng_state()

    def set_rng_state(new_state, device="cuda"):
        torch.set_rng_state(new_state)

    def manual_seed(seed):
        # torch.manual_seed itself calls torch.cuda.manual_seed_all: seed the CPU generator directly
        torch.default_generator.manual_seed(int(seed))

    return get_rng_state, set_rng_state, manual_seed


def _patch_torch_cuda() -> None:
    cuda = torch.cuda
    get_state, set_state, seed = _cpu_rng_functions()
    cuda.current_device = lambda: 0
    cuda.get_rng_state = get_state
    cuda.set_rng_state = set_state
    cuda.manual_seed = seed
    cuda.manual_seed_all = lambda seed: None  # torch.manual_seed already seeded the CPU
    cuda.synchronize = lambda device=None: None
    cuda.current_stream = lambda device=None: _NullStream()
    cuda.default_stream = lambda device=None: _NullStream()
    cuda.stream = lambda stream=None: contextlib.nullcontext()
    cuda.Stream = _NullStream
    cuda.Event = _NullStream
    cuda.empty_cache = lambda: None
    cuda.memory_allocated = lambda device=None: 0
    cuda.max_memory_allocated = lambda device=None: 0
    cuda.memory_reserved = lambda device=None: 0
    cuda.reset_peak_memory_stats = lambda device=None: None
    cuda.set_device = lambda device: None


def _patch_megatron_rng() -> None:
    # Megatron's tracker reads/writes the CUDA generator directly (not through torch.cuda.*)
    from megatron.core.tensor_parallel import random as mrandom

    mrandom._get_cuda_rng_state = lambda device="cuda", clone=False, graph_safe=False: (
        torch.get_rng_state().clone() if clone else torch.get_rng_state())
    mrandom._set_cuda_rng_state = lambda new_state, device=-1, graph_safe=False: torch.set_rng_state(new_state)


def shim_active() -> bool:
    """True when this process runs Megatron-Core on the CPU through the shim."""
    return _installed


def install_cpu_shim() -> bool:
    """Installs the CPU redirections when this process computes on the CPU (no CUDA, or SOLOPO_DEVICE=cpu
    on a GPU host: `megatron_solopo.parallel.device`); returns whether the shim is active."""
    global _installed

    if cuda_in_use():
        return False
    with _lock:
        if _installed:
            return True
        _patch_torch_cuda()
        _patch_megatron_rng()
        _patch_autograd_engine()
        _patch_megatron_p2p()
        _CudaToCpuMode().__enter__()  # process-wide: never exited
        _installed = True
    return True
