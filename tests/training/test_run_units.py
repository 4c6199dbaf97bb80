"""Unit checks of the run machinery: metrics logger, TrainConfig, epoch batching, example configs."""

from __future__ import annotations

import json
import pathlib

import pytest
import torch

from megatron_solopo.training.config import TrainConfig
from megatron_solopo.training.logging import MetricsLogger, format_console_line, read_metrics, truncate_jsonl_after


def test_jsonl_records_and_console(tmp_path):
    lines = []
    log = MetricsLogger(tmp_path, enabled=True, total_steps=3, console=lines.append)
    log.log(1, {"loss": torch.tensor(0.75), "rewards/accuracy": 0.5, "lr": 1e-6, "grad_norm": float("nan")})
    log.log(2, {"loss": 0.5, "loss/ra": 0.25, "sample_ids": ["a", "b"]}, console=False)
    log.close()
    records = read_metrics(tmp_path / "metrics.jsonl")
    assert [r["step"] for r in records] == [1, 2]
    assert records[0]["loss"] == 0.75 and records[0]["grad_norm"] == "nan"  # still valid JSON
    assert records[1]["sample_ids"] == ["a", "b"] and "time" in records[1]
    assert lines == ["step 1/3 | loss 0.7500 | acc 0.50 | gnorm nan | lr 1.00e-06"]


def test_disabled_logger_writes_nothing(tmp_path):
    log = MetricsLogger(tmp_path / "run", enabled=False, total_steps=3, tensorboard=True)
    record = log.log(1, {"loss": 1.0})
    assert record["loss"] == 1.0
    assert not (tmp_path / "run").exists()


def test_resume_drops_records_after_the_resume_step(tmp_path):
    path = tmp_path / "metrics.jsonl"
    path.write_text("".join(json.dumps({"step": s, "loss": s / 10}) + "\n" for s in range(1, 6)) + '{"step": 6, "lo')
    assert truncate_jsonl_after(path, 3) == 3  # steps 4 and 5 and the line cut by a crash
    log = MetricsLogger(tmp_path, enabled=True, total_steps=5, start_step=3, console=lambda line: None)
    log.log(4, {"loss": 0.44})
    assert [(r["step"], r["loss"]) for r in read_metrics(path)] == [(1, 0.1), (2, 0.2), (3, 0.3), (4, 0.44)]


def test_tensorboard_events_are_written(tmp_path):
    pytest.importorskip("tensorboard")
    log = MetricsLogger(tmp_path, enabled=True, total_steps=2, tensorboard=True, console=lambda line: None)
    log.log(1, {"loss": 0.5})
    log.close()
    events = list((tmp_path / "tensorboard").glob("events.out.tfevents.*"))
    assert events and events[0].stat().st_size > 0
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    acc = EventAccumulator(str(tmp_path / "tensorboard"))
    acc.Reload()
    assert [(e.step, e.value) for e in acc.Scalars("loss")] == [(1, 0.5)]


def test_console_line_is_concise():
    line = format_console_line(7, 10, {"loss": 0.693147, "loss/po": 0.6931, "ra/distance": 0.0, "pairs": 8.0})
    assert line == "step 7/10 | loss 0.6931 | po 0.6931 | dist 0.000"


# ------------------------------------------------------------------------------------ TrainConfig
def test_train_config_defaults_and_batch_split():
    config = TrainConfig()
    assert config.num_microbatches(dp_size=2) == 4  # 8 pairs / (1 pair x 2 ranks)
    assert TrainConfig(global_batch_pairs=12, micro_batch_pairs=2).num_microbatches(3) == 2
    with pytest.raises(ValueError, match=r"\(8\) is not divisible .* \(1\) x data-parallel size \(3\)"):
        config.num_microbatches(dp_size=3)
    assert TrainConfig(epochs=2, global_batch_pairs=4).total_steps(num_pairs=10) == 4  # 2 x (10 // 4)
    assert TrainConfig(steps=7, global_batch_pairs=2).total_steps(num_pairs=3) == 7
    with pytest.raises(ValueError, match=r"has 10 preference pairs, fewer than train.global_batch_pairs \(16\)"):
        TrainConfig(global_batch_pairs=16).total_steps(num_pairs=10)
    with pytest.raises(ValueError, match="at most 3"):  # train.steps does not make a too-small dataset work
        TrainConfig(steps=7).total_steps(num_pairs=3)


