"""Deterministic, resumable, data-parallel-sharded sample order.

Each epoch is one permutation of ``range(num_samples)`` drawn from ``(seed, epoch)`` (the same on
every rank and machine), cut to a multiple of ``dp_size`` (``drop_last``: every rank sees the same
number of samples per epoch, so ranks stay in lockstep), and dealt round-robin: rank r gets global
positions r, r + dp, r + 2 dp, ... Within an epoch the ranks' index sets are disjoint and together
cover all but ``num_samples % dp_size`` samples (a different remainder each epoch).

Resume: ``state_dict()`` is ``{"epoch", "position", ...}`` where position counts the *global* samples
consumed in the epoch (a multiple of dp_size); ``load_state_dict`` continues exactly there, also
with the same seed after a crash on a fresh process. The state only advances as indices are taken
from the iterator; a trainer that prefetches should instead record its own consumed count and call
``set_position(epoch, consumed_global)`` before resuming.
"""

from __future__ import annotations

from collections.abc import Iterator, Mapping
from typing import Any

__all__ = ["DistributedPairSampler"]


class DistributedPairSampler:
    """Indices of the pairs this DP rank trains on, epoch after epoch (a torch Sampler-compatible iterable)."""

    def __init__(self, num_samples: int, dp_rank: int = 0, dp_size: int = 1, seed: int = 0,
                 shuffle: bool = True) -> None:
        if num_samples < 1:
            raise ValueError(f"num_samples must be >= 1, got {num_samples}")
        if dp_size < 1 or not 0 <= dp_rank < dp_size:
            raise ValueError(f"dp_rank={dp_rank} must be in [0, dp_size={dp_size})")
        if num_samples < dp_size:
            raise ValueError(f"{num_samples} samples cannot feed {dp_size} data-parallel ranks (each needs >= 1); "
                             "build more pairs or use fewer ranks")
        self.num_samples = num_samples
        self.dp_rank = dp_rank
        self.dp_size = dp_size
        self.seed = seed
        self.shuffle = shuffle
        self.epoch = 0
        self.position = 0

    @property
    def samples_per_epoch(self) -> int:
        """Global samples per epoch (all ranks), a multiple of dp_size."""
        return self.num_samples - self.num_samples % self.dp_size

    def __len__(self) -> int:
        """Samples this rank still gets in the current epoch."""
        return (self.samples_per_epoch - self.position) // self.dp_size

    def epoch_order(self, epoch: int) -> list[int]:
        """The global order of `epoch` (before sharding and truncation)."""
        import torch

        if not self.shuffle:
            return list(range(self.num_samples))
        generator = torch.Generator()
        generator.manual_seed(self.seed * 1_000_003 + epoch)
        return torch.randperm(self.num_samples, generator=generator).tolist()

    def __iter__(self) -> Iterator[int]:
        """Yields this rank's remaining indices of the current epoch, then moves to the next epoch."""
        order = self.epoch_order(self.epoch)[: self.samples_per_epoch]
        for global_pos in range(self.position + self.dp_rank, self.samples_per_epoch, self.dp_size):
            # advance before yielding: the sample handed out counts as consumed
            self.position = global_pos - self.dp_rank + self.dp_size
            yield order[global_pos]
        self.epoch += 1
        self.position = 0

    def set_position(self, epoch: int, position: int) -> None:
        """Continue at `position` global samples into `epoch`."""
        if epoch < 0 or not 0 <= position <= self.samples_per_epoch or position % self.dp_size:
            raise ValueError(f"position={position} must be a multiple of dp_size={self.dp_size} in "
                             f"[0, {self.samples_per_epoch}] and epoch={epoch} >= 0")
        self.epoch, self.position = epoch, position

    def state_dict(self) -> dict[str, Any]:
        return {"epoch": self.epoch, "position": self.position, "seed": self.seed, "num_samples": self.num_samples,
                "dp_size": self.dp_size, "shuffle": self.shuffle}

    def load_state_dict(self, state: Mapping[str, Any]) -> None:
        """Restores epoch and position; the seed, dataset size and shuffle must match (else the order differs)."""
        for key in ("seed", "num_samples", "shuffle"):
            if state[key] != getattr(self, key):
                raise ValueError(f"sampler state has {key}={state[key]!r} but this sampler has {getattr(self, key)!r}; "
                                 "resuming would change the sample order (use the same data and train seed)")
        position = state["position"]
        if state["dp_size"] != self.dp_size:
            # a global count still identifies the same samples when the DP size changes, as long as it
            # falls on a step boundary of the new size
            if position % self.dp_size:
                raise ValueError(f"cannot resume at global position {position} with dp_size={self.dp_size} "
                                 f"(saved with dp_size={state['dp_size']}): not a multiple")
        self.set_position(state["epoch"], position)
