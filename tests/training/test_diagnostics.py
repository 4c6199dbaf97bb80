"""Training diagnostics (training/diagnostics.py) against computations that do not use them.

One spawned process runs `train` (the loop `solopo train` runs) on the packaged sample pairs with the tiny
preset, for every SoLo-X objective. A wrapper around `step.train_step` recomputes, before each step, what
the step should log, without any of the trainer's machinery: a separate plain GPTModel holding the same
weights scores every sequence from its full logits (log_softmax at the response positions), the losses come
from the public `solopo_loss` / `preference_loss`, and the gradients of the PO and RA parts from
torch.autograd over the plain model's parameters. The logged values (metrics.jsonl, TensorBoard,
run_summary.json) must match those. A second run without the diagnostics must follow the same losses,
gradient norms and held-out values exactly (the extra pass changes nothing).

A 2-process group checks that the RA gradient share is the same under data parallelism (gradients
all-reduced), tensor parallelism (sharded parameters) and the distributed optimizer (sharded gradients).
"""

from __future__ import annotations

import json
import math
import os
import pathlib
import shutil

import pytest

from dist_utils import run_distributed

REPO = pathlib.Path(__file__).resolve().parents[2]
PAIRS = REPO / "megatron_solopo" / "resources" / "sample" / "pairs.jsonl"
HELDOUT = 4
STEPS = 3
OBJECTIVES = {"orpo": "  lam: 0.1\n  alpha: 1.0\n", "simpo": "  beta: 2.0\n  gamma: 1.0\n  alpha: 1.0\n",
              "dpo": "  beta: 0.1\n  alpha: 3.0\n", "ipo": "  beta: 0.1\n  alpha: 1.0\n"}

YAML = """\
model:
  preset: tiny
  tokenizer: megatron_solopo/resources/sample/tokenizer
  attention_backend: sdpa
objective:
  name: {name}
  mode: solo
{hparams}data:
  pairs_path: megatron_solopo/resources/sample/pairs.jsonl
  cache_dir: {cache}
train:
  output_dir: {output}
  steps: {steps}
  global_batch_pairs: 2
  micro_batch_pairs: 1
  warmup_steps: 0
  save_every: 0
  lr: 3.0e-3
  seed: 1234
  reference: {reference}
  tensorboard: {tensorboard}
  diagnostics: {diagnostics}
  ra_grad_share: {diagnostics}
  heldout_pairs: {heldout}
"""


# ------------------------------------------------------------------------------------------ the reference
class _Reference:
    """Wraps step.train_step: before each step, the values it should log, from a plain model with the same
    weights (no response-only head, no batching, no schedule, no DDP)."""

    def __init__(self, real_step, samples_by_id):
        self.real_step, self.samples_by_id = real_step, samples_by_id
        self.plain, self.steps, self.weights = None, [], []

    def _plain_model(self, chunks, parallel):
        from megatron_solopo.model import ModelConfig, get_preset
        from megatron_solopo.model.builder import build_model_chunks
        from megatron_solopo.training.run_state import capture_rng_state, restore_rng_state

        if self.plain is None:
            rng = capture_rng_state()  # building draws random weights: leave the run's RNG as it was
            self.plain = build_model_chunks(get_preset("tiny"), parallel, ModelConfig(attention_backend="sdpa"))[0]
            restore_rng_state(rng)
        return self.plain

    def __call__(self, chunks, optimizer, scheduler, microbatches, objective, parallel, step_index, head=None,
                 **kwargs):
        import torch

        self.weights.append(_weights(chunks))
        plain = self._plain_model(chunks, parallel)
        load_weights(plain, self.weights[-1])
        ids = [sample_id for mb in microbatches for sample_id in mb.sample_ids]
        refs = {}
        for mb in microbatches:
            for key, values in mb.reference_logps.items():
                refs.setdefault(key, []).extend(values.tolist())
        expected = expected_step_values(plain, [self.samples_by_id[i] for i in ids],
                                        {k: torch.tensor(v) for k, v in refs.items()}, objective)
        result = self.real_step(chunks, optimizer, scheduler, microbatches, objective, parallel, step_index,
                                head=head, **kwargs)
        self.steps.append({"step": step_index, "ids": ids, "expected": expected,
                           "kwargs": {k: bool(v) for k, v in kwargs.items()}})
        self.weights[-1] = (self.weights[-1], _weights(chunks))  # (before, after) this step
        return result


