"""Reference log-probs for DPO / IPO / LongPO: precomputed once (`solopo precompute-ref`) or online.

DPO's reward is r(x, y) = beta * (log pi_theta(y|x) - log pi_ref(y|x)); pi_ref is the frozen initial
model. Its log-prob sums per (pair, role) never change during training, so they are data:

    solopo precompute-ref --config X.yaml [section.key=value ...] [--output PATH]

runs the frozen initial model (the same `model` section, the same parallel layout, no gradients)
once over every tokenized pair with `step.forward_only`, and writes `reference_logps.pt` next to the
pairs file (or `train.reference_path`) holding, for the roles the objective's reference needs
(`objectives.required_reference_sequences`: e.g. short_chosen, short_rejected, long_chosen for
SoLo-DPO; short_chosen, short_rejected for LongPO), one fp32 sum per pair, in dataset order, with:

- count: the number of pairs,
- dataset_hash: sha256 of the pair ids and, per role, the token ids and loss masks,
- model_identity: architecture, dtype and a content fingerprint of the initial weights,
- hash: sha256 of the three (and the roles).

Training with train.reference=precomputed recomputes count, dataset hash and model identity and
stops with an error naming what differs (the stored values would silently be wrong otherwise).
train.reference=online instead keeps a frozen copy of the initial model in memory and scores each
step's pairs with it (one extra forward per step, no file, more memory).
"""

from __future__ import annotations

import dataclasses
import datetime
import hashlib
import json
import logging
import os
import pathlib
import time
from collections.abc import Mapping, Sequence
from typing import TYPE_CHECKING, Any

import torch
import torch.distributed as dist

from megatron_solopo.checkpoint import loader
from megatron_solopo.model.config import LogprobHeadConfig
from megatron_solopo.objectives import ObjectiveConfig, logps_key, required_reference_sequences
from megatron_solopo.objectives.config import SEQUENCES
from megatron_solopo.parallel import destroy_parallel, initialize_parallel
from megatron_solopo.parallel.parallel_context import ParallelContext
from megatron_solopo.training import run_inputs
from megatron_solopo.training.batching import Collator, resolve_layout
from megatron_solopo.training.step import forward_only

if TYPE_CHECKING:
    from megatron_solopo.config import ExperimentConfig

logger = logging.getLogger(__name__)

REFERENCE_FILE = "reference_logps.pt"
FORMAT_VERSION = 1


class ReferenceMismatchError(ValueError):
    """Stored reference log-probs do not belong to this dataset / model / objective."""


# ------------------------------------------------------------------------------------ roles
def reference_roles(objective: ObjectiveConfig) -> tuple[str, ...]:
    """Roles the objective's reference scores, in SEQUENCES order (empty for reference-free objectives)."""
    needed = required_reference_sequences(objective)
    return tuple(role for role in SEQUENCES if role in needed)


def default_reference_path(data_config) -> pathlib.Path:
    """reference_logps.pt next to the pairs file."""
    return pathlib.Path(data_config.resolved_pairs_path).parent / REFERENCE_FILE


def resolve_reference_path(train_config, data_config) -> pathlib.Path:
    return pathlib.Path(train_config.reference_path) if train_config.reference_path else default_reference_path(
        data_config)


# ------------------------------------------------------------------------------------ hashing
def dataset_fingerprint(dataset, roles: Sequence[str]) -> str:
    """sha256 over the pair ids and each role's token ids and loss masks (values and lengths).

    Read through Arrow buffers (no python lists), so hashing 10K long-context pairs takes seconds.
    """
    import numpy as np

    columns = ["id"] + [f"{role}_{kind}" for role in roles for kind in ("input_ids", "loss_mask")]
    table = dataset.select_columns(columns).with_format("arrow")[:]
    digest = hashlib.sha256(json.dumps(table.column("id").to_pylist()).encode())
    for name in columns[1:]:
        values, lengths = hashlib.sha256(), hashlib.sha256()
        for chunk in table.column(name).chunks:
            values.update(np.ascontiguousarray(chunk.flatten().to_numpy(zero_copy_only=False), dtype=np.int64).data)
            lengths.update(np.ascontiguousarray(chunk.value_lengths().to_numpy(zero_copy_only=False),
                                                dtype=np.int64).data)
        digest.update(name.encode())
        digest.update(values.digest())
        digest.update(lengths.digest())
    return digest.hexdigest()


