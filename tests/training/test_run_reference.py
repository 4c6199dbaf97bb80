"""Reference log-probs (precompute, verification, online mode) and the NaN stop, in one spawned process.

Analytic anchor: at step 1, before any update, the policy IS the reference, so SoLo-DPO's preference
term is -log sigmoid(0) = ln 2 and its SoLo-RA term is |0 - 0| = 0, whichever way the reference
log-probs arrive (precomputed file or online frozen copy).
"""

from __future__ import annotations

import argparse
import json
import math
import pathlib
import shutil

import pytest

from dist_utils import run_distributed

REPO = pathlib.Path(__file__).resolve().parents[2]
CONFIG = REPO / "examples" / "configs" / "tiny_cpu.yaml"


def _config(tmp: pathlib.Path, name: str, *overrides: str):
    from megatron_solopo.config import load_config

    base = [f"train.output_dir={tmp / name}", f"data.cache_dir={tmp / 'cache'}", "train.steps=2",
            "train.global_batch_pairs=2", "train.micro_batch_pairs=1", "train.warmup_steps=0",
            "train.save_every=0", "objective.name=dpo", "objective.lam=null", "objective.alpha=1.0",
            f"train.reference_path={tmp / 'ref' / 'reference_logps.pt'}", "train.lr=1.0e-3"]
    return load_config(CONFIG, base + list(overrides))


def _catch(fn):
    try:
        fn()
    except Exception as err:  # noqa: BLE001 - the parent asserts on type and message
        return f"{type(err).__name__}: {err}"
    return None


def _worker(rank: int, world_size: int, tmp: str):
    import os

    os.chdir(REPO)  # the sample data paths of tiny_cpu.yaml are relative to the repository
    from megatron_solopo.parallel import init_process_group
    from megatron_solopo.training import reference
    from megatron_solopo.training.run_state import list_checkpoints
    from megatron_solopo.commands.training import PrecomputeRef
    from megatron_solopo.training.loop import train

    tmp = pathlib.Path(tmp)
    init_process_group()  # train() then keeps the group between runs
    out: dict = {}
    # the CLI entry point, as a user runs it
    out["precompute_rc"] = PrecomputeRef.run(argparse.Namespace(
        config=str(CONFIG), output=None, overrides=[f"data.cache_dir={tmp / 'cache'}", "objective.name=dpo",
                                                    "objective.lam=null", "train.micro_batch_pairs=1",
                                                    f"train.reference_path={tmp / 'ref' / 'reference_logps.pt'}"]))
    table = reference.ReferenceTable.from_file(tmp / "ref" / "reference_logps.pt")
    out["table"] = (table.roles, table.count, len(set(table.ids)), float(table.logps["long_chosen"].max()))

    precomputed = train(_config(tmp, "precomputed", "train.reference=precomputed"))
    out["precomputed_metrics"] = _records(tmp / "precomputed")
    online = train(_config(tmp, "online", "train.reference=online", "train.reference_path=null"))
    out["online_metrics"] = _records(tmp / "online")
    out["summaries"] = (precomputed.final_step, online.final_step)

    # mismatches: another initial model, fewer pairs, a reference-free objective with a file
    out["err_model"] = _catch(lambda: train(_config(tmp, "m1", "train.reference=precomputed", "model.init_seed=7")))
    pairs = (REPO / "megatron_solopo/resources/sample/pairs.jsonl").read_text().splitlines()
    out["num_pairs"] = len(pairs)
    (tmp / "fewer.jsonl").write_text("\n".join(pairs[:-1]) + "\n")
    out["err_count"] = _catch(lambda: train(_config(tmp, "m2", f"data.pairs_path={tmp / 'fewer.jsonl'}")))
    out["err_missing"] = _catch(lambda: train(_config(tmp, "m3", f"train.reference_path={tmp / 'nothing.pt'}")))

    # divergence: an absurd lr explodes the weights at step 1 (finite, ~1e30): the update guard stops there,
    # before that step's checkpoint is written
    out["err_nan"] = _catch(lambda: train(_config(tmp, "nan", "objective.name=orpo", "objective.lam=0.1",
                                                  "train.reference=none", "train.reference_path=null",
                                                  "train.lr=1.0e+30", "train.save_every=1", "train.steps=4")))
    out["nan_checkpoints"] = [step for step, _ in list_checkpoints(tmp / "nan")]
    out["nan_records"] = _records(tmp / "nan")

    # the SLURM scripts' stop request: the file exists -> save after the current step, stop resumable
    from megatron_solopo.training.loop import STOP_FILE_ENV

    (tmp / "stop-requested").touch()
    os.environ[STOP_FILE_ENV] = str(tmp / "stop-requested")
    try:
        stopped = train(_config(tmp, "stop", "objective.name=orpo", "objective.lam=0.1", "train.reference=none",
                                "train.reference_path=null", "train.steps=3"))
    finally:
        del os.environ[STOP_FILE_ENV]
    out["stop"] = (stopped.final_step, stopped.stop_reason, stopped.exit_code,
                   [step for step, _ in list_checkpoints(tmp / "stop")])
    return out


