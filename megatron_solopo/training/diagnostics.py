"""Training diagnostics: what the loss does to each log-prob, the SoLo-RA term's share of the gradient,
and a fixed set of held-out pairs scored before and after training (docs/training.md "Diagnostics").

Three pieces, from cheap to costly:

- `sequence_diagnostics` (every step, train.diagnostics): from the micro-batch's own per-sequence sums,
  the mean log-prob per response token of every scored sequence (the inputs of SimPO/ORPO's rewards),
  the chosen response's gap short - long, and the "push" of each loss term on each mean log-prob,
  push = -dl/d(mean logp) per pair (positive: gradient descent raises that log-prob). No model pass.
- `po_term_loss` + `capture_gradient` + `gradient_split` (solo mode, logged steps, train.ra_grad_share):
  one extra forward/backward with the loss minus its RA term gives g_PO; the step's own gradient is
  g = g_PO + g_RA. Norms are taken over the optimizer's own gradient list
  (`get_grads_for_grad_norm`: TP duplicates and shared embeddings counted once, the distributed
  optimizer's shards) reduced over its own group (`get_grad_stats_parallel_group`), which is how
  Megatron computes the step's grad_norm: the same numbers under every TP/PP/CP/DP layout.
- `HeldOut` (train.heldout_pairs): the first N pairs of a pairs file, kept out of training and scored
  on all four sequences with `step.forward_only`.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import math
import os
import pathlib
import statistics
from collections.abc import Mapping, Sequence
from typing import Any

import torch
import torch.distributed as dist

from megatron_solopo.objectives import SEQUENCES, ObjectiveConfig, logps_key, objective_loss
from megatron_solopo.objectives.losses import resolved_preference_loss
from megatron_solopo.training.reference import ReferenceScorer, score_dataset

__all__ = [
    "CHOSEN_GAP",
    "GRAD_SHARE_KEYS",
    "HELDOUT_POINT",
    "HeldOut",
    "before_cache_path",
    "capture_gradient",
    "grad_share_unsupported",
    "gradient_split",
    "heldout_means",
    "mean_logp_key",
    "po_term_loss",
    "read_before_cache",
    "read_metrics_file",
    "select_heldout",
    "sequence_diagnostics",
    "summarize_metrics",
    "write_before_cache",
]

CHOSEN_GAP = "diag/chosen_gap_short_minus_long"
"""Mean over pairs of mean_logp(y_w | x_short) - mean_logp(y_w | x_long)."""
GRAD_SHARE_KEYS = ("diag/grad_norm_total", "diag/grad_norm_po", "diag/grad_norm_ra", "diag/ra_grad_share",
                   "diag/ra_po_grad_ratio", "diag/grad_cos_ra_po")
HELDOUT_PREFIX = "heldout/"
HELDOUT_POINT = "heldout/point"
"""String field of a held-out record: before | after | step."""


def mean_logp_key(role: str, prefix: str = "diag/") -> str:
    """'diag/short_chosen_mean_logp': the mean log-prob per response token of a sequence."""
    return f"{prefix}{role}_mean_logp"


def _tokens_of(role: str, stats: Mapping[str, torch.Tensor]) -> torch.Tensor:
    return stats["chosen_tokens" if role.endswith("_chosen") else "rejected_tokens"]


# ------------------------------------------------------------------------------------------ per step
def po_term_loss(objective: ObjectiveConfig, stats: Mapping[str, torch.Tensor]) -> torch.Tensor:
    """Solo mode's loss without its SoLo-RA term, summed over the pairs: L_PO(x_short; y_w, y_l) plus
    the optional SFT term, the same function of the same inputs as inside `solopo_loss`."""
    loss, _ = resolved_preference_loss(
        objective.name, stats["short_chosen_logps"], stats["short_rejected_logps"], stats["chosen_tokens"],
        stats["rejected_tokens"], ref_chosen_logps=stats.get("ref_short_chosen_logps"),
        ref_rejected_logps=stats.get("ref_short_rejected_logps"), reduction="sum",
        hparams=objective.resolved_hparams)
    return loss


def _pushes(objective: ObjectiveConfig, stats: Mapping[str, torch.Tensor], roles: Sequence[str]
            ) -> dict[str, torch.Tensor]:
    """{"diag/push_<term>/<role>": sum over pairs of -d l_term / d mean_logp(role)} (term po, and ra in solo)."""
    with torch.enable_grad():
        leaves = {role: stats[logps_key(role)].detach().float().requires_grad_(True) for role in roles}
        probe = {**stats, **{logps_key(role): leaf for role, leaf in leaves.items()}}
        total, _ = objective_loss(objective, probe, reduction="sum")
        terms = {"po": po_term_loss(objective, probe)} if objective.mode == "solo" else {"po": total}
        grads = {name: torch.autograd.grad(loss, list(leaves.values()), allow_unused=True, retain_graph=True)
                 for name, loss in {**terms, "total": total}.items()}
    out: dict[str, torch.Tensor] = {}
    for j, role in enumerate(roles):
        tokens = _tokens_of(role, stats).detach().float()  # d l / d mean = d l / d sum * tokens
        by_term = {name: (torch.zeros_like(tokens) if g[j] is None else g[j].detach()) * tokens
                   for name, g in grads.items()}
        if objective.mode == "solo":
            by_term["ra"] = by_term["total"] - by_term["po"]
        if objective.mode != "solo" or role.startswith("short_"):  # solo: the PO term sees x_short only
            out[f"diag/push_po/{role}"] = -by_term["po"].sum()
        if "ra" in by_term and (role.endswith("_chosen") or "long_rejected" in roles):  # the responses RA aligns
            out[f"diag/push_ra/{role}"] = -by_term["ra"].sum()
    return out


def sequence_diagnostics(objective: ObjectiveConfig, stats: Mapping[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """One micro-batch's diagnostics as sums over its pairs (detached 0-dim tensors; the trainer divides by
    the global pair count): mean log-prob per response token of each scored sequence, the chosen gap
    short - long when both are scored, and the pushes of the loss terms (module docstring)."""
    roles = [role for role in SEQUENCES if logps_key(role) in stats]
    means = {role: stats[logps_key(role)].detach().double() / _tokens_of(role, stats).double() for role in roles}
    out = {mean_logp_key(role): means[role].sum() for role in roles}
    if "short_chosen" in means and "long_chosen" in means:
        out[CHOSEN_GAP] = (means["short_chosen"] - means["long_chosen"]).sum()
    out.update(_pushes(objective, stats, roles))
    return out


# ------------------------------------------------------------------------------------------ gradient share
def _optimizers(optimizer) -> list:
    chained = getattr(optimizer, "chained_optimizers", None)
    return list(chained if chained is not None else [optimizer])


def _is_stub(opt) -> bool:
    """A placeholder optimizer of a rank without parameters in its group: no gradients, but it still joins
    its group's reductions (as Megatron's own grad-norm does)."""
    return bool(getattr(opt, "is_stub_optimizer", False))


def grad_share_unsupported(optimizer) -> str | None:
    """Why the RA gradient share cannot be measured with this optimizer, or None when it can."""
    for opt in _optimizers(optimizer):
        if _is_stub(opt):
            continue
        if getattr(opt, "grad_scaler", None) is not None:
            return "fp16 loss scaling (preparing the gradients twice would update the loss scale twice)"
        if getattr(getattr(opt, "config", None), "use_precision_aware_optimizer", False):
            return "the precision-aware optimizer keeps its gradients elsewhere"
    return None


def _norm_groups(optimizer) -> list[tuple[Any, list[torch.Tensor]]]:
    """[(group, grads)] per optimizer: the tensors and process group Megatron's grad-norm uses."""
    return [(opt.get_grad_stats_parallel_group(), [] if _is_stub(opt) else opt.get_grads_for_grad_norm())
            for opt in _optimizers(optimizer)]


