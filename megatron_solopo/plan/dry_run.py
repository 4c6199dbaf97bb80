"""One real training step of this project's step code, as one rank of a layout, with its memory measured.

    spec = PlanSpec(preset="llama3.1-8b", tp=8, cp=8, short_tokens=4096, long_tokens=131072)
    result = plan_step(spec)                  # fake tensors + a fake process group of tp*pp*cp*dp ranks
    print("\n".join(result.lines()))

What runs is what `solopo train` runs: `checkpoint.load_model` (random weights), `optim.wrap_ddp` +
`build_optimizer` (Megatron DDP grad buffer, Megatron's Adam), `batching.collate_microbatches` (the SoLoPO
or long-PO triplet, packed, zigzag CP shard of this rank), `step.train_step` (Megatron's pipeline
schedule, our SDPA/ring core attention, the response-only LM head, finalize_model_grads, the optimizer
step). With `fake=True` (the plan) it runs in ONE process under `torch._subclasses.FakeTensorMode`,
with `torch.distributed` on the "fake" backend (`torch.testing._internal.distributed.fake_pg.FakeStore`)
of the layout's world size, so collectives return at once and no memory is allocated; with
`fake=False` the same code runs on real tensors (a world of one process: validation on small configs).

Two steps run: the first creates Adam's states (torch creates them lazily in the first `step()`); the
second is measured by `LiveBytesTracker` (plan/memory.py), so the peak is the steady-state one:
weights + gradient buffer + optimizer states + other persistent tensors + activations/temporaries.

Not modelled (see docs/scaling.md): CUDA caching-allocator rounding and fragmentation, the CUDA
context and NCCL/TE workspaces, kernels' private workspaces (cuBLAS, flash attention), and
communication buffers internal to NCCL. Data-dependent scalar reads return placeholders (memory.py).
"""

from __future__ import annotations

import contextlib
import dataclasses
import os
import re
import time

import torch
import torch.distributed as dist
from torch.overrides import TorchFunctionMode

from megatron_solopo.checkpoint.loader import load_model
from megatron_solopo.data.tokenization import sample_from_token_ids
from megatron_solopo.model import ModelConfig, get_preset
from megatron_solopo.objectives import ObjectiveConfig
from megatron_solopo.parallel import ParallelConfig, destroy_parallel, initialize_parallel
from megatron_solopo.parallel.shim import install_cpu_shim
from megatron_solopo.plan.memory import LiveBytesTracker, MemoryBreakdown
from megatron_solopo.training import step
from megatron_solopo.training.batching import collate_microbatches, layout_for_backend
from megatron_solopo.training.optim import build_optimizer, wrap_ddp
from megatron_solopo.training.step import train_step

__all__ = ["PlanSpec", "PlanResult", "plan_step", "parse_tokens", "synthetic_samples", "CATEGORIES"]

CATEGORIES = ("weights", "gradients (DDP buffer)", "optimizer states", "inputs", "other persistent")


def parse_tokens(text: str | int) -> int:
    """'4096', '32K', '128k', '1M' -> tokens (K = 1024, M = 1024*1024)."""
    if isinstance(text, int):
        return text
    match = re.fullmatch(r"\s*(\d+)\s*([kKmM]?)\s*", str(text))
    if not match:
        raise ValueError(f"token count {text!r} is not a number with an optional K/M suffix (e.g. 32K, 1M)")
    return int(match.group(1)) * {"": 1, "k": 1024, "m": 1024 * 1024}[match.group(2).lower()]


@dataclasses.dataclass
class PlanSpec:
    """A layout, a model and a batch shape to plan one training step for."""

    preset: str = "tiny"
    """Model preset name (model/presets.py)."""
    tp: int = 1
    pp: int = 1
    cp: int = 1
    dp: int = 1
    """Data-parallel replicas (the fake group has tp*pp*cp*dp ranks)."""
    virtual_pp: int | None = None
    sequence_parallel: bool = False
    short_tokens: int = 1024
    """Prompt tokens of the short context (x_short)."""
    long_tokens: int = 8192
    """Prompt tokens of the long context (x_long)."""
    response_tokens: int = 128
    """Tokens of each answer (chosen and rejected)."""
    mode: str = "solo"
    """solo: short chosen + short rejected + long chosen (SoLoPO); long: long chosen + long rejected."""
    objective: str = "orpo"
    recompute: str = "none"
    """none | selective | full (ModelConfig.recompute)."""
    params_dtype: str = "bf16"
    attention_backend: str = "sdpa"
    micro_batch_pairs: int = 1
    num_microbatches: int = 1
    distributed_optimizer: bool = False
    stage: str = "first"
    """Which pipeline stage this process plays: first | last (the same rank at PP=1)."""
    num_layers: int | None = None
    """Transformer layers to build instead of the preset's (None: the preset's). The layer-scaled dry run
    (plan/search.py) runs 2 and 4 layers and extrapolates; `solopo plan` always runs the full depth."""

    @property
    def world_size(self) -> int:
        return self.tp * self.pp * self.cp * self.dp

    def rank(self) -> int:
        """Global rank of the planned process: rank 0, or the first rank of the last pipeline stage
        (Megatron's default order tp-cp-ep-dp-pp puts PP outermost)."""
        if self.stage not in ("first", "last"):
            raise ValueError(f"stage must be first or last, got {self.stage!r}")
        return 0 if self.stage == "first" else (self.pp - 1) * self.tp * self.cp * self.dp


