"""The resumable stage runner shared by `solopo experiment` and `solopo demo` (experiment/stages.py)."""

import json
import pathlib
import sys

import pytest

from megatron_solopo.experiment.stages import Stage, StageRunner


def _touch(path: pathlib.Path) -> list[str]:
    return [sys.executable, "-c", f"import pathlib; p = pathlib.Path({str(path)!r}); "
                                  "p.write_text(p.read_text() + 'x' if p.exists() else 'x')"]


def test_finished_stages_are_skipped_and_a_failure_names_the_stage(tmp_path):
    counter = tmp_path / "count.txt"
    fail_flag = tmp_path / "fail"
    fail_flag.write_text("1")
    maybe_fail = [sys.executable, "-c", f"import pathlib, sys; sys.exit(1 if pathlib.Path({str(fail_flag)!r}).exists() else 0)"]
    stages = [Stage("one", "first", _touch(counter)), Stage("two", "second", maybe_fail),
              Stage("three", "third", lambda: _touch(counter))]
    messages = []
    runner = StageRunner(tmp_path / "run", log=messages.append)
    with pytest.raises(SystemExit, match="stage 'two' \\(second\\) failed with exit code 1"):
        runner.run(stages)
    assert counter.read_text() == "x" and runner.done("one") and runner.done("two") is None
    fail_flag.unlink()
    seconds = runner.run(stages)  # resumes: 'one' is not run again
    assert counter.read_text() == "xx"
    assert set(seconds) == {"one", "two", "three"}
    marker = json.loads((tmp_path / "run" / "stages" / "three.json").read_text())
    assert marker["name"] == "three" and marker["seconds"] >= 0
    assert any("done earlier" in m and "skipped" in m for m in messages)


def test_stage_names_must_be_unique(tmp_path):
    with pytest.raises(ValueError, match="unique"):
        StageRunner(tmp_path).run([Stage("a", "x", ["true"]), Stage("a", "y", ["true"])])


def test_demo_plans_its_stages_with_the_shared_runner(tmp_path):
    from megatron_solopo.demo import plan_stages

    stages = plan_stages(tmp_path / "run", tmp_path / "demo.yaml", tmp_path / "model", ["train.steps=2"])
    assert [s.name for s in stages] == ["data", "train", "eval-base", "eval-trained", "compare"]
    train = stages[1].command()
    assert train[1:4] == ["-m", "megatron_solopo.cli", "train"] and "train.steps=2" in train