@torch.no_grad()
def capture_gradient(optimizer) -> list[list[torch.Tensor]]:
    """A host (CPU) fp32 copy of the gradient the optimizer's grad-norm reads, after the schedule's
    finalize (DP/CP reduction, 1 / pair count). `prepare_grads` only copies (fp32/bf16), so the step's
    own `optimizer.step()` prepares the same values again."""
    optimizer.prepare_grads()
    return [[grad.detach().to("cpu", dtype=torch.float32, copy=True) for grad in grads]
            for _, grads in _norm_groups(optimizer)]


@torch.no_grad()
def gradient_split(optimizer, po_grads: list[list[torch.Tensor]]) -> dict[str, float]:
    """The step's gradient g (now in the buffers) against g_PO (`capture_gradient` of the PO-only pass):
    ||g_PO||, ||g_RA|| = ||g - g_PO||, ||g_RA|| / ||g||, ||g_RA|| / ||g_PO|| and cos(g_RA, g_PO).
    Collective over each optimizer's grad-stats group; the same numbers on every rank."""
    optimizer.prepare_grads()
    squares = [0.0, 0.0, 0.0]  # ||g||^2, ||g_PO||^2, ||g_RA||^2
    for (group, grads), po in zip(_norm_groups(optimizer), po_grads, strict=True):
        device = grads[0].device if grads else _device()
        local = torch.zeros(3, dtype=torch.float64, device=device)
        for grad, po_grad in zip(grads, po, strict=True):
            g = grad.detach().float()
            p = po_grad.to(g.device)
            local[0] += torch.sum(g * g).double()
            local[1] += torch.sum(p * p).double()
            local[2] += torch.sum((g - p) ** 2).double()
        dist.all_reduce(local, group=group)
        squares = [s + v for s, v in zip(squares, local.tolist())]
    total, po_norm, ra_norm = (math.sqrt(s) for s in squares)
    ratio = lambda a, b: a / b if b > 0 else float("nan")  # noqa: E731
    return {"diag/grad_norm_po": po_norm, "diag/grad_norm_ra": ra_norm, "diag/ra_grad_share": ratio(ra_norm, total),
            "diag/ra_po_grad_ratio": ratio(ra_norm, po_norm),
            "diag/grad_cos_ra_po": ratio(squares[0] - squares[1] - squares[2], 2 * po_norm * ra_norm),
            "diag/grad_norm_total": total}