@dataclasses.dataclass
class PlanResult:
    spec: PlanSpec
    memory: MemoryBreakdown
    fake: bool
    pp_rank: int
    seconds_setup: float
    seconds_step: float
    loss: float

    def lines(self) -> list[str]:
        s = self.spec
        layers = "" if s.num_layers is None else f"{s.num_layers} layers, "
        head = (f"{'dry run (fake tensors)' if self.fake else 'real tensors'}: {s.preset}, tp={s.tp} pp={s.pp} "
                f"cp={s.cp} dp={s.dp}{' sp' if s.sequence_parallel else ''}, {s.params_dtype}, "
                f"recompute={s.recompute}, "
                f"mode={s.mode} ({s.objective}), short={s.short_tokens} long={s.long_tokens} "
                f"response={s.response_tokens}, "
                f"{layers}{s.num_microbatches} x {s.micro_batch_pairs} pair(s); "
                f"rank {s.rank()} (pipeline stage {self.pp_rank})")
        tail = (f"  setup {self.seconds_setup:.1f} s, measured step {self.seconds_step:.1f} s on this machine; "
                f"{self.memory.placeholder_reads} data-dependent scalar reads answered with placeholders")
        return [head, *self.memory.lines(), tail]


def synthetic_samples(spec: PlanSpec, vocab_size: int) -> list[dict]:
    """spec.num_microbatches * micro_batch_pairs tokenized pairs of the requested lengths (all four roles)."""
    generator = torch.Generator().manual_seed(0)

    def tokens(n: int) -> list[int]:
        return torch.randint(1, vocab_size, (n,), generator=generator).tolist()


    return [sample_from_token_ids(f"plan{index}", tokens(spec.short_tokens), tokens(spec.long_tokens),
                                  tokens(spec.response_tokens), tokens(spec.response_tokens))
            for index in range(spec.num_microbatches * spec.micro_batch_pairs)]


# ------------------------------------------------------------------------------ process group
def _init_process_group(spec: PlanSpec, fake: bool) -> bool:
    """Sets torch.distributed up for the run; True when this call created it (and must tear it down)."""
    if fake:
        if dist.is_initialized():
            raise RuntimeError("the dry run sets up its own (fake) process group; torch.distributed is already "
                               "initialized in this process (plan in a fresh process)")
        from torch.testing._internal.distributed.fake_pg import FakeStore


        install_cpu_shim()
        dist.init_process_group("fake", store=FakeStore(), rank=spec.rank(), world_size=spec.world_size)
        return True
    world = dist.get_world_size() if dist.is_initialized() else int(os.environ.get("WORLD_SIZE", "1"))
    if world != spec.world_size:
        raise ValueError(f"a real-tensor run needs one process per rank: the layout has {spec.world_size} ranks, "
                         f"this job {world} (launch it with torchrun, or plan with fake tensors)")
    return not dist.is_initialized()  # initialize_parallel brings it up (gloo/nccl) when it is not


def _optimizer_tensors(optimizer):
    """Tensors the Megatron optimizer owns: Adam states and fp32 master copies (bf16/fp16 models)."""
    for opt in getattr(optimizer, "chained_optimizers", None) or [optimizer]:
        inner = getattr(opt, "optimizer", None)
        if inner is not None:
            for state in inner.state.values():
                yield from (value for value in state.values() if isinstance(value, torch.Tensor))
        for name in ("fp32_from_float16_groups", "shard_fp32_from_float16_groups", "shard_fp32_groups"):
            for group in getattr(opt, name, None) or []:
                yield from (p for p in group if isinstance(p, torch.Tensor))