def _records(run_dir: pathlib.Path) -> list[dict]:
    return [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines() if line.strip()]


@pytest.fixture(scope="module")
def result(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("reference")
    try:
        return run_distributed(_worker, 1, str(tmp))[0]
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


def test_precompute_writes_one_sum_per_pair_and_role(result):
    assert result["precompute_rc"] == 0
    roles, count, unique_ids, max_long = result["table"]
    assert roles == ("short_chosen", "short_rejected", "long_chosen")  # SoLo-DPO's reference roles
    assert count == unique_ids == result["num_pairs"]
    assert max_long < 0  # sums of log-probabilities


@pytest.mark.parametrize("mode", ["precomputed", "online"])
def test_dpo_anchor_at_step_one_is_ln2(result, mode):
    first = result[f"{mode}_metrics"][0]
    assert first["loss/po"] == pytest.approx(math.log(2.0), abs=1e-6)
    assert first["loss/ra"] == pytest.approx(0.0, abs=1e-6)
    assert first["rewards/margin"] == pytest.approx(0.0, abs=1e-6)


def test_online_and_precomputed_reference_train_alike(result):
    pre, onl = result["precomputed_metrics"], result["online_metrics"]
    assert result["summaries"] == (2, 2)
    assert pre[1]["loss"] != pre[0]["loss"]  # step 2 sees a trained policy
    for a, b in zip(pre, onl):
        assert a["loss"] == pytest.approx(b["loss"], rel=1e-5)
        assert a["rewards/chosen"] == pytest.approx(b["rewards/chosen"], abs=1e-5)


def test_mismatched_reference_is_an_error(result):
    assert result["err_model"].startswith("ReferenceMismatchError")
    assert "another initial model" in result["err_model"] and "weights" in result["err_model"]
    n = result["num_pairs"]
    assert result["err_count"].startswith("ReferenceMismatchError")
    assert f"has {n} pairs but the dataset has {n - 1}" in result["err_count"]
    assert result["err_missing"].startswith("FileNotFoundError") and "solopo precompute-ref" in result["err_missing"]


def test_nan_stops_with_step_and_samples_and_no_broken_checkpoint(result):
    err = result["err_nan"]
    assert err is not None and err.startswith("TrainingDiverged"), err
    assert "step 1" in err and "syn-" in err  # names the step and the pairs' ids
    assert "train.max_param_norm_growth" in err and "train.lr=" in err  # the setting, and how to go on
    assert result["nan_checkpoints"] == []  # the diverged step never reaches a checkpoint
    records = result["nan_records"]
    assert records[-1]["step"] == 1 and "error" in records[-1] and records[-1]["sample_ids"]
    assert not float(records[-1]["param_norm"]) <= 1e6  # exploded (or non-finite, logged as a string)


def test_stop_file_saves_and_stops_resumable(result):
    assert result["stop"] == (1, "stop_file", 75, [1])