def _combined_hash(roles: Sequence[str], count: int, dataset_hash: str, identity: Mapping[str, Any]) -> str:
    payload = json.dumps({"roles": list(roles), "count": count, "dataset": dataset_hash, "model": identity},
                         sort_keys=True)
    return hashlib.sha256(payload.encode()).hexdigest()


# ------------------------------------------------------------------------------------ the table
@dataclasses.dataclass
class ReferenceTable:
    """Reference log-prob sums of every pair of a dataset, per role, in dataset order."""

    roles: tuple[str, ...]
    ids: list[str]
    logps: dict[str, torch.Tensor]
    """role -> [count] fp32 sums of log pi_ref(response token) over the response (EOS included)."""
    dataset_hash: str
    model_identity: dict[str, Any]

    @property
    def count(self) -> int:
        return len(self.ids)

    @property
    def hash(self) -> str:
        return _combined_hash(self.roles, self.count, self.dataset_hash, self.model_identity)

    def to_file(self, path: str | os.PathLike) -> pathlib.Path:
        """Writes the table atomically (temporary name, then rename)."""
        path = pathlib.Path(path)
        path.parent.mkdir(parents=True, exist_ok=True)
        payload = {"format_version": FORMAT_VERSION, "roles": list(self.roles), "ids": list(self.ids),
                   "logps": {role: tensor.float().cpu() for role, tensor in self.logps.items()},
                   "count": self.count, "dataset_hash": self.dataset_hash,
                   "model_identity_json": json.dumps(self.model_identity, sort_keys=True), "hash": self.hash,
                   "created": datetime.datetime.now(datetime.UTC).isoformat(timespec="seconds")}
        tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}")
        torch.save(payload, tmp)
        os.replace(tmp, path)
        return path

    @classmethod
    def from_file(cls, path: str | os.PathLike) -> ReferenceTable:
        path = pathlib.Path(path)
        if not path.is_file():
            raise FileNotFoundError(f"no precomputed reference log-probs at {path}: run `solopo precompute-ref "
                                    "--config <the same config>` first, or set train.reference=online")
        damaged = (f"{path} is damaged (truncated, emptied or not written by `solopo precompute-ref`); delete it and "
                   "recompute it with `solopo precompute-ref --config <the same config>`")
        try:
            payload = torch.load(path, map_location="cpu", weights_only=True)
        except OSError:
            raise
        except Exception as err:  # EOFError, UnpicklingError, zip errors: whatever torch.load hits on a bad file
            raise ReferenceMismatchError(f"{damaged} ({type(err).__name__}: {err})") from None
        if not isinstance(payload, dict):
            raise ReferenceMismatchError(damaged)
        if payload.get("format_version") != FORMAT_VERSION:
            raise ReferenceMismatchError(f"{path} has format {payload.get('format_version')}, expected "
                                         f"{FORMAT_VERSION}; recompute it with `solopo precompute-ref`")
        try:
            table = cls(roles=tuple(payload["roles"]), ids=list(payload["ids"]), logps=dict(payload["logps"]),
                        dataset_hash=payload["dataset_hash"],
                        model_identity=json.loads(payload["model_identity_json"]))
        except (KeyError, TypeError, ValueError) as err:
            raise ReferenceMismatchError(f"{damaged} (missing or malformed {err})") from None
        if payload.get("count") != table.count or payload.get("hash") != table.hash:
            raise ReferenceMismatchError(f"{path} is corrupted (its count/hash do not match its content); "
                                         "recompute it with `solopo precompute-ref`")
        return table

    def verify(self, dataset, roles: Sequence[str], identity: Mapping[str, Any], where: str) -> None:
        """Errors naming what differs when this table is not for (dataset, roles, model)."""
        fix = "; recompute it with `solopo precompute-ref --config <this config>`"
        missing = [role for role in roles if role not in self.roles]
        if missing:
            raise ReferenceMismatchError(f"{where} holds reference log-probs for {list(self.roles)} but the "
                                         f"objective needs {list(roles)} (missing {missing}){fix}")
        if len(dataset) != self.count:
            raise ReferenceMismatchError(f"{where} has {self.count} pairs but the dataset has {len(dataset)}{fix}")
        if dataset_fingerprint(dataset, self.roles) != self.dataset_hash:
            raise ReferenceMismatchError(f"{where} was computed on other pairs or tokens than this dataset (the "
                                         f"hash of ids, token ids and masks differs){fix}")
        if json.dumps(dict(identity), sort_keys=True) != json.dumps(self.model_identity, sort_keys=True):
            differing = sorted(k for k in set(identity) | set(self.model_identity)
                               if identity.get(k) != self.model_identity.get(k))
            raise ReferenceMismatchError(f"{where} was computed with another initial model (differs in "
                                         f"{differing}){fix}")

    def values_for(self, index: int) -> dict[str, float]:
        """{"ref_<role>_logps": value} of the pair at dataset position `index` (the keys batching reads)."""
        return {logps_key(role, reference=True): float(self.logps[role][index]) for role in self.roles}


