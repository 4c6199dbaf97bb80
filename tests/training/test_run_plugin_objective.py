"""A newly registered objective with its own hyperparameter trains from a YAML config, and the YAML's
`model.logprob_head` reaches the training step's LM head; one spawned process.

The objective (registered through the public registry API only, nothing in objectives/config.py
knows it) adds its hyperparameter `margin` to every pair's loss and reports it as "loss/margin", so
the value read from YAML is visible, exactly, in the step's loss and metrics.
"""

from __future__ import annotations

import json
import pathlib
import shutil

import pytest

from dist_utils import run_distributed

REPO = pathlib.Path(__file__).resolve().parents[2]
NAME = "plugin_margin"

YAML = """\
model:
  preset: tiny
  tokenizer: megatron_solopo/resources/sample/tokenizer
  attention_backend: auto
  logprob_head: {{chunk_tokens: {chunk_tokens}, recompute: false}}
objective:
  name: plugin_margin
  mode: solo
{hparams}data:
  pairs_path: megatron_solopo/resources/sample/pairs.jsonl
  cache_dir: {cache}
train:
  output_dir: {output}
  steps: 2
  global_batch_pairs: 2
  micro_batch_pairs: 1
  warmup_steps: 0
  save_every: 0
  lr: 1.0e-3
  seed: 1234
"""


def register_plugin():
    """Registers `plugin_margin`: -log sigmoid(a_w - a_l) + margin, reward a(y|x) = logp / |y|."""
    import torch
    import torch.nn.functional as F

    from megatron_solopo.objectives import HParam, PreferenceObjective, register_objective

    def pair_loss(chosen, rejected, hp):
        margin = torch.full_like(chosen.logps, hp["margin"])
        return -F.logsigmoid(chosen.mean_logps - rejected.mean_logps) + margin, {"loss/margin": margin}

    return register_objective(PreferenceObjective(
        name=NAME, pair_loss=pair_loss, reward=lambda seq, hp: seq.mean_logps, needs_reference=False,
        hparams={"margin": HParam(0.0, "constant added to every pair's loss", low=0.0)}), replace=True)


def write_config(tmp: pathlib.Path, run: str, hparams: str = "", chunk_tokens: int = 2048) -> pathlib.Path:
    path = tmp / f"{run}.yaml"
    path.write_text(YAML.format(hparams=hparams, chunk_tokens=chunk_tokens, cache=tmp / "cache",
                                output=tmp / run), encoding="utf-8")
    return path


def _worker(rank: int, world_size: int, tmp: str):
    import os

    os.chdir(REPO)  # the sample data paths are relative to the repository
    from megatron_solopo.config import load_config
    from megatron_solopo.parallel import init_process_group
    from megatron_solopo.training import step
    from megatron_solopo.training.loop import train

    register_plugin()  # in the process that computes the loss
    heads = []
    real_processor = step.make_output_processor

    def recording_processor(head=None):
        heads.append(head)
        return real_processor(head)

    step.make_output_processor = recording_processor
    tmp = pathlib.Path(tmp)
    init_process_group()
    out = {}
    for run, hparams, chunk_tokens in (("default", "", 2048), ("margin", "  hparams: {margin: 0.7}\n", 3)):
        heads.clear()
        config = load_config(write_config(tmp, run, hparams, chunk_tokens))
        summary = train(config)
        out[run] = {"final_step": summary.final_step, "resolved": dict(config.objective.resolved_hparams),
                    "heads": [(h.chunk_tokens, h.recompute) if h is not None else None for h in heads],
                    "records": [json.loads(line) for line in (tmp / run / "metrics.jsonl").read_text().splitlines()
                                if line.strip()]}
    return out


@pytest.fixture(scope="module")
def result(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("plugin")
    try:
        return run_distributed(_worker, 1, str(tmp))[0]
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


def test_registered_objective_trains_with_its_hyperparameter_from_yaml(result):
    default, margin = result["default"], result["margin"]
    assert default["final_step"] == margin["final_step"] == 2
    assert default["resolved"]["margin"] == 0.0 and margin["resolved"]["margin"] == 0.7
    # step 1 runs the same initial model on the same pairs: the losses differ by the margin exactly
    first_default, first_margin = default["records"][0], margin["records"][0]
    assert first_default["loss/margin"] == pytest.approx(0.0, abs=1e-9)
    assert first_margin["loss/margin"] == pytest.approx(0.7, abs=1e-6)
    assert first_margin["loss"] - first_default["loss"] == pytest.approx(0.7, abs=1e-4)
    assert all(record["loss"] == record["loss"] for record in default["records"] + margin["records"])  # finite


def test_logprob_head_from_yaml_reaches_the_step(result):
    assert set(result["default"]["heads"]) == {(2048, False)}
    assert set(result["margin"]["heads"]) == {(3, False)}


def test_unknown_hyperparameter_of_a_registered_objective_names_the_valid_ones(tmp_path):
    from megatron_solopo.config import ConfigError, load_config
    from megatron_solopo.objectives import unregister_objective

    register_plugin()
    try:
        with pytest.raises(ConfigError, match=r"objective.hparams.margn=1.0 is not a hyperparameter of "
                                              r"'plugin_margin' .*accepts \['margin'\]"):
            load_config(write_config(tmp_path, "typo", "  hparams: {margn: 1.0}\n"))
        config = load_config(write_config(tmp_path, "override"), ["objective.hparams.margin=0.25"])
        assert config.objective.resolved_hparams["margin"] == 0.25
    finally:
        unregister_objective(NAME)
