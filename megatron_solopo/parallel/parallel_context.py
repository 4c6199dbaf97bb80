"""`ParallelContext`: the one explicit parallel object passed down the stack (DESIGN.md).

`initialize_parallel(config)` returns it; collation, the training step, the reference pass, the model
builder and the attention receive it. It holds what Megatron's global `parallel_state` knows about
this rank (sizes, ranks, process groups, the pipeline's last rank, a `ProcessGroupCollection` for
GPTModel) plus the `ParallelConfig` it was built from, so that no code outside `parallel/` reads
Megatron's globals (torchtitan's ParallelDims; Megatron-Core's ProcessGroupCollection).

    ctx = initialize_parallel(ParallelConfig(tp=2, cp=2))
    ctx.cp_rank, ctx.dp_size, ctx.cp_group, ctx.is_last_stage(), ctx.seq_len_divisor(fp8="hybrid")

`ParallelContext.from_megatron(config)` is the one place that reads Megatron's parallel state;
`ParallelContext.for_rank(config, cp_rank=...)` describes one rank without any process group (offline
collation, unit tests); `current_parallel_context()` returns the context of the last
`initialize_parallel` for library entry points that were handed only a `ParallelConfig`.
"""

from __future__ import annotations

import dataclasses
import math
from typing import Any

import torch.distributed as dist

from megatron_solopo.parallel.config import ParallelConfig

__all__ = [
    "FP8_SEQ_MULTIPLES",
    "ParallelContext",
    "as_parallel_context",
    "current_parallel_context",
    "fp8_seq_multiple",
    "require_parallel_context",
    "seq_len_divisor",
]

FP8_SEQ_MULTIPLES = {"delayed": 16, "tensorwise": 16, "mxfp8": 32, "blockwise": 128}
"""Token-count multiple Transformer Engine's FP8 GEMMs need, by FP8 recipe (MEGATRON_NOTES: packing)."""


def fp8_seq_multiple(fp8: str | None, fp8_recipe: str = "delayed") -> int:
    """Per-sequence token multiple FP8 needs (1 without FP8): 16, 32 for mxfp8, 128 for blockwise."""
    if fp8 is None:
        return 1
    if fp8_recipe not in FP8_SEQ_MULTIPLES:
        raise ValueError(f"fp8_recipe={fp8_recipe!r} is not one of {', '.join(FP8_SEQ_MULTIPLES)}")
    return FP8_SEQ_MULTIPLES[fp8_recipe]


def seq_len_divisor(config: ParallelConfig, multiple: int = 1) -> int:
    """Every sequence (packed) or row (padded) length must be a multiple of this under `config`.

    `multiple` (e.g. `fp8_seq_multiple(...)`: Transformer Engine's FP8 GEMMs assert the token count of
    their input) constrains what one rank's GEMMs see, the LOCAL shard: a sequence of T tokens puts T/cp
    tokens on each CP rank, and T/(cp*tp) on each TP rank under sequence parallelism. So the divisor is
    the lcm of: `multiple * cp` (`* tp` with sequence parallelism), 2*cp (zigzag CP chunks) when cp > 1,
    and cp*tp under sequence parallelism (each CP shard is then split over the TP ranks).
    """
    if isinstance(multiple, bool) or not isinstance(multiple, int) or multiple < 1:
        raise ValueError(f"pad_to_multiple_of must be a positive integer, got {multiple!r}")
    shard = config.cp * (config.tp if config.sequence_parallel else 1)  # ranks one sequence is split over
    divisor = multiple * shard
    if config.cp > 1:
        divisor = math.lcm(divisor, 2 * config.cp)
    return divisor


