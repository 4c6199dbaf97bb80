"""HF -> Megatron -> HF on tiny random HF models built by transformers: logit parity with the HF
forward (float32, max |diff| < 1e-4) and bit-exact round trips of every tensor, at TP=1, TP=2 and PP=2.

Architectures: Llama (untied, sharded safetensors with an index), Llama with tied embeddings
(SmolLM2 / Llama-3.2 style), Qwen2 with tied embeddings and QKV bias (Qwen2.5-0.5B style), Mistral,
and Llama with llama3 RoPE scaling. Every weight, norms and biases included, is random (HF's own
init leaves norms at 1 and Qwen2's biases at 0, which would hide layout mistakes there).

Two process groups are spawned for the whole module (importing torch + megatron costs ~10 s per
process): one process for the TP=1 paths (the CLI and the API, starting without a process group),
then two processes for TP=2, PP=2 and the export of those checkpoints at TP=1 (two data-parallel
replicas, rank 0 writes).
"""

import json
import pathlib

import pytest
import torch
from dist_utils import run_distributed

SEQ, BATCH, VOCAB = 24, 2, 256
COMMON = dict(hidden_size=64, intermediate_size=128, num_hidden_layers=4, num_attention_heads=4,
              num_key_value_heads=2, vocab_size=VOCAB, max_position_embeddings=4096)
LLAMA3_ROPE = {"rope_type": "llama3", "factor": 8.0, "low_freq_factor": 1.0, "high_freq_factor": 4.0,
               "original_max_position_embeddings": 8192}
ARCHS = ("llama", "llama_tied", "qwen2_tied", "mistral")  # at TP=1, TP=2 and PP=2
ATOL = 1e-4
ASSETS = {"tokenizer_config.json": '{"model_max_length": 4096}', "chat_template.jinja": "{{ messages }}"}


def _hf_model(kind: str):
    from transformers import (
        LlamaConfig,
        LlamaForCausalLM,
        MistralConfig,
        MistralForCausalLM,
        Qwen2Config,
        Qwen2ForCausalLM,
    )

    if kind == "llama":
        return LlamaForCausalLM(LlamaConfig(**COMMON, tie_word_embeddings=False))
    if kind == "llama_tied":
        return LlamaForCausalLM(LlamaConfig(**COMMON, tie_word_embeddings=True, rope_theta=100000.0))
    if kind == "qwen2_tied":
        return Qwen2ForCausalLM(Qwen2Config(**COMMON, tie_word_embeddings=True, rope_theta=1000000.0))
    if kind == "mistral":
        return MistralForCausalLM(MistralConfig(**COMMON, sliding_window=None))
    if kind == "llama_rope":
        # theta 500000, head_dim 16: wavelengths up to ~2*pi*500000^(14/16) >> 8192/1, so llama3 scaling
        # divides the low frequencies and smooths the middle ones (a real difference to test)
        config = LlamaConfig(**{**COMMON, "max_position_embeddings": 131072}, rope_theta=500000.0,
                             rope_scaling=LLAMA3_ROPE)
        return LlamaForCausalLM(config)
    raise ValueError(kind)


def _randomize(model, seed: int) -> None:
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, param in model.named_parameters():
            noise = torch.randn(param.shape, generator=gen)
            param.copy_(1 + 0.1 * noise if name.endswith("norm.weight") else 0.1 * noise)


@pytest.fixture(scope="module")
def tokens():
    return torch.randint(0, VOCAB, (BATCH, SEQ), generator=torch.Generator().manual_seed(3))