def _unwrap(chunk):
    while hasattr(chunk, "module"):
        chunk = chunk.module
    return chunk


def _weights(chunks):
    return {name: param.detach().clone() for name, param in _unwrap(chunks[0]).named_parameters()}


def load_weights(model, weights):
    import torch

    with torch.no_grad():
        for name, param in model.named_parameters():
            param.copy_(weights[name])


def sequence_logp_sums(model, sample, role):
    """Sum of log p(token) over the response of one sequence, from the model's full logits."""
    import torch

    ids = torch.tensor(sample[f"{role}_input_ids"], dtype=torch.long).view(1, -1)
    mask = torch.tensor(sample[f"{role}_loss_mask"], dtype=torch.bool)
    positions = torch.arange(ids.shape[1]).view(1, -1)
    logits = model(ids, positions, None)  # [1, L, V]
    logps = torch.log_softmax(logits.float(), dim=-1)[0, :-1].gather(-1, ids[0, 1:, None])[:, 0]  # token t+1 | <= t
    return logps[mask[1:]].sum()


def expected_step_values(model, samples, refs, objective):
    """What the step logs for these pairs: mean log-probs, pushes and gradient norms (plain autograd)."""
    import torch

    from megatron_solopo.objectives import objective_hparam_specs, preference_loss, solopo_loss

    roles = ("short_chosen", "short_rejected", "long_chosen")
    tokens = {kind: torch.tensor([float(sum(s[f"short_{kind}_loss_mask"])) for s in samples])
              for kind in ("chosen", "rejected")}
    sums = {role: torch.stack([sequence_logp_sums(model, s, role) for s in samples]) for role in roles}
    means = {role: sums[role] / tokens[role.split("_")[1]] for role in roles}
    hparams = dict(objective.resolved_hparams)
    po_hparams = {k: hparams[k] for k in objective_hparam_specs(objective.name)}
    ref = {f"ref_{role}_logps": refs[f"ref_{role}_logps"] for role in roles if f"ref_{role}_logps" in refs}
    po_refs = {"ref_chosen_logps": ref.get("ref_short_chosen_logps"),
               "ref_rejected_logps": ref.get("ref_short_rejected_logps")}

    def losses(s):
        total, _ = solopo_loss(objective.name, s["short_chosen"], s["short_rejected"], s["long_chosen"],
                               tokens["chosen"], tokens["rejected"], reduction="mean", **ref, **hparams)
        po, _ = preference_loss(objective.name, s["short_chosen"], s["short_rejected"], tokens["chosen"],
                                tokens["rejected"], reduction="mean", **po_refs, **po_hparams)
        return total, po

    params = [p for p in model.parameters()]
    total, po = losses(sums)
    g_total = torch.autograd.grad(total, params, retain_graph=True)
    g_po = torch.autograd.grad(po, params)
    norm = lambda grads: math.sqrt(sum(float((g.double() ** 2).sum()) for g in grads))  # noqa: E731
    g_ra = [t - p for t, p in zip(g_total, g_po)]
    dot = sum(float((r.double() * p.double()).sum()) for r, p in zip(g_ra, g_po))
    # pushes: -d l_pair / d mean_logp averaged over pairs = -d (pair-mean loss) / d mean_logp summed over pairs
    leaves = {role: means[role].detach().clone().requires_grad_(True) for role in roles}
    total_m, po_m = losses({role: leaves[role] * tokens[role.split("_")[1]] for role in roles})
    d_total = torch.autograd.grad(total_m, list(leaves.values()), retain_graph=True)
    d_po = torch.autograd.grad(po_m, list(leaves.values()), allow_unused=True)
    out = {f"diag/{role}_mean_logp": float(means[role].detach().mean()) for role in roles}
    out["diag/chosen_gap_short_minus_long"] = float((means["short_chosen"] - means["long_chosen"]).detach().mean())
    for j, role in enumerate(roles):
        po_j = 0.0 if d_po[j] is None else float(d_po[j].sum())
        if role.startswith("short_"):
            out[f"diag/push_po/{role}"] = -po_j
        if role.endswith("_chosen"):  # chosen-only SoLo-RA: the rejected response has no RA push
            out[f"diag/push_ra/{role}"] = -(float(d_total[j].sum()) - po_j)
    out.update({"grad_norm": norm(g_total), "diag/grad_norm_po": norm(g_po), "diag/grad_norm_ra": norm(g_ra),
                "diag/grad_cos_ra_po": dot / (norm(g_ra) * norm(g_po))})
    out["diag/ra_grad_share"] = out["diag/grad_norm_ra"] / out["grad_norm"]
    out["diag/ra_po_grad_ratio"] = out["diag/grad_norm_ra"] / out["diag/grad_norm_po"]
    return out