@dataclasses.dataclass(frozen=True)
class ParallelContext:
    """This rank's place in the TP/PP/CP/DP layout and the process groups to talk over.

    Sizes equal the config's (dp = world / (tp*pp*cp)). Ranks are within each group; `dp_rank` is the
    data-parallel rank WITHOUT context parallelism (the CP ranks of one replica share it). Groups are
    None in a context from `for_rank` (no process group: offline collation and unit tests).
    """

    config: ParallelConfig
    """The layout this context was built for (a private copy)."""
    world_size: int = 1
    rank: int = 0
    """Global rank (torch.distributed)."""
    tp_size: int = 1
    pp_size: int = 1
    cp_size: int = 1
    dp_size: int = 1
    """Data-parallel replicas (without CP)."""
    vpp_size: int = 1
    """Model chunks per pipeline stage (1 when the pipeline is not interleaved)."""
    tp_rank: int = 0
    pp_rank: int = 0
    cp_rank: int = 0
    dp_rank: int = 0
    pp_last_rank: int = 0
    """Global rank of the last stage of this rank's pipeline (where the loss lives)."""
    tp_group: Any = dataclasses.field(default=None, repr=False, compare=False)
    pp_group: Any = dataclasses.field(default=None, repr=False, compare=False)
    cp_group: Any = dataclasses.field(default=None, repr=False, compare=False)
    dp_group: Any = dataclasses.field(default=None, repr=False, compare=False)
    """Data-parallel group without CP (one rank per replica): metric reductions, sample gathering."""
    dp_cp_group: Any = dataclasses.field(default=None, repr=False, compare=False)
    """Data-parallel group with CP (what DDP reduces gradients over)."""
    mp_group: Any = dataclasses.field(default=None, repr=False, compare=False)
    """Model-parallel group (TP x PP x CP of one replica)."""
    pg_collection: Any = dataclasses.field(default=None, repr=False, compare=False)
    """Megatron-Core `ProcessGroupCollection` handed to GPTModel (and from it to the attention)."""

    def __post_init__(self) -> None:
        config = self.config
        if not isinstance(config, ParallelConfig):
            raise TypeError(f"ParallelContext.config must be a ParallelConfig, got {type(config).__name__}")
        sizes = (self.tp_size, self.pp_size, self.cp_size, self.vpp_size)
        if sizes != (config.tp, config.pp, config.cp, config.virtual_pp or 1):
            raise ValueError(f"ParallelContext sizes (tp, pp, cp, vpp) = {sizes} differ from its config's "
                             f"{(config.tp, config.pp, config.cp, config.virtual_pp or 1)}")
        if self.world_size != config.model_parallel_size * self.dp_size:
            raise ValueError(f"world size {self.world_size} != tp*pp*cp*dp = "
                             f"{config.model_parallel_size}*{self.dp_size}")
        for name in ("tp", "pp", "cp", "dp"):
            rank, size = getattr(self, f"{name}_rank"), getattr(self, f"{name}_size")
            if not 0 <= rank < size:
                raise ValueError(f"{name}_rank={rank} is outside [0, {name}_size={size})")

    # ------------------------------------------------------------------ construction
    @classmethod
    def for_rank(cls, config: ParallelConfig | None = None, *, tp_rank: int = 0, pp_rank: int = 0,
                 cp_rank: int = 0, dp_rank: int = 0, dp_size: int = 1) -> ParallelContext:
        """One rank of `config` without process groups: for collation outside a job and unit tests.

        Collectives (the step, the attention under CP) need a context from `initialize_parallel`.
        """
        config = dataclasses.replace(config or ParallelConfig())
        return cls(config=config, world_size=config.model_parallel_size * dp_size, rank=0,
                   tp_size=config.tp, pp_size=config.pp, cp_size=config.cp, dp_size=dp_size,
                   vpp_size=config.virtual_pp or 1, tp_rank=tp_rank, pp_rank=pp_rank, cp_rank=cp_rank,
                   dp_rank=dp_rank)

    @classmethod
    def from_megatron(cls, config: ParallelConfig) -> ParallelContext:
        """The context of this rank from Megatron's initialized parallel state (which must match `config`).

        Reads `megatron.core.parallel_state`, which only `megatron_solopo/parallel/` does.
        """
        from megatron.core import parallel_state as ps
        from megatron.core.process_groups_config import ProcessGroupCollection

        if not ps.model_parallel_is_initialized():
            raise RuntimeError("Megatron's parallel state is not initialized; call "
                               "megatron_solopo.parallel.initialize_parallel(config) first")
        actual = (ps.get_tensor_model_parallel_world_size(), ps.get_pipeline_model_parallel_world_size(),
                  ps.get_context_parallel_world_size(), ps.get_virtual_pipeline_model_parallel_world_size() or 1)
        wanted = (config.tp, config.pp, config.cp, config.virtual_pp or 1)
        if actual != wanted:
            raise ValueError(f"parallel (tp, pp, cp, vpp) = {wanted} but Megatron's groups are {actual}; call "
                             "initialize_parallel(parallel) with this layout first")
        return cls(
            config=dataclasses.replace(config), world_size=dist.get_world_size(), rank=dist.get_rank(),
            tp_size=actual[0], pp_size=actual[1], cp_size=actual[2], dp_size=ps.get_data_parallel_world_size(),
            vpp_size=actual[3], tp_rank=ps.get_tensor_model_parallel_rank(),
            pp_rank=ps.get_pipeline_model_parallel_rank(), cp_rank=ps.get_context_parallel_rank(),
            dp_rank=ps.get_data_parallel_rank(), pp_last_rank=ps.get_pipeline_model_parallel_last_rank(),
            tp_group=ps.get_tensor_model_parallel_group(), pp_group=ps.get_pipeline_model_parallel_group(),
            cp_group=ps.get_context_parallel_group(),
            dp_group=ps.get_data_parallel_group(with_context_parallel=False),
            dp_cp_group=ps.get_data_parallel_group(with_context_parallel=True),
            mp_group=ps.get_model_parallel_group(),
            # what GPTModel builds itself when given none: the same groups, now passed explicitly
            pg_collection=ProcessGroupCollection.use_mpu_process_groups(),
        )

    # ------------------------------------------------------------------ queries
    def is_first_stage(self, vp_stage: int | None = None) -> bool:
        """First pipeline stage. vp_stage=None: the physical stage (Megatron's ignore_virtual=True);
        with an interleaved pipeline and a vp_stage, also its first model chunk (vp_stage == 0)."""
        if vp_stage is not None and self.vpp_size > 1 and vp_stage != 0:
            return False
        return self.pp_rank == 0

    def is_last_stage(self, vp_stage: int | None = None) -> bool:
        """Last pipeline stage (holds the loss). vp_stage=None: the physical stage (ignore_virtual=True);
        with an interleaved pipeline and a vp_stage, also its last model chunk (vp_stage == vpp - 1)."""
        if vp_stage is not None and self.vpp_size > 1 and vp_stage != self.vpp_size - 1:
            return False
        return self.pp_rank == self.pp_size - 1

    def layout(self) -> dict[str, int]:
        """{"tp", "pp", "cp", "dp", "vpp", "world"}: what checkpoints record and compare on resume."""
        return {"tp": self.tp_size, "pp": self.pp_size, "cp": self.cp_size, "dp": self.dp_size,
                "vpp": self.vpp_size, "world": self.world_size}

    def seq_len_divisor(self, fp8: str | None = None, fp8_recipe: str = "delayed", multiple: int = 1) -> int:
        """Every sequence length a micro-batch holds must be a multiple of this: lcm of 2*cp (CP),
        cp*tp (sequence parallelism), the FP8 GEMM multiple of `fp8`/`fp8_recipe` and `multiple`."""
        return seq_len_divisor(self.config, math.lcm(multiple, fp8_seq_multiple(fp8, fp8_recipe)))