@pytest.fixture(scope="module")
def hf_models(tmp_path_factory, tokens):
    """name -> (directory, HF float32 logits [b, s, V]) for each tiny model."""
    models = {}
    for seed, kind in enumerate((*ARCHS, "llama_rope")):
        torch.manual_seed(seed)
        model = _hf_model(kind).float().eval()
        model.config._attn_implementation = "eager"
        _randomize(model, seed)
        path = tmp_path_factory.mktemp(kind)
        # the untied Llama is saved in several shards: the reader goes through the index
        model.save_pretrained(path, max_shard_size="100KB" if kind == "llama" else "1GB")
        for name, text in ASSETS.items():
            (path / name).write_text(text)
        with torch.no_grad():
            logits = model(tokens).logits
        models[kind] = (str(path), logits)
    assert (pathlib.Path(models["llama"][0]) / "model.safetensors.index.json").exists()
    return models


def _silent(*args, **kwargs):
    pass


def _megatron_logits_tp(model, tokens):
    from megatron.core.tensor_parallel import gather_from_tensor_model_parallel_region

    position_ids = torch.arange(tokens.size(1)).unsqueeze(0).expand_as(tokens)
    with torch.no_grad():
        return gather_from_tensor_model_parallel_region(model(tokens, position_ids, None))  # [b, s, V]


def _megatron_logits_pp(model, tokens, hidden_size):
    """Two-stage pipeline by hand: stage 0 sends its hidden states [s, b, h] to stage 1."""
    import torch.distributed as dist
    from megatron.core import parallel_state as ps

    position_ids = torch.arange(tokens.size(1)).unsqueeze(0).expand_as(tokens)
    with torch.no_grad():
        if ps.is_pipeline_first_stage():
            hidden = model(tokens, position_ids, None)
            dist.send(hidden.contiguous(), dst=ps.get_pipeline_model_parallel_next_rank())
            return None
        hidden = torch.empty(tokens.size(1), tokens.size(0), hidden_size)
        dist.recv(hidden, src=ps.get_pipeline_model_parallel_prev_rank())
        model.set_input_tensor(hidden)
        return model(tokens, position_ids, None)


def _cli_checks(model_dirs, out_root):
    """The CLI in one process, starting without a process group: each call sets one up and tears it
    down."""
    import torch.distributed as dist

    from megatron_solopo.cli import main

    llama, qwen = model_dirs["llama"], model_dirs["qwen2_tied"]
    codes = [
        main(["convert", "hf-to-mcore", "--hf-model", llama, "--output", f"{out_root}/llama-cli", "--dtype", "fp32"]),
        main(["convert", "mcore-to-hf", "--checkpoint", f"{out_root}/llama-cli", "--output",
              f"{out_root}/llama-cli-hf", "--max-shard-size", "100KB"]),
        main(["convert", "hf-to-mcore", "--hf-model", qwen, "--output", f"{out_root}/qwen2_tied-bf16"]),
        main(["convert", "mcore-to-hf", "--checkpoint", f"{out_root}/qwen2_tied-bf16", "--output",
              f"{out_root}/qwen2_tied-bf16-hf"]),
        # an output directory that is not empty: refused, exit code 1
        main(["convert", "hf-to-mcore", "--hf-model", qwen, "--output", f"{out_root}/qwen2_tied-bf16"]),
    ]
    return {"cli_rc": codes, "group_after_cli": dist.is_initialized()}


def _tp1_checks(model_dirs, tokens, out_root):
    """The API at tp=1 (the first call sets up the process group), llama3 RoPE, layout errors."""
    from megatron_solopo.convert import (
        convert_hf_to_mcore,
        convert_mcore_to_hf,
        infer_preset_from_hf,
        load_hf_into_mcore,
    )
    from megatron_solopo.parallel import ParallelConfig

    out = {"logits": {}}
    for kind in (*ARCHS, "llama_rope"):
        hf_dir = model_dirs[kind]
        model = load_hf_into_mcore(hf_dir)  # the default ModelConfig: attention "auto" = sdpa on CPU
        out["logits"][("tp1", kind)] = _megatron_logits_tp(model, tokens)
        if kind in ARCHS:
            convert_hf_to_mcore(hf_dir, f"{out_root}/{kind}-tp1", dtype="fp32", log=_silent)
            convert_mcore_to_hf(f"{out_root}/{kind}-tp1", f"{out_root}/{kind}-tp1-hf", log=_silent)
    # the rope test can fail: the same weights without llama3 scaling give other logits
    rope_dir = model_dirs["llama_rope"]
    unscaled = infer_preset_from_hf(rope_dir).replace(rope_scaling_factor=None)
    model = load_hf_into_mcore(rope_dir, preset=unscaled)
    out["rope_unscaled_logits"] = _megatron_logits_tp(model, tokens)
    try:
        load_hf_into_mcore(model_dirs["llama"], ParallelConfig(tp=2))
    except ValueError as err:
        out["layout_error"] = str(err)
    return out


