"""`solopo eval` with the Megatron backend and on Megatron checkpoints (converted by `solopo convert` and
saved by the trainer): every path must produce the predictions of the HF model it came from."""

import json

from megatron_solopo.cli import main


def _run_eval(capsys, *args):
    code = main(["eval", "--no-progress", *args])
    out = capsys.readouterr().out
    assert code == 0, out
    return out


def test_eval_backends_and_checkpoints_give_the_same_predictions(tiny_hf_dir, tiny_tokenizer, tmp_path, capsys):
    from megatron_solopo.convert import convert_hf_to_mcore, load_hf_into_mcore
    from megatron_solopo.eval.evaluate import ModelSource
    from megatron_solopo.parallel.config import ParallelConfig
    from megatron_solopo.parallel.distributed import destroy_parallel
    from megatron_solopo.training.run_state import TrainState, save_checkpoint

    small = ["eval.suites=[short]", "eval.num_samples=3", "eval.max_new_tokens=6"]
    reports = {}
    # Megatron backend on the HF directory (converted in process)
    _run_eval(capsys, "--hf-model", tiny_hf_dir, "--label", "mcore", *small, "eval.backend=megatron",
              f"eval.output_dir={tmp_path / 'mcore'}")
    # HF backend on the same directory: the same greedy tokens, hence the same predictions
    _run_eval(capsys, "--hf-model", tiny_hf_dir, "--label", "hf", *small, f"eval.output_dir={tmp_path / 'hf'}")
    # a converted Megatron checkpoint, exported to HF in a temporary directory (eval.backend=hf)
    converted = tmp_path / "converted"
    convert_hf_to_mcore(tiny_hf_dir, converted, ParallelConfig(), "fp32")
    _run_eval(capsys, "--checkpoint", str(converted), "--label", "converted", *small,
              f"eval.output_dir={tmp_path / 'converted-eval'}")
    # a training checkpoint (step_N with config.yaml and hf_assets/), loaded directly (eval.backend=megatron);
    # its marker has no preset (the trainer's has one): the architecture comes from the saved config
    run_dir = tmp_path / "run"
    model = load_hf_into_mcore(tiny_hf_dir, ParallelConfig())
    step_dir = save_checkpoint(run_dir, TrainState(step=3, sampler={}), [model],
                               config_yaml=f"model:\n  hf_model: {tiny_hf_dir}\n", tokenizer=tiny_tokenizer)
    destroy_parallel()
    # the marker's kind tells the two apart
    assert ModelSource("megatron", str(converted)).checkpoint_kind() == "converted"
    assert ModelSource("megatron", str(step_dir)).checkpoint_kind() == "trained"
    assert ModelSource("hf", tiny_hf_dir).checkpoint_kind() is None
    _run_eval(capsys, "--checkpoint", str(step_dir), *small, "eval.backend=megatron",
              f"eval.output_dir={tmp_path / 'trained-eval'}")
    for name in ("mcore", "hf", "converted-eval", "trained-eval"):
        reports[name] = json.loads((tmp_path / name / "report.json").read_text())
    predictions = {name: [i["prediction"] for i in r["items"]] for name, r in reports.items()}
    assert predictions["mcore"] == predictions["hf"] == predictions["converted-eval"] == predictions["trained-eval"]
    assert reports["mcore"]["generation"]["path"] == "static-kv-loop"
    assert reports["trained-eval"]["model"]["step"] == 3
    assert reports["trained-eval"]["model"]["label"] == "run/step_000003"
    assert reports["converted-eval"]["model"]["kind"] == "megatron"
