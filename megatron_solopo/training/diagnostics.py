"""Training diagnostics: what the loss does to each log-prob, the SoLo-RA term's share of the gradient,
and a fixed set of held-out pairs scored before and after training (docs/training.md "Diagnostics").

Three pieces, from cheap to costly:

- `sequence_diagnostics` (every step, train.diagnostics): from the micro-batch's own per-sequence sums,
  the mean log-prob per response token of every scored sequence (the inputs of SimPO/ORPO's rewards),
  the chosen response's gap short - long, and the "push" of each loss term on each mean log-prob,
  push = -dl/d(mean logp) per pair (positive: gradient descent raises that log-prob). No model pass.
- `po_term_loss` + `capture_gradient` + `gradient_split` (solo mode, logged steps, train.ra_grad_share):
  one extra forward/backward of the x_short sequences with the loss minus its RA term gives g_PO; the
  step's own gradient is g = g_PO + g_RA. Norms are taken over the optimizer's own gradient list
  (`get_grads_for_grad_norm`: TP duplicates and shared embeddings counted once, the distributed
  optimizer's shards) reduced over its own group (`get_grad_stats_parallel_group`), which is how
  Megatron computes the step's grad_norm: the same numbers under every TP/PP/CP/DP layout.
- held-out pairs (train.heldout_pairs): the first N pairs of a pairs file, kept out of training and
  scored on all four sequences before and after; their own module, training/heldout.py.
"""

from __future__ import annotations

import json
import math
import pathlib
import statistics
from collections.abc import Mapping, Sequence
from typing import TYPE_CHECKING, Any

import torch
import torch.distributed as dist

from megatron_solopo.objectives import (PO_TERM_SEQUENCES, SEQUENCES, ObjectiveConfig, logps_key, objective_loss,
                                        sequence_stats)
from megatron_solopo.objectives.losses import resolved_preference_loss
from megatron_solopo.parallel.device import compute_device

if TYPE_CHECKING:
    from megatron_solopo.training.heldout import HeldOut

__all__ = [
    "CHOSEN_GAP",
    "GRAD_SHARE_KEYS",
    "HELDOUT_POINT",
    "capture_gradient",
    "grad_share_unsupported",
    "gradient_split",
    "mean_logp_key",
    "po_term_loss",
    "read_metrics_file",
    "sequence_diagnostics",
    "summarize_metrics",
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
    chosen, rejected = (sequence_stats(stats, role) for role in PO_TERM_SEQUENCES)
    loss, _ = resolved_preference_loss(objective.name, chosen, rejected, reduction="sum",
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
    return compute_device()


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