def _tp2_pp2_checks(model_dirs, tokens, out_root):
    """TP=2 and PP=2: logits and checkpoints; then the checkpoints exported to HF at TP=1."""
    from megatron_solopo.convert import convert_hf_to_mcore, convert_mcore_to_hf, load_hf_into_mcore
    from megatron_solopo.model import ModelConfig
    from megatron_solopo.parallel import ParallelConfig, initialize_parallel

    logits = {}
    # Megatron's local attention at TP=2, our SDPA core attention at PP=2 (and at TP=1 above)
    for layout, parallel, backend in (("tp2", ParallelConfig(tp=2), "local"), ("pp2", ParallelConfig(pp=2), "sdpa")):
        initialize_parallel(parallel)
        for kind in ARCHS:
            hf_dir = model_dirs[kind]
            model = load_hf_into_mcore(hf_dir, parallel, ModelConfig(hf_model=hf_dir, attention_backend=backend))
            if layout == "tp2":
                logits[(layout, kind)] = _megatron_logits_tp(model, tokens)
            else:
                stage_logits = _megatron_logits_pp(model, tokens, COMMON["hidden_size"])
                if stage_logits is not None:
                    logits[(layout, kind)] = stage_logits
            convert_hf_to_mcore(hf_dir, f"{out_root}/{kind}-{layout}", parallel, dtype="fp32", log=_silent)
    initialize_parallel(ParallelConfig())  # tp=pp=1, two data-parallel replicas: rank 0 writes
    for layout in ("tp2", "pp2"):
        for kind in ARCHS:
            convert_mcore_to_hf(f"{out_root}/{kind}-{layout}", f"{out_root}/{kind}-{layout}-hf", log=_silent)
    return {"logits": logits}


def _timed(steps):
    import time

    times, out = {}, {"logits": {}}
    for name, step in steps:
        start = time.perf_counter()
        result = step()
        out["logits"].update(result.pop("logits", {}))
        out.update(result)
        times[name] = round(time.perf_counter() - start, 1)
    out["times"] = times
    return out


def _one_process_checks(rank, world_size, model_dirs, tokens, out_root):
    return _timed((("cli", lambda: _cli_checks(model_dirs, out_root)),
                   ("tp1", lambda: _tp1_checks(model_dirs, tokens, out_root))))


def _two_process_checks(rank, world_size, model_dirs, tokens, out_root):
    return _timed((("tp2_pp2", lambda: _tp2_pp2_checks(model_dirs, tokens, out_root)),))


@pytest.fixture(scope="module")
def runs(hf_models, tokens, tmp_path_factory):
    dirs = {kind: path for kind, (path, _) in hf_models.items()}
    out_root = tmp_path_factory.mktemp("converted")
    one = run_distributed(_one_process_checks, 1, dirs, tokens, str(out_root))[0]
    two = run_distributed(_two_process_checks, 2, dirs, tokens, str(out_root))
    print("worker seconds per phase:", one["times"], two[0]["times"])
    logits = dict(one["logits"])
    for rank_out in two:
        logits.update(rank_out["logits"])
    return {"one": one, "logits": logits, "out_root": out_root}


def _read_all(path):
    from megatron_solopo.model.hf.safetensors_io import HFCheckpointReader

    with HFCheckpointReader(path) as reader:
        return {name: reader.read(name) for name in reader.names()}


