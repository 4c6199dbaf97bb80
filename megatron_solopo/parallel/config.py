"""The one parallel-layout object passed around the project (DESIGN.md: no globals in new code)."""

from __future__ import annotations

import dataclasses

CP_COMM_TYPES = ("p2p", "all_gather", "a2a", "a2a+p2p")


@dataclasses.dataclass
class ParallelConfig:
    """How one training job is laid out over GPUs (or CPU processes).

    `ParallelConfig()` is a single process. The data-parallel size is not set: it is derived from the
    world size as world / (tp * pp * cp) once torch.distributed is up (`dp_size(world_size)`).
    """

    tp: int = 1
    """Tensor-parallel size: heads and MLP columns split over this many ranks (intra-node)."""
    pp: int = 1
    """Pipeline-parallel size: contiguous blocks of layers per stage."""
    cp: int = 1
    """Context-parallel size: each sequence split into 2*cp zigzag chunks, attention by ring exchange."""
    sequence_parallel: bool = False
    """Megatron sequence parallelism (needs tp > 1 and the Transformer Engine spec)."""
    cp_comm_type: str = "p2p"
    """How K/V move under CP with Transformer Engine: p2p | all_gather | a2a | a2a+p2p. The sdpa
    backend's ring attention implements p2p only (anything else is an error at model build)."""
    virtual_pp: int | None = None
    """Interleaved pipeline: model chunks per pipeline stage (None = not interleaved)."""

    def __post_init__(self) -> None:
        for name in ("tp", "pp", "cp"):
            value = getattr(self, name)
            if not isinstance(value, int) or isinstance(value, bool) or value < 1:
                raise ValueError(f"parallel.{name} must be a positive integer, got {value!r}")
        if self.cp_comm_type not in CP_COMM_TYPES:
            raise ValueError(
                f"parallel.cp_comm_type={self.cp_comm_type!r} is not one of {', '.join(CP_COMM_TYPES)}")
        if self.sequence_parallel and self.tp == 1:
            raise ValueError("parallel.sequence_parallel=true needs parallel.tp > 1 (it splits activations "
                             "over the tensor-parallel group); set tp >= 2 or sequence_parallel=false")
        if self.virtual_pp is not None and (self.virtual_pp < 2 or self.pp < 2):
            raise ValueError("parallel.virtual_pp (interleaved pipeline) needs pp >= 2 and virtual_pp >= 2; "
                             "leave it null otherwise")

    @property
    def model_parallel_size(self) -> int:
        """Ranks that hold one replica of the model and one sequence: tp * pp * cp."""
        return self.tp * self.pp * self.cp

    def dp_size(self, world_size: int) -> int:
        """Data-parallel size for `world_size` processes; error when the layout does not divide it."""
        if world_size % self.model_parallel_size:
            raise ValueError(
                f"world size {world_size} is not divisible by tp*pp*cp = {self.tp}*{self.pp}*{self.cp} = "
                f"{self.model_parallel_size}; change the number of processes or the parallel sizes")
        return world_size // self.model_parallel_size

    def check_model(self, num_layers: int, num_attention_heads: int, num_query_groups: int,
                    vocab_size: int | None = None) -> None:
        """Errors naming the constraint when the model cannot be split this way."""
        problems = []
        if num_attention_heads % self.tp:
            problems.append(f"attention heads ({num_attention_heads}) % tp ({self.tp}) != 0")
        if num_query_groups % self.tp:
            problems.append(f"kv heads / query groups ({num_query_groups}) % tp ({self.tp}) != 0")
        layers_per_chunk = self.pp * (self.virtual_pp or 1)
        if num_layers % layers_per_chunk:
            problems.append(f"layers ({num_layers}) % (pp*virtual_pp) ({layers_per_chunk}) != 0")
        if vocab_size is not None and vocab_size % self.tp:
            problems.append(f"vocab size ({vocab_size}) % tp ({self.tp}) != 0 (the vocab is not padded, "
                            "so log-probs stay exact)")
        if problems:
            raise ValueError("parallel layout does not fit the model: " + "; ".join(problems)
                             + ". Choose tp/pp that divide these numbers.")