# ---------------------------------------------------------------------- the current context
_current: ParallelContext | None = None


def _set_current(context: ParallelContext | None) -> None:
    global _current
    _current = context


def current_parallel_context(required: bool = True) -> ParallelContext | None:
    """The context of the last `initialize_parallel` in this process (still live).

    For library entry points that were handed no context; hot paths receive it explicitly.
    required=False: None when there is none (no process group, or it was torn down).
    """
    live = _current is not None and dist.is_initialized() and _megatron_initialized()
    if live:
        return _current
    if required:
        raise RuntimeError("no parallel context: call megatron_solopo.parallel.initialize_parallel(config) (it "
                           "returns the ParallelContext to pass down), or ParallelContext.from_megatron(config) "
                           "when Megatron's parallel state was initialized elsewhere")
    return None


def _megatron_initialized() -> bool:
    from megatron.core import parallel_state as ps

    return ps.model_parallel_is_initialized()


def as_parallel_context(parallel: ParallelContext | ParallelConfig | None) -> ParallelContext:
    """`parallel` itself, or for a `ParallelConfig` (or None) the current context, which must have its sizes.

    For entry points that predate ParallelContext (model building, weight loading); the config's
    non-size settings (sequence_parallel, cp_comm_type) are the ones used.
    """
    if isinstance(parallel, ParallelContext):
        return parallel
    if parallel is not None and not isinstance(parallel, ParallelConfig):
        raise TypeError(f"expected a ParallelContext or ParallelConfig, got {type(parallel).__name__}")
    context = current_parallel_context()
    if parallel is None:
        return context
    wanted = (parallel.tp, parallel.pp, parallel.cp, parallel.virtual_pp or 1)
    actual = (context.tp_size, context.pp_size, context.cp_size, context.vpp_size)
    if wanted != actual:
        raise ValueError(f"parallel (tp, pp, cp, vpp) = {wanted} but the process groups were initialized with "
                         f"{actual}; call initialize_parallel(parallel) before building the model")
    return context if parallel == context.config else dataclasses.replace(context, config=dataclasses.replace(parallel))


def require_parallel_context(parallel: Any, where: str) -> ParallelContext:
    """`parallel` when it is a ParallelContext; a TypeError naming the fix otherwise (hot paths)."""
    if isinstance(parallel, ParallelContext):
        return parallel
    raise TypeError(f"{where} needs the ParallelContext that initialize_parallel returns, got "
                    f"{type(parallel).__name__}; outside a job use ParallelContext.for_rank(config, cp_rank=...)")