def expected_heldout(model, samples):
    import torch

    out = {}
    with torch.no_grad():
        means = {role: [float(sequence_logp_sums(model, s, role)) / sum(s[f"{role}_loss_mask"]) for s in samples]
                 for role in ("short_chosen", "short_rejected", "long_chosen", "long_rejected")}
    for role, values in means.items():
        out[f"heldout/{role}_mean_logp"] = sum(values) / len(values)
    out["heldout/chosen_gap_short_minus_long"] = sum(
        a - b for a, b in zip(means["short_chosen"], means["long_chosen"])) / len(samples)
    return out


# ------------------------------------------------------------------------------------------ the runs
def _tensorboard_scalars(directory: pathlib.Path) -> dict:
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    acc = EventAccumulator(str(directory), size_guidance={"scalars": 0})
    acc.Reload()
    return {tag: [(e.step, e.value) for e in acc.Scalars(tag)] for tag in acc.Tags()["scalars"]}


def _worker(rank: int, world_size: int, tmp: str):
    os.chdir(REPO)  # the sample data paths are relative to the repository
    from megatron_solopo.config import load_config
    from megatron_solopo.data.tokenization import load_tokenized_pairs
    from megatron_solopo.parallel import init_process_group
    from megatron_solopo.training import loop as loop_module  # train_step is looked up there
    from megatron_solopo.training.loop import train

    init_process_group()
    tmp = pathlib.Path(tmp)
    real_step = loop_module.train_step
    out = {}
    runs = [("orpo", True, STEPS, HELDOUT), ("orpo-off", False, STEPS, HELDOUT),
            *((name, True, 2, 0) for name in ("simpo", "dpo", "ipo"))]
    for run, diagnostics, steps, heldout in runs:
        name = run.split("-")[0]
        text = YAML.format(name=name, hparams=OBJECTIVES[name], cache=tmp / "cache", output=tmp / run, steps=steps,
                           reference="online" if name in ("dpo", "ipo") else "none",
                           tensorboard=str(run == "orpo").lower(), diagnostics=str(diagnostics).lower(),
                           heldout=heldout)
        (tmp / f"{run}.yaml").write_text(text)
        config = load_config(tmp / f"{run}.yaml")
        dataset = load_tokenized_pairs(config.data.pairs_path, _tokenizer(config), config.data)
        samples_by_id = {row["id"]: dict(row) for row in dataset}
        reference = _Reference(real_step, samples_by_id)
        loop_module.train_step = reference
        try:
            summary = train(config)
        finally:
            loop_module.train_step = real_step
        record = {"final_step": summary.final_step, "steps": reference.steps,
                  "metrics": [json.loads(line) for line in (tmp / run / "metrics.jsonl").read_text().splitlines()],
                  "summary": json.loads((tmp / run / "run_summary.json").read_text())}
        if heldout:
            first_ids = [json.loads(line)["id"] for line in PAIRS.read_text().splitlines()[:heldout]]
            held = [samples_by_id[i] for i in first_ids]
            model = reference.plain
            load_weights(model, reference.weights[0][0])
            before = expected_heldout(model, held)
            load_weights(model, reference.weights[-1][1])
            record.update(heldout_ids=first_ids, expected_before=before, expected_after=expected_heldout(model, held))
        if run == "orpo":
            record["tensorboard"] = _tensorboard_scalars(tmp / run / "tensorboard")
        out[run] = record
    out["before_caches"] = {path.name: json.loads(path.read_text())
                            for path in (tmp / "cache").glob("heldout-before-*")}
    return out