def _device() -> torch.device:
    from megatron_solopo.parallel.device import compute_device

    return compute_device()


# ------------------------------------------------------------------------------------------ held-out pairs
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

    def score(self, chunks: list, parallel, layout: str, micro_batch_pairs: int, pad_token_id: int,
              vocab_size: int, pad_to_multiple_of: int = 1, head=None) -> dict[str, float]:
        """heldout/* means over the pairs with the model as it is now (forward only, eval mode; the RNG
        states are restored afterwards, so scoring never changes the training run). Collective."""
        from megatron_solopo.training.checkpointing import capture_rng_state, restore_rng_state

        scorer = _PolicyScorer(chunks, SEQUENCES, parallel, layout, micro_batch_pairs, pad_token_id, vocab_size,
                               pad_to_multiple_of=pad_to_multiple_of, head=head)
        group_pairs = micro_batch_pairs * max(8, 2 * parallel.pp_size)  # as `solopo precompute-ref` groups them
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


# ------------------------------------------------------------------------------------------ run summary
def summarize_metrics(records: Sequence[Mapping[str, Any]], heldout: HeldOut | None = None) -> dict[str, Any]:
    """The run_summary.json `diagnostics` entry from a run's metrics.jsonl records (resumed runs
    included): the held-out before/after means, the mean RA gradient share over the steps that measured
    it, and the diag/* values of the first and the last logged step."""
    steps = [r for r in records if isinstance(r.get("step"), int) and "loss" in r]
    out: dict[str, Any] = {}
    for key in ("diag/ra_grad_share", "diag/ra_po_grad_ratio", "diag/grad_cos_ra_po"):
        values = [float(r[key]) for r in steps if isinstance(r.get(key), (int, float)) and math.isfinite(r[key])]
        if values:
            out[key.replace("diag/", "") + "_mean"] = statistics.fmean(values)
    out["grad_share_steps"] = sum(isinstance(r.get("diag/ra_grad_share"), (int, float)) for r in steps)
    diag_steps = [r for r in steps if any(k.startswith("diag/") for k in r)]
    if diag_steps:
        for name, record in (("first_step", diag_steps[0]), ("last_step", diag_steps[-1])):
            out[name] = {"step": record["step"], **{k: v for k, v in record.items() if k.startswith("diag/")}}
    points = {r.get(HELDOUT_POINT): r for r in records if r.get(HELDOUT_POINT) in ("before", "after")}
    if heldout is not None or points:
        out["heldout"] = {"pairs": len(heldout.samples) if heldout else None,
                          "source": heldout.source if heldout else None,
                          "ids": heldout.ids if heldout else None,
                          **{point: ({k: v for k, v in points[point].items() if k.startswith(HELDOUT_PREFIX)
                                      and k != HELDOUT_POINT} if point in points else None)
                             for point in ("before", "after")}}
    return out


def read_metrics_file(path: str | pathlib.Path) -> list[dict[str, Any]]:
    """metrics.jsonl records, skipping lines that do not parse (a crash mid-write)."""
    records = []
    path = pathlib.Path(path)
    if not path.is_file():
        return records
    for line in path.read_text(encoding="utf-8").splitlines():
        try:
            record = json.loads(line)
        except json.JSONDecodeError:
            continue
        if isinstance(record, dict):
            records.append(record)
    return records