@pytest.mark.parametrize("layout", ["tp1", "tp2", "pp2"])
@pytest.mark.parametrize("kind", ARCHS)
def test_logits_match_hf(runs, hf_models, kind, layout):
    reference = hf_models[kind][1]
    logits = runs["logits"][(layout, kind)]
    assert logits.shape == reference.shape == (BATCH, SEQ, VOCAB)
    assert (logits - reference).abs().max().item() < ATOL


def test_llama3_rope_scaling_logits_match_hf(runs, hf_models):
    reference = hf_models["llama_rope"][1]
    assert (runs["logits"][("tp1", "llama_rope")] - reference).abs().max().item() < ATOL
    # without the scaling the same weights disagree: the parity check sees RoPE frequencies
    assert (runs["one"]["rope_unscaled_logits"] - reference).abs().max().item() > 100 * ATOL


@pytest.mark.parametrize("layout", ["tp1", "tp2", "pp2"])
@pytest.mark.parametrize("kind", ARCHS)
def test_round_trip_is_bit_exact(runs, hf_models, kind, layout):
    source_dir = hf_models[kind][0]
    exported_dir = runs["out_root"] / f"{kind}-{layout}-hf"
    source, exported = _read_all(source_dir), _read_all(exported_dir)
    assert sorted(exported) == sorted(source)
    for name, tensor in source.items():
        assert exported[name].dtype == tensor.dtype and torch.equal(exported[name], tensor), name
    if kind.endswith("_tied"):
        assert "lm_head.weight" not in exported
    source_config = json.loads((pathlib.Path(source_dir) / "config.json").read_text())
    exported_config = json.loads((exported_dir / "config.json").read_text())
    assert exported_config == source_config  # float32 in, float32 out: nothing to update
    for name, text in ASSETS.items():
        assert (exported_dir / name).read_text() == text


def test_cli_round_trips_fp32_and_bf16(runs, hf_models):
    one, out_root = runs["one"], runs["out_root"]
    assert one["cli_rc"] == [0, 0, 0, 0, 2]  # the last one: a non-empty output dir, a user error
    assert not one["group_after_cli"]  # the CLI tore down the process group it created
    source = _read_all(hf_models["llama"][0])
    exported = _read_all(out_root / "llama-cli-hf")
    assert sorted(exported) == sorted(source) and all(torch.equal(exported[n], t) for n, t in source.items())
    assert (out_root / "llama-cli-hf" / "model.safetensors.index.json").exists()  # 100KB shards
    # default dtype bf16: the Megatron checkpoint and the HF export hold the source rounded to bf16
    source = _read_all(hf_models["qwen2_tied"][0])
    exported = _read_all(out_root / "qwen2_tied-bf16-hf")
    assert sorted(exported) == sorted(source)
    for name, tensor in source.items():
        assert exported[name].dtype == torch.bfloat16 and torch.equal(exported[name], tensor.bfloat16()), name
    meta = json.loads((out_root / "qwen2_tied-bf16" / "solopo_checkpoint.json").read_text())
    assert meta["dtype"] == "bf16" and meta["preset"]["tie_embeddings"] and meta["preset"]["qkv_bias"]
    config = json.loads((out_root / "qwen2_tied-bf16-hf" / "config.json").read_text())
    assert config.get("dtype", config.get("torch_dtype")) == "bfloat16"


def test_layout_mismatch_is_an_error(runs):
    assert "initialized with (tp, pp, cp) = (1, 1, 1)" in runs["one"]["layout_error"]


def test_tp_larger_than_the_process_count_is_an_error(hf_models, tmp_path):
    from megatron_solopo.convert import convert_hf_to_mcore
    from megatron_solopo.parallel import ParallelConfig

    with pytest.raises(ValueError, match="torchrun --nproc-per-node 2"):
        convert_hf_to_mcore(hf_models["llama"][0], tmp_path / "out", ParallelConfig(tp=2))
    assert not (tmp_path / "out").exists()