def _grad_buffer_tensors(chunks):
    for chunk in chunks:
        for buffer in getattr(chunk, "buffers", []) + getattr(chunk, "expert_parallel_buffers", []):
            yield buffer.grad_data


def _microbatch_tensors(microbatches):
    for mb in microbatches:
        for value in vars(mb).values():
            if isinstance(value, torch.Tensor):
                yield value
            elif dataclasses.is_dataclass(value) or hasattr(value, "__dict__"):
                yield from (v for v in vars(value).values() if isinstance(v, torch.Tensor))


def _phase_hooks(tracker: LiveBytesTracker, chunks, optimizer) -> None:
    def forward_pre(*_):
        tracker.phase = "forward"

    def forward_post(*_):
        tracker.phase = "loss"

    for chunk in chunks:
        chunk.register_forward_pre_hook(forward_pre)
        chunk.register_forward_hook(forward_post)
    for opt in getattr(optimizer, "chained_optimizers", None) or [optimizer]:
        inner = getattr(opt, "optimizer", None)
        if inner is not None:
            inner.register_step_pre_hook(lambda *_: setattr(tracker, "phase", "optimizer"))


@contextlib.contextmanager
def _outside_fake_mode(fake: bool):
    """While build_optimizer runs, no FakeTensorMode: Megatron all_gather_objects the param-group keys
    (pickles through .numpy()); operations on the model's fake tensors stay fake (each carries its mode)."""
    if not fake:
        yield
        return
    from torch._subclasses.fake_tensor import unset_fake_temporarily

    with unset_fake_temporarily():
        yield


class _TensorOfFakeScalars(TorchFunctionMode):
    """`torch.tensor([[0-d tensor, ...], ...])` of fake tensors as the equivalent `torch.stack`.

    Megatron's grad-norm fallback without TE/apex (core/utils.py local_multi_tensor_l2_norm) builds
    torch.tensor(list of per-parameter norms), which copies data a fake tensor does not have.
    """

    def __torch_function__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        if func is torch.tensor and args and isinstance(args[0], (list, tuple)) and _has_tensor(args[0]):
            out = _stack_nested(args[0])
            return out.to(dtype=kwargs.get("dtype") or out.dtype)
        return func(*args, **kwargs)


def _has_tensor(data) -> bool:
    return any(_has_tensor(x) if isinstance(x, (list, tuple)) else isinstance(x, torch.Tensor) for x in data)


def _stack_nested(data):
    return torch.stack([_stack_nested(x) if isinstance(x, (list, tuple)) else torch.as_tensor(x) for x in data])