def attach_reference(samples: list[dict], indices: Sequence[int], table: ReferenceTable) -> list[dict]:
    """Adds "ref_<role>_logps" to each sample (a dataset row at position indices[k]); returns samples."""
    for sample, index in zip(samples, indices):
        if sample["id"] != table.ids[index]:
            raise ReferenceMismatchError(f"pair at position {index} is {sample['id']!r} but the reference table "
                                         f"has {table.ids[index]!r} there; recompute the reference log-probs")
        sample.update(table.values_for(index))
    return samples


# ------------------------------------------------------------------------------------ scoring
@dataclasses.dataclass
class ReferenceScorer:
    """Scores pairs with a frozen model: the precompute pass and train.reference=online.

    chunks: GPTModel chunks of the frozen model (not DDP-wrapped), roles: the roles to score,
    collator: the run's (`batching.Collator.for_model`: its parallel context, layout, micro-batch size
    and padding, FP8's included).
    """

    chunks: list
    roles: tuple[str, ...]
    collator: Collator
    head: LogprobHeadConfig | None = None
    """The LM head's chunking/recompute (`model.logprob_head`); None = its defaults."""

    def __post_init__(self) -> None:
        for chunk in self.chunks:
            chunk.eval()
            for param in chunk.parameters():
                param.requires_grad_(False)

    @property
    def parallel(self) -> ParallelContext:
        return self.collator.parallel

    def score(self, samples: Sequence[Mapping]) -> dict[str, dict[str, float]]:
        """{sample_id: {role: log-prob sum}} for this DP rank's `samples` (a multiple of micro_batch_pairs)."""
        microbatches = self.collator.scoring_microbatches(samples, self.roles)
        return forward_only(self.chunks, microbatches, self.parallel, head=self.head)

    def annotate(self, samples: list[dict]) -> list[dict]:
        """Adds "ref_<role>_logps" to every sample (online reference)."""
        scores = self.score(samples)
        for sample in samples:
            for role in self.roles:
                sample[logps_key(role, reference=True)] = scores[sample["id"]][role]
        return samples


