"""Every recipe under examples/configs/recipes loads with the real config classes and says what it claims:
the paper's alpha values, the baselines' sampling context, the context length of its directory, a model
split that divides heads and vocab, and a per-GPU memory estimate that fits 80 GB on the nodes it names."""

import pathlib
import re

import pytest

from megatron_solopo.config import load_config
from megatron_solopo.model.presets import get_preset
from megatron_solopo.plan.layout import plan_layout

RECIPES = pathlib.Path(__file__).resolve().parents[2] / "examples" / "configs" / "recipes"
FILES = sorted(RECIPES.glob("*/*.yaml"))
# the paper's SoLo-RA weights (seeds/001): Qwen2.5-7B alpha 3 (DPO), 1 (SimPO, ORPO); Llama3.1-8B ORPO 4
PAPER_ALPHA = {("qwen2.5-7b", "dpo"): 3.0, ("qwen2.5-7b", "simpo"): 1.0, ("qwen2.5-7b", "orpo"): 1.0,
               ("llama3.1-8b", "orpo"): 4.0}
LONG_TOKENS = {"8k": 8192, "64k": 65536, "128k": 126976}


def test_the_recipe_matrix_is_complete():
    names = {f"{p.parent.name}/{p.stem}" for p in FILES}
    for model in ("qwen2.5-7b", "llama3.1-8b"):
        for algo in ("dpo", "simpo", "orpo"):
            for mode in ("solo", "long", "expand-long"):
                assert f"{model}-8k/{mode}-{algo}" in names
                assert f"smollm2-135m/{mode}-{algo}" in names
            for length in ("64k", "128k"):
                assert {f"{model}-{length}/solo-{algo}", f"{model}-{length}/long-{algo}"} <= names


@pytest.mark.parametrize("path", FILES, ids=lambda p: f"{p.parent.name}/{p.stem}")
def test_recipe_loads_and_matches_its_name(path):
    config = load_config(path)
    mode, algo = path.stem.rsplit("-", 1)
    assert config.objective.name == algo
    assert config.objective.mode == mode.replace("-", "_")
    # long-X samples its pairs on x_long; SoLoPO and expand-long sample on x_short (paper)
    assert config.data.sample_on == ("long" if mode == "long" else "short")
    folder = path.parent.name
    if folder == "smollm2-135m":
        assert config.model.hf_model and (config.parallel.tp, config.parallel.cp) == (1, 1)
        preset, nodes, gpus = get_preset("smollm2-135m"), 1, 1
    else:
        model, length = folder.rsplit("-", 1)
        assert config.model.preset == model and config.data.long_target_tokens == [LONG_TOKENS[length]]
        assert config.data.num_responses == 32 and config.data.sampling_temperature == 0.85
        assert config.train.global_batch_pairs * config.train.steps in range(4900, 5100)  # ~5,000 pairs
        if mode == "solo" and (model, algo) in PAPER_ALPHA:
            assert config.objective.alpha == PAPER_ALPHA[(model, algo)]
        if length != "8k":
            assert config.parallel.cp > 1
        preset, gpus = get_preset(model), 8
        nodes = int(re.search(r"--nodes (\d+)", path.read_text()).group(1))
    plan = plan_layout(config, preset, nodes, gpus, gpu_memory_gib=80)
    assert plan.fits, "\n".join(plan.lines)
    if mode != "solo":
        assert config.objective.alpha is None
    if config.data.max_seq_len_tokens is not None:  # longest sequence the data may produce fits the limit
        assert max(plan.sequences.tokens) <= config.data.max_seq_len_tokens
