"""Held-out pairs (train.heldout_pairs): the first N pairs of a pairs file, kept out of training and scored
on all four sequences with the model being trained (`step.forward_only`, through reference.py's scoring),
before training (cached per initial model) and after; the records are summarized by diagnostics.py.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import os
import pathlib
import statistics
from collections.abc import Mapping, Sequence
from typing import Any

from megatron_solopo.objectives import SEQUENCES
from megatron_solopo.training.diagnostics import CHOSEN_GAP, HELDOUT_PREFIX, mean_logp_key
from megatron_solopo.training.reference import ReferenceScorer, score_dataset
from megatron_solopo.training.run_state import capture_rng_state, restore_rng_state

__all__ = ["HeldOut", "before_cache_path", "heldout_means", "read_before_cache", "select_heldout",
           "write_before_cache"]


@dataclasses.dataclass
class HeldOut:
    """The held-out pairs of a run (the same list on every rank) and where they came from."""

    samples: list[dict]
    """Tokenized samples (all four roles) in file order."""
    source: str
    """The pairs file they were taken from."""
    from_training_pairs: bool = False
    """True when `source` is the training pairs file itself (train.heldout_pairs_path null)."""

    @property
    def ids(self) -> list[str]:
        return [str(sample["id"]) for sample in self.samples]

    def score(self, chunks: list, collator, head=None) -> dict[str, float]:
        """heldout/* means over the pairs with the model as it is now (forward only, eval mode; the RNG
        states are restored afterwards, so scoring never changes the training run); collator: the run's
        (batching.Collator). Collective."""
        scorer = _PolicyScorer(chunks, SEQUENCES, collator, head=head)
        # grouped as `solopo precompute-ref` groups them
        group_pairs = collator.micro_batch_pairs * max(8, 2 * collator.parallel.pp_size)
        rng = capture_rng_state()
        try:
            by_role = score_dataset(scorer, _SampleList(self.samples), group_pairs)
        finally:
            restore_rng_state(rng)
        return heldout_means(self.samples, by_role)


_BEFORE_CACHE_VERSION = 1


def before_cache_path(heldout: HeldOut, model_identity: Mapping[str, Any], cache_dir: str | os.PathLike
                      ) -> pathlib.Path:
    """Where the "before" scores of these pairs under this initial model are kept: next to the held-out
    pairs file when it was given (train.heldout_pairs_path: runs that share it, like the arms of an
    experiment, score them once), else in data.cache_dir. The name hashes the model's identity
    (architecture, dtype, weight-file fingerprints or init seed) and every held-out token."""
    tokens = [[sample["id"], *([sample[f"{role}_input_ids"], sample[f"{role}_loss_mask"]] for role in SEQUENCES)]
              for sample in heldout.samples]
    payload = json.dumps({"version": _BEFORE_CACHE_VERSION, "model": model_identity, "pairs": tokens},
                         sort_keys=True, default=list)
    key = hashlib.sha256(payload.encode()).hexdigest()[:20]
    if heldout.from_training_pairs:
        return pathlib.Path(cache_dir) / f"heldout-before-{key}.json"
    source = pathlib.Path(heldout.source)
    return source.with_name(f".{source.name}.heldout-before-{key}.json")


def read_before_cache(path: pathlib.Path) -> dict[str, float] | None:
    """The cached "before" scores, or None (missing or unreadable: then they are scored again)."""
    try:
        values = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return None
    ok = isinstance(values, dict) and all(isinstance(v, (int, float)) for v in values.values())
    return {key: float(value) for key, value in values.items()} if ok and values else None


def write_before_cache(path: pathlib.Path, values: Mapping[str, float]) -> None:
    """Writes the cache atomically; a read-only data directory only costs the scoring next time."""
    tmp = path.with_name(f"{path.name}.tmp-{os.getpid()}")
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        tmp.write_text(json.dumps(dict(values), indent=1) + "\n", encoding="utf-8")
        os.replace(tmp, path)
    except OSError:
        tmp.unlink(missing_ok=True)


def heldout_means(samples: Sequence[Mapping], by_role: Mapping[str, Sequence[float]]) -> dict[str, float]:
    """{"heldout/<role>_mean_logp", "heldout/chosen_gap_short_minus_long", "heldout/pairs"} from log-prob
    sums per role (in `samples` order) and the samples' loss masks (response token counts)."""
    means = {}
    for role, sums in by_role.items():
        per_pair = [total / sum(sample[f"{role}_loss_mask"]) for total, sample in zip(sums, samples, strict=True)]
        means[role] = per_pair
    out = {mean_logp_key(role, HELDOUT_PREFIX): statistics.fmean(values) for role, values in means.items()}
    out[CHOSEN_GAP.replace("diag/", HELDOUT_PREFIX)] = statistics.fmean(
        s - l for s, l in zip(means["short_chosen"], means["long_chosen"]))
    out[f"{HELDOUT_PREFIX}pairs"] = float(len(samples))
    return out


class _SampleList:
    """The slice of a `datasets.Dataset` interface that `reference.score_dataset` reads, over a list."""

    def __init__(self, samples: list[dict]):
        self._samples = samples

    def __len__(self) -> int:
        return len(self._samples)

    def __getitem__(self, key):
        if key == "id":
            return [sample["id"] for sample in self._samples]
        return self._samples[key]


class _PolicyScorer(ReferenceScorer):
    """ReferenceScorer's scoring, over the model being trained: nothing is frozen or left in eval mode
    (forward_only switches the chunks to eval mode and back)."""

    def __post_init__(self) -> None:
        pass


def select_heldout(num_pairs: int, source_path: str | None, dataset, load_source,
                   training_path: str | os.PathLike = "training pairs") -> tuple[HeldOut | None, Sequence[int]]:
    """(held-out pairs, dataset positions left for training).

    num_pairs: train.heldout_pairs (0: none, every position trains). source_path: train.heldout_pairs_path,
    None for the training pairs themselves (`dataset`, read from `training_path`); load_source(path)
    returns the tokenized dataset of another pairs file. The held-out pairs are the source's first
    `num_pairs` rows; every training row with one of their ids is left out.
    """
    if num_pairs == 0:
        return None, range(len(dataset))
    source = dataset if source_path is None else load_source(source_path)
    if len(source) < num_pairs:
        where = source_path or "the training pairs"
        raise ValueError(f"train.heldout_pairs={num_pairs} but {where} holds only {len(source)} (tokenized) pairs; "
                         "lower train.heldout_pairs or give a larger train.heldout_pairs_path")
    samples = [dict(source[i]) for i in range(num_pairs)]
    ids = {str(sample["id"]) for sample in samples}
    train_positions = [i for i, sample_id in enumerate(dataset["id"]) if str(sample_id) not in ids]
    return HeldOut(samples, str(source_path or training_path), from_training_pairs=source_path is None), \
        train_positions