@pytest.mark.parametrize("kwargs, message", [
    ({"steps": 3, "epochs": 1}, "set one of train.steps"),
    ({"global_batch_pairs": 6, "micro_batch_pairs": 4}, "multiple of train.micro_batch_pairs"),
    ({"lr": 1e-5, "min_lr": 1e-4}, "min_lr"),
    ({"lr_decay": "step"}, "lr_decay='step' is not one of"),
    ({"reference": "frozen"}, "reference='frozen' is not one of"),
    ({"layout": "thd"}, "layout='thd'"),
    ({"steps": 5, "warmup_steps": 5}, "warmup_steps"),
    ({"adam_beta2": 1.0}, "adam_beta2"),
    ({"clip_grad": -1.0}, "clip_grad"),
    ({"keep_last": -1}, "keep_last"),
    ({"micro_batch_pairs": 0}, "micro_batch_pairs must be a positive integer"),
    ({"reference": "online", "reference_path": "x.pt"}, "does not read it"),
    ({"resume": ""}, "train.resume"),
    ({"max_param_norm_growth": 0.5}, "train.max_param_norm_growth"),
    ({"sigterm_grace_s": 0}, "train.sigterm_grace_s"),
])
def test_train_config_rejects_bad_values(kwargs, message):
    with pytest.raises(ValueError, match=message):
        TrainConfig(**kwargs)


def test_wandb_needs_the_package(monkeypatch):
    from megatron_solopo.training import config as config_module

    monkeypatch.setattr(config_module, "wandb_installed", lambda: False)
    with pytest.raises(ValueError, match="pip install wandb"):
        TrainConfig(wandb=True)


def test_reference_mode_follows_the_objective():
    assert TrainConfig().resolve_reference(objective_needs_reference=False) == "none"
    assert TrainConfig().resolve_reference(objective_needs_reference=True) == "precomputed"
    assert TrainConfig(reference="online").resolve_reference(True) == "online"
    with pytest.raises(ValueError, match="needs reference log-probs"):
        TrainConfig(reference="none").resolve_reference(True)
    with pytest.raises(ValueError, match="reference-free"):
        TrainConfig(reference="precomputed").resolve_reference(False)
    assert TrainConfig(resume="runs/x/checkpoints/step_000010").resume_path == "runs/x/checkpoints/step_000010"
    assert TrainConfig(resume="auto").resume_path is None


# ------------------------------------------------------------------------------------ examples
EXAMPLES = sorted((pathlib.Path(__file__).resolve().parents[2] / "examples" / "configs").rglob("*.yaml"))


@pytest.mark.parametrize("path", EXAMPLES, ids=lambda p: str(p.relative_to(p.parents[2])))
def test_example_configs_load(path):
    from megatron_solopo.config import load_config

    config = load_config(path)
    assert config.train.global_batch_pairs % config.train.micro_batch_pairs == 0


def test_steps_skip_an_epochs_incomplete_last_batch():
    from megatron_solopo.data.pair_order import DistributedPairSampler
    from megatron_solopo.training.loop import _next_indices

    # 10 pairs, 4 per step, 2 DP ranks: 2 steps per epoch (8 pairs), the remaining 2 are skipped
    ranks = [DistributedPairSampler(10, dp_rank=r, dp_size=2, seed=3) for r in range(2)]
    steps = [[_next_indices(s, 4) for s in ranks] for _ in range(4)]
    for step in steps:
        assert [len(part) for part in step] == [2, 2]
        assert len(set(step[0]) | set(step[1])) == 4  # the ranks' shares are disjoint
    epoch0 = [i for step in steps[:2] for part in step for i in part]
    epoch1 = [i for step in steps[2:] for part in step for i in part]
    assert len(set(epoch0)) == len(set(epoch1)) == 8  # no pair twice within an epoch
    order0, order1 = ranks[0].epoch_order(0), ranks[0].epoch_order(1)
    assert set(steps[0][0] + steps[0][1]) == set(order0[0:4]) and set(steps[1][0] + steps[1][1]) == set(order0[4:8])
    assert set(steps[2][0] + steps[2][1]) == set(order1[0:4])  # epoch 1 starts at its beginning
    assert ranks[0].epoch == ranks[1].epoch == 1 and ranks[0].position == ranks[1].position == 8
    assert TrainConfig(epochs=2, global_batch_pairs=4).total_steps(10) == 4  # the same count as the loop takes