def score_dataset(scorer: ReferenceScorer, dataset, group_pairs: int, progress: bool = False) -> dict[str, list[float]]:
    """Every pair of `dataset` scored once, split over the data-parallel ranks; {role: [count]} on every rank."""
    parallel = scorer.parallel
    dp_rank, dp_size = parallel.dp_rank, parallel.dp_size
    mine = list(range(dp_rank, len(dataset), dp_size))
    per_rank = -(-len(dataset) // dp_size)
    # every rank runs the same number of groups, each a multiple of micro_batch_pairs: repeat the last pair
    step = scorer.collator.micro_batch_pairs
    padded_len = -(-per_rank // step) * step
    mine += [mine[-1] if mine else 0] * (padded_len - len(mine))
    scores: dict[str, dict[str, float]] = {}
    bar = _progress(padded_len, progress and dist.get_rank() == 0)
    for start in range(0, padded_len, group_pairs):
        indices = mine[start:start + group_pairs]
        scores.update(scorer.score([dataset[i] for i in indices]))
        bar.update(len(indices))
    bar.close()
    gathered: list = [None] * dp_size
    dist.all_gather_object(gathered, scores, group=parallel.dp_group)
    merged = {sample_id: value for part in gathered for sample_id, value in part.items()}
    ids = list(dataset["id"])
    return {role: [merged[sample_id][role] for sample_id in ids] for role in scorer.roles}


def _progress(total: int, enabled: bool):
    from tqdm import tqdm

    return tqdm(total=total, disable=not enabled, desc="reference log-probs", unit="pair", dynamic_ncols=True)


# ------------------------------------------------------------------------------------ precompute
def _existing_table(path: pathlib.Path, dataset, roles, identity) -> ReferenceTable:
    """The table already at `path` when it is this dataset's and model's; ReferenceMismatchError otherwise."""
    try:
        table = ReferenceTable.from_file(path)
        table.verify(dataset, roles, identity, where=str(path))
    except ReferenceMismatchError as err:
        why = str(err).split("; recompute")[0]
        raise ReferenceMismatchError(f"{why}; nothing was written: pass --overwrite to replace it, or --output "
                                     "another file") from None
    return table


def precompute_reference(config: ExperimentConfig, output: str | os.PathLike | None = None,
                         progress: bool = True, overwrite: bool = True) -> dict[str, Any]:
    """Runs the frozen initial model over every pair and writes the reference table (collective).

    Initializes the parallel layout of `config.parallel` (tearing it down at the end if it created
    it). Returns {"path", "count", "roles", "seconds", "hash", "reused"}. With overwrite=False an existing
    table is kept: reused when it is this dataset's and model's (nothing computed), refused
    (ReferenceMismatchError, before the model is loaded) when it belongs to other pairs or another model.
    """
    roles = reference_roles(config.objective)
    if not roles:
        raise ValueError(f"objective {config.objective.name!r} (mode {config.objective.mode!r}) is reference-free: "
                         "there is nothing to precompute (SimPO/ORPO train with train.reference=none)")
    created = not dist.is_initialized()
    start = time.perf_counter()
    parallel = initialize_parallel(config.parallel, seed=config.train.seed)
    try:
        preset = loader.resolve_preset(config.model)
        tokenizer = run_inputs.load_run_tokenizer(config.model, preset)
        dataset = run_inputs.load_dataset(config.data, tokenizer)
        path = pathlib.Path(output) if output else resolve_reference_path(config.train, config.data)
        if path.exists() and not overwrite:
            existing = _existing_table(path, dataset, roles, run_inputs.model_identity(config.model, preset))
            return {"path": str(path), "count": existing.count, "roles": list(existing.roles),
                    "seconds": time.perf_counter() - start, "hash": existing.hash, "reused": True}
        chunks = run_inputs.build_initial_model(config.model, config.parallel, preset)
        layout = resolve_layout(config.train.layout, run_inputs.attention_backend_of(chunks))
        collator = Collator.for_model(config.model, parallel, layout, config.train.micro_batch_pairs,
                                      pad_token_id=run_inputs.pad_token_id(tokenizer), vocab_size=preset.vocab_size)
        scorer = ReferenceScorer(chunks, roles, collator, head=config.model.logprob_head)
        group = config.train.micro_batch_pairs * max(8, 2 * config.parallel.pp)
        by_role = score_dataset(scorer, dataset, group, progress=progress)
        logps = {role: torch.tensor(values, dtype=torch.float32) for role, values in by_role.items()}
        table = ReferenceTable(roles=roles, ids=list(dataset["id"]), logps=logps,
                               dataset_hash=dataset_fingerprint(dataset, roles),
                               model_identity=run_inputs.model_identity(config.model, preset))
        if run_inputs.is_rank0():
            table.to_file(path)
        run_inputs.barrier()
        return {"path": str(path), "count": table.count, "roles": list(roles),
                "seconds": time.perf_counter() - start, "hash": table.hash, "reused": False}
    finally:
        if created:
            destroy_parallel()
