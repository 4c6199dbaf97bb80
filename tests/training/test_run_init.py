"""Where the initial weights come from: a HF directory, a converted checkpoint, a training checkpoint.

A tiny random Llama in HF format (the sample tokenizer's 256 tokens) is the starting point. The
reference log-probs that `precompute-ref` computes from it must equal what transformers computes
from the same files (so the weights really were loaded, through the whole run machinery); training
from its converted Megatron checkpoint must start at the same loss; a training checkpoint then serves
as `model.checkpoint` of another run (architecture and tokenizer read from the checkpoint itself).
"""

from __future__ import annotations

import json
import pathlib

import pytest

from dist_utils import run_distributed

REPO = pathlib.Path(__file__).resolve().parents[2]
CONFIG = REPO / "examples" / "configs" / "tiny_cpu.yaml"


def _hf_response_logps(hf_dir: pathlib.Path, input_ids: list[int], loss_mask: list[int]) -> float:
    """sum_t log p(token_t | tokens_<t) over response tokens, with transformers."""
    import torch
    import transformers

    model = transformers.AutoModelForCausalLM.from_pretrained(str(hf_dir), torch_dtype=torch.float32).eval()
    with torch.no_grad():
        logits = model(torch.tensor([input_ids])).logits[0].float()  # [s, V]
    logprobs = torch.log_softmax(logits[:-1], dim=-1).gather(1, torch.tensor(input_ids[1:]).unsqueeze(1)).squeeze(1)
    return float((logprobs * torch.tensor(loss_mask[1:], dtype=torch.float32)).sum())


def _worker(rank: int, world_size: int, tmp: str):
    import os

    os.chdir(REPO)
    from tiny_models import build_tiny_llama

    from megatron_solopo.config import load_config
    from megatron_solopo.convert import convert_hf_to_mcore
    from megatron_solopo.data.bundled import sample_tokenizer_dir
    from megatron_solopo.data.tokenization import load_tokenizer
    from megatron_solopo.parallel import init_process_group
    from megatron_solopo.training.loop import train
    from megatron_solopo.training.reference import ReferenceTable, precompute_reference
    from megatron_solopo.training.run_inputs import load_dataset

    tmp = pathlib.Path(tmp)
    init_process_group()
    hf_dir = pathlib.Path(build_tiny_llama(tmp / "hf", load_tokenizer(sample_tokenizer_dir()), hidden_size=32))
    common = [f"data.cache_dir={tmp / 'cache'}", "train.steps=1", "train.global_batch_pairs=2",
              "train.micro_batch_pairs=1", "train.warmup_steps=0", "model.tokenizer=null", "model.preset=tiny"]

    def config(name: str, *overrides: str):
        return load_config(CONFIG, common + [f"train.output_dir={tmp / name}", *overrides])

    out: dict = {}
    dpo = ["objective.name=dpo", "objective.lam=null", f"train.reference_path={tmp / 'ref.pt'}"]
    precompute_reference(config("ref", f"model.hf_model={hf_dir}", *dpo), progress=False)
    table = ReferenceTable.from_file(tmp / "ref.pt")
    hf_config = config("ref", f"model.hf_model={hf_dir}", *dpo)
    dataset = load_dataset(hf_config.data, load_tokenizer(hf_dir))
    row = dataset[0]
    out["ref_megatron"] = float(table.logps["long_chosen"][0])
    out["ref_hf"] = _hf_response_logps(hf_dir, row["long_chosen_input_ids"], row["long_chosen_loss_mask"])
    out["identity"] = table.model_identity

    from_hf = train(config("from_hf", f"model.hf_model={hf_dir}"))
    convert_hf_to_mcore(hf_dir, tmp / "mcore", dtype="fp32", log=lambda *a: None)
    from_mcore = train(config("from_mcore", f"model.checkpoint={tmp / 'mcore'}"))
    trained = tmp / "from_hf" / "checkpoints" / "step_000001"
    from_trained = train(config("from_trained", f"model.checkpoint={trained}", "train.steps=2"))
    out["losses"] = {name: s.last_metrics["loss"] for name, s in
                     (("hf", from_hf), ("mcore", from_mcore), ("trained", from_trained))}
    out["trained_marker"] = json.loads((trained / "solopo_checkpoint.json").read_text())
    from megatron_solopo.checkpoint import read_marker

    out["kinds"] = {"mcore": read_marker(tmp / "mcore").kind, "trained": read_marker(trained).kind}
    out["trained_assets"] = sorted(p.name for p in (trained / "hf_assets").iterdir())
    # a training checkpoint exports back to HF (its common state also holds optimizer/train state)
    from megatron_solopo.convert import convert_mcore_to_hf

    convert_mcore_to_hf(trained, tmp / "exported", dtype="fp32", log=lambda *a: None)
    out["export_logps"] = _hf_response_logps(tmp / "exported", row["long_chosen_input_ids"],
                                             row["long_chosen_loss_mask"])
    return out


@pytest.fixture(scope="module")
def result(tmp_path_factory):
    return run_distributed(_worker, 1, str(tmp_path_factory.mktemp("init")))[0]


def test_weights_from_hf_match_transformers(result):
    assert result["ref_megatron"] == pytest.approx(result["ref_hf"], rel=1e-4, abs=1e-3)
    assert "hf" in result["identity"]["weights"]  # identified by the safetensors content, not a seed


def test_converted_checkpoint_starts_where_the_hf_model_does(result):
    losses = result["losses"]
    assert losses["mcore"] == pytest.approx(losses["hf"], rel=1e-5)


def test_training_checkpoint_is_a_model_checkpoint(result):
    marker = result["trained_marker"]
    assert marker["preset"]["hidden_size"] == 32 and marker["dtype"] == "fp32"
    # both markers carry a preset; the kind tells a training checkpoint from a converted one
    assert marker["kind"] == "trained"
    assert result["kinds"] == {"mcore": "converted", "trained": "trained"}
    assert {"config.json", "tokenizer.json"} <= set(result["trained_assets"])
    # the run from the trained weights continued from them: its loss is not the HF model's first loss
    assert result["losses"]["trained"] != pytest.approx(result["losses"]["hf"], rel=1e-6)


def test_training_checkpoint_exports_to_hf(result):
    # the exported model is the trained one: readable by transformers and no longer the initial model
    assert result["export_logps"] < 0
    assert result["export_logps"] != pytest.approx(result["ref_hf"], rel=1e-6)