def _tokenizer(config):
    from megatron_solopo.checkpoint import loader
    from megatron_solopo.training import run_inputs

    return run_inputs.load_run_tokenizer(config.model, loader.resolve_preset(config.model))


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    pytest.importorskip("tensorboard")
    tmp = tmp_path_factory.mktemp("diagnostics")
    try:
        return run_distributed(_worker, 1, str(tmp), timeout_s=900)[0]
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


def _step_records(run):
    return [r for r in run["metrics"] if "loss" in r]


# ------------------------------------------------------------------------------------------ tests
@pytest.mark.parametrize("name", ["orpo", "simpo", "dpo", "ipo"])
def test_logged_diagnostics_match_a_plain_recomputation(runs, name):
    run = runs[name]
    records = _step_records(run)
    assert [r["step"] for r in records] == [s["step"] for s in run["steps"]] == list(range(1, len(records) + 1))
    compared = 0
    for record, step in zip(records, run["steps"]):
        # log_every 1: every step measures, its PO-only pass on the x_short sequences alone
        assert step["kwargs"] == {"diagnostics": True, "ra_grad_share": True, "po_microbatches": True}
        # |r_short - r_long| has a kink at 0, where DPO/IPO start (policy == reference): its gradient there is
        # 0 for the trainer and +-alpha for a recomputation off by 1e-7, so only the smooth values compare
        at_kink = record["ra/distance"] < 1e-5
        for key, expected in step["expected"].items():
            if at_kink and ("push_ra" in key or "grad" in key or "ra_" in key):
                continue
            assert record[key] == pytest.approx(expected, rel=2e-4, abs=2e-6), (name, record["step"], key)
        compared += not at_kink
        assert record["diag/grad_norm_total"] == pytest.approx(record["grad_norm"], rel=1e-5)  # Megatron's norm
        assert record["diag/extra_time_s"] > 0 and record["step_time_s"] > 0
    assert compared >= 1  # every objective had a step with the RA gradient compared
    # the diagnostic is not trivially satisfied: the RA term has a gradient and SoLo-RA pushes both sides
    assert any(0 < r["diag/ra_grad_share"] for r in records)
    assert any(abs(r["diag/push_ra/short_chosen"]) > 1e-3 for r in records)


def test_the_measurement_does_not_change_the_run(runs):
    on, off = _step_records(runs["orpo"]), _step_records(runs["orpo-off"])
    assert [r["loss"] for r in on] == [r["loss"] for r in off]  # bitwise: the same updates
    assert [r["grad_norm"] for r in on] == [r["grad_norm"] for r in off]
    assert [s["ids"] for s in runs["orpo"]["steps"]] == [s["ids"] for s in runs["orpo-off"]["steps"]]
    assert not any(key.startswith("diag/") for r in off for key in r)
    assert runs["orpo"]["summary"]["diagnostics"]["heldout"]["after"] == \
        runs["orpo-off"]["summary"]["diagnostics"]["heldout"]["after"]
    assert on[-1]["loss"] != on[0]["loss"]  # the model did train


def test_heldout_pairs_are_never_trained_and_scored_before_and_after(runs):
    run = runs["orpo"]
    trained = {sample_id for step in run["steps"] for sample_id in step["ids"]}
    assert trained and not trained & set(run["heldout_ids"])
    points = {r["heldout/point"]: r for r in run["metrics"] if "heldout/point" in r}
    assert points["before"]["step"] == 0 and points["after"]["step"] == STEPS
    for point in ("before", "after"):
        for key, expected in run[f"expected_{point}"].items():
            assert points[point][key] == pytest.approx(expected, rel=1e-4, abs=1e-5), (point, key)
        assert points[point]["heldout/pairs"] == HELDOUT
    # training moved the held-out log-probs (the "after" is not a copy of the "before")
    assert points["after"]["heldout/short_chosen_mean_logp"] != points["before"]["heldout/short_chosen_mean_logp"]
    summary = run["summary"]["diagnostics"]
    assert summary["heldout"]["ids"] == run["heldout_ids"] and summary["heldout"]["pairs"] == HELDOUT
    # the initial model's scores are cached (in data.cache_dir: the pairs are the training file's): the run
    # without diagnostics, from the same model and pairs, read them instead of scoring again
    logged_before = {k: v for k, v in points["before"].items() if k.startswith("heldout/") and k != "heldout/point"}
    assert list(runs["before_caches"].values()) == [logged_before]
    for point in ("before", "after"):
        logged = {k: v for k, v in points[point].items() if k.startswith("heldout/") and k != "heldout/point"}
        assert summary["heldout"][point] == logged