def _stage_activation_shape(microbatches, hidden_size: int, spec: PlanSpec) -> list[int]:
    """[sequence, batch, hidden] of the activation one pipeline stage sends the next for every micro-batch
    (the dry run's pairs all have one length): this rank's CP shard, split over TP with sequence parallel."""
    shapes = {tuple(mb.tokens.shape) for mb in microbatches}
    if len(shapes) != 1:
        raise ValueError(f"the pipeline dry run needs micro-batches of one shape, got {sorted(shapes)}")
    rows, tokens = shapes.pop()
    return [tokens // (spec.tp if spec.sequence_parallel else 1), rows, hidden_size]


class _FakePipelinePeers(contextlib.AbstractContextManager):
    """Stands in for the other pipeline stages' messages that carry values, which one fake rank never gets.

    - Shapes: with `variable_seq_lengths` the schedule first sends each activation's shape to the
      neighbouring stage, and the receiver sizes its buffer from the values. All the dry run's
      micro-batches have one shape, so the exchange answers with it. The activation and gradient
      exchanges themselves still run (fake tensors of that shape).
    - The step's metrics, which the last stage broadcasts after the optimizer step: a stage that is not
      the last gets a NaN loss and the pair count, as nothing of the memory depends on them.
    """

    def __init__(self, shape: list[int], num_pairs: int) -> None:
        self.shape = shape
        self.num_pairs = num_pairs
        self._saved: tuple = ()

    def __enter__(self):
        from megatron.core.pipeline_parallel.p2p_communication import P2PCommunicator


        self._saved = (P2PCommunicator._communicate_shapes, step._broadcast_from_last_stage)
        shape, num_pairs = self.shape, self.num_pairs
        P2PCommunicator._communicate_shapes = lambda self, *args, **kwargs: (list(shape), list(shape))

        def last_stage_metrics(value, parallel):
            if parallel.is_last_stage():
                return value
            return {"loss": float("nan"), "pairs": float(num_pairs),
                    **{key: 0.0 for key in step._COUNTS if key != "pairs"}}

        step._broadcast_from_last_stage = last_stage_metrics
        return self

    def __exit__(self, *exc) -> None:
        from megatron.core.pipeline_parallel.p2p_communication import P2PCommunicator


        P2PCommunicator._communicate_shapes, step._broadcast_from_last_stage = self._saved


# ------------------------------------------------------------------------------ the step
def plan_step(spec: PlanSpec, fake: bool = True) -> PlanResult:
    """Runs two training steps of `spec` (the second measured) and returns the memory breakdown.

    fake=True: creates a fake process group of spec.world_size ranks (torch.distributed must not be
    initialized) and tears it down after; the warnings of that step (dtype dispatch on the CPU, deprecated
    collectives, a non-leaf .grad) describe the fake run, not the real one, and are not shown (unless
    SOLOPO_SHOW_WARNINGS=1). fake=False:
    real tensors, one process per rank of the layout (torchrun, or an existing process group of that size,
    which is left up); the result is this rank's.
    """
    import warnings

    with warnings.catch_warnings():
        if fake and os.environ.get("SOLOPO_SHOW_WARNINGS") != "1":
            warnings.simplefilter("ignore")
        return _plan_step(spec, fake)


def _plan_step(spec: PlanSpec, fake: bool) -> PlanResult:
    if spec.mode not in ("solo", "long"):
        raise ValueError(f"mode must be solo or long, got {spec.mode!r}")
    preset = get_preset(spec.preset)
    if spec.num_layers is not None:
        preset = preset.replace(num_layers=spec.num_layers)
    owns_process_group = _init_process_group(spec, fake)
    try:
        parallel = initialize_parallel(ParallelConfig(tp=spec.tp, pp=spec.pp, cp=spec.cp, virtual_pp=spec.virtual_pp,
                                                      sequence_parallel=spec.sequence_parallel))
        objective = ObjectiveConfig(name=spec.objective, mode=spec.mode)
        model_cfg = ModelConfig(preset=spec.preset, attention_backend=spec.attention_backend,
                                params_dtype=spec.params_dtype, recompute=spec.recompute)
        # collated outside the tracked modes (real, small integer tensors), then counted as inputs
        microbatches = collate_microbatches(synthetic_samples(spec, preset.vocab_size), objective, parallel,
                                            layout_for_backend(spec.attention_backend), spec.micro_batch_pairs)
        tracker = LiveBytesTracker(fake_scalars=fake)
        modes = [_FakePipelinePeers(_stage_activation_shape(microbatches, preset.hidden_size, spec),
                                   spec.num_microbatches * spec.micro_batch_pairs)] if fake and spec.pp > 1 else []
        if fake:
            from torch._subclasses.fake_tensor import FakeTensorMode

            modes += [FakeTensorMode(allow_non_fake_inputs=True), _TensorOfFakeScalars()]
        modes.append(tracker)
        for mode in modes:
            mode.__enter__()
        try:
            start = time.perf_counter()
            tracker.phase = "setup"
            # fake: no random init (it would only cost time); real: finite weights so the step is a real one
            chunks = wrap_ddp(load_model(model_cfg, parallel, preset=preset, load_weights=not fake),
                              use_distributed_optimizer=spec.distributed_optimizer)
            with _outside_fake_mode(fake):
                optimizer = build_optimizer(chunks, lr=1e-6, use_distributed_optimizer=spec.distributed_optimizer)
            _phase_hooks(tracker, chunks, optimizer)
            train_step(chunks, optimizer, None, microbatches, objective, parallel, step_index=0)  # creates Adam states
            for chunk in chunks:
                tracker.mark("weights", chunk.parameters())
            tracker.mark("gradients (DDP buffer)", _grad_buffer_tensors(chunks))
            tracker.mark("optimizer states", _optimizer_tensors(optimizer))
            tracker.mark("inputs", _microbatch_tensors(microbatches))
            tracker.mark_remaining("other persistent")
            seconds_setup = time.perf_counter() - start
            tracker.phase = "other"
            tracker.reset_peak()
            start = time.perf_counter()
            result = train_step(chunks, optimizer, None, microbatches, objective, parallel, step_index=1)
            seconds_step = time.perf_counter() - start
        finally:
            for mode in reversed(modes):
                mode.__exit__(None, None, None)
        return PlanResult(spec=spec, memory=tracker.breakdown(CATEGORIES), fake=fake, pp_rank=parallel.pp_rank,
                          seconds_setup=seconds_setup, seconds_step=seconds_step, loss=result.loss)
    finally:
        if owns_process_group:
            destroy_parallel()
