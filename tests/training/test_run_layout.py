"""Resume with another parallel layout: a tp=1/dp=2 run's checkpoint continues at tp=2 and at pp=2.

Two gloo processes run four `train` calls: A (4 steps, dp=2), B (the same, stopped after 2 steps),
then C (tp=2) and D (pp=2) resuming B's step-2 checkpoint. dist_checkpointing reshards weights and
Adam moments, the sampler continues at the same global position, so C's and D's steps 3 and 4 match
A's within fp32 tolerance (other layouts sum in another order, so not bitwise).
"""

from __future__ import annotations

import json
import pathlib

import pytest

from dist_utils import run_distributed

REPO = pathlib.Path(__file__).resolve().parents[2]
CONFIG = REPO / "examples" / "configs" / "tiny_cpu.yaml"


def _worker(rank: int, world_size: int, tmp: str):
    import os

    os.chdir(REPO)
    from megatron_solopo.config import load_config
    from megatron_solopo.parallel import init_process_group
    from megatron_solopo.training.loop import train

    tmp = pathlib.Path(tmp)
    init_process_group()

    def run(name: str, *overrides: str):
        base = [f"train.output_dir={tmp / name}", f"data.cache_dir={tmp / 'cache'}", "train.steps=4",
                "train.global_batch_pairs=2", "train.micro_batch_pairs=1", "train.warmup_steps=0",
                "train.save_every=0", "train.lr=2.0e-3"]
        return train(load_config(CONFIG, base + list(overrides)))

    step2 = tmp / "B" / "checkpoints" / "step_000002"
    summaries = {
        "A": run("A"),
        "B": run("B", "train.max_steps_per_run=2"),
        "C": run("C", "parallel.tp=2", f"train.resume={step2}"),
        "D": run("D", "parallel.pp=2", f"train.resume={step2}"),
    }
    records = {name: [json.loads(line) for line in (tmp / name / "metrics.jsonl").read_text().splitlines()]
               for name in summaries}
    return {"records": records, "summaries": {k: (v.start_step, v.final_step, v.stop_reason)
                                              for k, v in summaries.items()}}


@pytest.fixture(scope="module")
def result(tmp_path_factory):
    return run_distributed(_worker, 2, str(tmp_path_factory.mktemp("layouts")))[0]


def test_runs_resume_where_expected(result):
    assert result["summaries"] == {"A": (0, 4, "finished"), "B": (0, 2, "max_steps_per_run"),
                                   "C": (2, 4, "finished"), "D": (2, 4, "finished")}


@pytest.mark.parametrize("layout", ["C", "D"])
def test_other_layout_continues_the_run(result, layout):
    a = {r["step"]: r for r in result["records"]["A"]}
    resumed = result["records"][layout]
    assert [r["step"] for r in resumed] == [3, 4]
    for record in resumed:
        reference = a[record["step"]]
        for key in ("loss", "loss/po", "loss/ra", "rewards/margin", "grad_norm"):
            assert record[key] == pytest.approx(reference[key], rel=2e-4, abs=1e-6), (layout, record["step"], key)
        assert record["lr"] == reference["lr"] and record["tokens"] == reference["tokens"]
    # A's step 3 differs from its step 1: the comparison is not trivially between identical numbers
    assert a[3]["loss"] != a[1]["loss"]