def test_run_summary_and_tensorboard_hold_the_diagnostics(runs):
    run = runs["orpo"]
    records = _step_records(run)
    summary = run["summary"]["diagnostics"]
    shares = [r["diag/ra_grad_share"] for r in records]
    assert summary["ra_grad_share_mean"] == pytest.approx(sum(shares) / len(shares))
    assert summary["grad_share_steps"] == len(records)
    assert summary["first_step"]["step"] == 1 and summary["last_step"]["step"] == STEPS
    assert summary["last_step"]["diag/long_chosen_mean_logp"] == records[-1]["diag/long_chosen_mean_logp"]
    scalars = run["tensorboard"]
    for key in ("diag/short_chosen_mean_logp", "diag/long_chosen_mean_logp", "diag/chosen_gap_short_minus_long",
                "diag/ra_grad_share", "diag/push_ra/short_chosen"):
        assert [(step, pytest.approx(value, rel=1e-6)) for step, value in scalars[key]] == \
            [(r["step"], r[key]) for r in records]
    before = next(r for r in run["metrics"] if r.get("heldout/point") == "before")
    assert scalars["heldout/long_chosen_mean_logp"][0] == (0, pytest.approx(before["heldout/long_chosen_mean_logp"]))


# ------------------------------------------------------------------------------------------ layouts
def _layout_share(samples, tp, distributed_optimizer=False, po_term_only=True):
    """po_term_only: the PO-only pass reads the x_short sequences alone (Collator.po_term_microbatches, as the
    run loop does); False: the step's own micro-batches (the long chosen sequence adds cost, not gradient)."""
    from step_helpers import build_layout, data_parallel_share

    from megatron_solopo.objectives import ObjectiveConfig
    from megatron_solopo.training.batching import Collator
    from megatron_solopo.training.config import TrainConfig
    from megatron_solopo.training.optim import build_training_objects
    from megatron_solopo.training.step import train_step

    objective = ObjectiveConfig(name="orpo", mode="solo", lam=0.1, alpha=1.0)
    parallel, chunks = build_layout(tp, 1, 1, "sdpa")
    train = TrainConfig(lr=1e-3, distributed_optimizer=distributed_optimizer)
    chunks, optimizer, scheduler = build_training_objects(chunks, train, total_steps=2)
    collator = Collator(parallel, "packed", 1)
    share = data_parallel_share(samples)
    microbatches = collator.microbatches(share, objective)
    po_microbatches = collator.po_term_microbatches(share, objective) if po_term_only else None
    if po_term_only:
        assert [mb.roles for mb in po_microbatches] == [("short_chosen", "short_rejected")] * len(microbatches)
    result = train_step(chunks, optimizer, scheduler, microbatches, objective, parallel, step_index=1,
                        diagnostics=True, ra_grad_share=True, po_microbatches=po_microbatches)
    return {key: value for key, value in result.metrics.items() if key.startswith("diag/")} | \
        {"grad_norm": result.grad_norm}


def _layout_worker(rank: int, world_size: int):
    from step_helpers import build_layout, make_samples

    from megatron_solopo.objectives import ObjectiveConfig

    samples = make_samples(4, seed=7)
    out = {"dp2": _layout_share(samples, tp=1), "tp2": _layout_share(samples, tp=2, po_term_only=False),
           "dp2_distopt": _layout_share(samples, tp=1, distributed_optimizer=True)}
    # the reference: plain autograd on one unwrapped TP=1 model over all pairs (no schedule, DDP, optimizer)
    _, chunks = build_layout(1, 1, 1, "sdpa")
    objective = ObjectiveConfig(name="orpo", mode="solo", lam=0.1, alpha=1.0)
    out["plain"] = expected_step_values(_unwrap(chunks[0]), samples, {}, objective)
    return out


@pytest.fixture(scope="module")
def layouts():
    return run_distributed(_layout_worker, 2)


@pytest.mark.parametrize("layout", ["dp2", "tp2", "dp2_distopt"])
def test_ra_grad_share_is_the_same_under_every_layout(layouts, layout):
    for rank_result in layouts:
        got, plain = rank_result[layout], rank_result["plain"]
        for key in ("grad_norm", "diag/grad_norm_po", "diag/grad_norm_ra", "diag/ra_grad_share",
                    "diag/ra_po_grad_ratio", "diag/grad_cos_ra_po", "diag/short_chosen_mean_logp",
                    "diag/push_ra/short_chosen"):
            assert got[key] == pytest.approx(plain[key], rel=2e-4, abs=1e-6), (layout, key)


# ------------------------------------------------------------------------------------------ units
def test_heldout_selection_and_its_errors():
    from megatron_solopo.training.config import TrainConfig
    from megatron_solopo.training.heldout import select_heldout

    rows = [{"id": f"q{i}"} for i in range(6)]

    class Rows(list):
        def __getitem__(self, key):
            return [row["id"] for row in self] if key == "id" else list.__getitem__(self, key)

    dataset = Rows(rows)
    assert select_heldout(0, None, dataset, None) == (None, range(6))
    held, positions = select_heldout(2, None, dataset, None, training_path="t.jsonl")
    assert held.ids == ["q0", "q1"] and list(positions) == [2, 3, 4, 5] and held.from_training_pairs
    other = Rows([{"id": "q4"}, {"id": "x"}, {"id": "q1"}])  # another pair set: its first two, by id
    held, positions = select_heldout(2, "other.jsonl", dataset, lambda path: other)
    assert held.ids == ["q4", "x"] and list(positions) == [0, 1, 2, 3, 5] and held.source == "other.jsonl"
    with pytest.raises(ValueError, match=r"train.heldout_pairs=4 but other.jsonl holds only 3"):
        select_heldout(4, "other.jsonl", dataset, lambda path: other)
    with pytest.raises(ValueError, match="train.heldout_pairs=0 holds no pair out"):
        TrainConfig(heldout_every=2)
    with pytest.raises(ValueError, match="heldout_pairs must be an integer >= 0"):
        TrainConfig(heldout_pairs=-1)


def test_a_changed_heldout_set_is_refused_on_resume():
    from megatron_solopo.training.resume import compare_with_checkpoint_config

    old = {"train": {"lr": 1e-3}}  # a checkpoint from before train.heldout_pairs existed: the default (0) held
    assert compare_with_checkpoint_config(old, {"train": {"lr": 1e-3, "heldout_pairs": 0}})[0] == []
    differing, _ = compare_with_checkpoint_config(old, {"train": {"lr": 1e-3, "heldout_pairs": 16,
                                                                  "heldout_pairs_path": "p.jsonl"}})
    assert differing == ["train.heldout_pairs", "train.heldout_pairs_path"]


def test_summary_of_a_metrics_file():
    from megatron_solopo.training.diagnostics import summarize_metrics

    records = [{"step": 0, "heldout/point": "before", "heldout/short_chosen_mean_logp": -1.0},
               {"step": 1, "loss": 1.0, "diag/ra_grad_share": 0.5, "diag/short_chosen_mean_logp": -1.0},
               {"step": 2, "loss": 0.9, "diag/ra_grad_share": 1.5, "diag/short_chosen_mean_logp": -1.25},
               {"step": 2, "heldout/point": "after", "heldout/short_chosen_mean_logp": -1.5}]
    summary = summarize_metrics(records)
    assert summary["ra_grad_share_mean"] == 1.0 and summary["grad_share_steps"] == 2
    assert summary["first_step"] == {"step": 1, "diag/ra_grad_share": 0.5, "diag/short_chosen_mean_logp": -1.0}
    assert summary["last_step"]["diag/short_chosen_mean_logp"] == -1.25
    assert summary["heldout"]["before"] == {"heldout/short_chosen_mean_logp": -1.0}
    assert summary["heldout"]["after"] == {"heldout/short_chosen_mean_logp": -1.5}
    assert "heldout" not in summarize_metrics(records[1:3]) and "ra_grad_share_mean" not in summarize_metrics([])
