"""Single-process checks of the conversion pieces: the fused QKV / gate-up layouts on hand-written
numbers, the safetensors shard reader/writer, and config.json -> preset (including every error)."""

import json

import pytest
import torch

from megatron_solopo.model.families import get_family, registered_families
from megatron_solopo.model.families.tables import Direct, FusedGateUp, FusedQKV, Geometry, OutputLayer, te_alias
from megatron_solopo.model.hf.config import UnsupportedHFConfig, hf_config_from_preset, infer_preset_from_hf
from megatron_solopo.model.hf.safetensors_io import HFCheckpointReader, HFShardWriter, copy_hf_assets, parse_size
from megatron_solopo.model.presets import get_preset, list_presets

LLAMA, QWEN2 = get_family("llama").weights, get_family("qwen2").weights


class DictReader:
    """TensorReader over a dict, recording which slices were read."""

    def __init__(self, tensors):
        self.tensors, self.reads = tensors, []

    def shape(self, name):
        return tuple(self.tensors[name].shape)

    def read(self, name):
        self.reads.append((name, None))
        return self.tensors[name]

    def read_range(self, name, dim, start, stop):
        self.reads.append((name, (dim, start, stop)))
        return self.tensors[name].narrow(dim, start, stop - start)


# 2 kv groups, 2 query heads per group, head_dim 1: the fused layout is written out by hand
GEOM = Geometry(num_attention_heads=4, num_query_groups=2, head_dim=1, ffn_hidden_size=4)
QKV = FusedQKV("qkv", "q", "k", "v")
HF_QKV = {"q": torch.tensor([10.0, 11, 12, 13]), "k": torch.tensor([20.0, 21]), "v": torch.tensor([30.0, 31])}


def test_fused_qkv_interleaves_by_query_group():
    # per group g: [q heads 2g, 2g+1], k_g, v_g
    full = QKV.to_mcore(DictReader(HF_QKV), GEOM, tp_rank=0, tp_size=1)
    assert full.tolist() == [10, 11, 20, 30, 12, 13, 21, 31]
    back = QKV.to_hf(full, GEOM)
    assert all(torch.equal(back[n], HF_QKV[n]) for n in "qkv")


def test_fused_qkv_tp_takes_whole_groups_and_reads_only_its_rows():
    reader = DictReader(HF_QKV)
    rank1 = QKV.to_mcore(reader, GEOM, tp_rank=1, tp_size=2)
    assert rank1.tolist() == [12, 13, 21, 31]
    assert reader.reads == [("q", (0, 2, 4)), ("k", (0, 1, 2)), ("v", (0, 1, 2))]


def test_fused_qkv_weight_matrix_with_head_dim_two():
    geom = Geometry(num_attention_heads=2, num_query_groups=1, head_dim=2, ffn_hidden_size=2)
    q = torch.arange(8.0).reshape(4, 2)            # rows q0 q0' q1 q1'
    k = 100 + torch.arange(4.0).reshape(2, 2)
    v = 200 + torch.arange(4.0).reshape(2, 2)
    fused = QKV.to_mcore(DictReader({"q": q, "k": k, "v": v}), geom, 0, 1)
    assert torch.equal(fused, torch.cat([q, k, v]))  # one group: plain concatenation


def test_fused_gate_up_tp_rank_holds_its_gate_and_up_rows():
    m = FusedGateUp("fc1", "gate", "up")
    hf = {"gate": torch.tensor([[1.0], [2], [3], [4]]), "up": torch.tensor([[5.0], [6], [7], [8]])}
    assert m.to_mcore(DictReader(hf), GEOM, 0, 1).flatten().tolist() == [1, 2, 3, 4, 5, 6, 7, 8]
    assert m.to_mcore(DictReader(hf), GEOM, 1, 2).flatten().tolist() == [3, 4, 7, 8]
    back = m.to_hf(torch.tensor([[1.0], [2], [3], [4], [5], [6], [7], [8]]), GEOM)
    assert torch.equal(back["gate"], hf["gate"]) and torch.equal(back["up"], hf["up"])


def test_direct_splits_rows_and_columns():
    w = torch.arange(16.0).reshape(4, 4)
    assert torch.equal(Direct("a", "w", "column").to_mcore(DictReader({"w": w}), GEOM, 1, 2), w[2:])
    assert torch.equal(Direct("a", "w", "row").to_mcore(DictReader({"w": w}), GEOM, 1, 2), w[:, 2:])
    assert torch.equal(Direct("a", "w", "none").to_mcore(DictReader({"w": w}), GEOM, 1, 2), w)
    with pytest.raises(ValueError, match="not divisible"):
        Direct("a", "w", "column").to_mcore(DictReader({"w": w}), GEOM, 0, 3)


def test_tied_output_layer_reads_the_embedding_and_exports_nothing():
    out = OutputLayer("output_layer.weight", "lm_head.weight", tied_hf="embed")
    emb = torch.arange(8.0).reshape(4, 2)
    assert torch.equal(out.to_mcore(DictReader({"embed": emb}), GEOM, 1, 2, tied=True), emb[2:])
    assert out.to_hf(emb, GEOM, tied=True) == {}
    assert out.hf_names(tied=True) == () and out.hf_names(tied=False) == ("lm_head.weight",)


def test_tables_name_every_hf_tensor_of_a_layer():
    names = LLAMA.expected_hf_names(num_layers=1, tied=True)
    assert "lm_head.weight" not in names and "model.embed_tokens.weight" in names
    assert len(names) == 2 + 9  # embed, final norm; per layer: 2 norms, q k v o, gate up down
    assert len(QWEN2.expected_hf_names(1, tied=False)) == 3 + 9 + 3  # + lm_head, + q/k/v biases
    instances = dict(LLAMA.instances(local_layers=1, layer_offset=2))
    assert instances["decoder.layers.0.self_attention.linear_qkv.weight"].hf_q == \
        "model.layers.2.self_attn.q_proj.weight"
    assert te_alias("decoder.layers.3.input_layernorm.weight") == \
        "decoder.layers.3.self_attention.linear_qkv.layer_norm_weight"
    assert te_alias("decoder.layers.3.pre_mlp_layernorm.weight") == \
        "decoder.layers.3.mlp.linear_fc1.layer_norm_weight"
    assert te_alias("decoder.final_layernorm.weight") is None


def test_shard_writer_and_reader_round_trip(tmp_path):
    tensors = {f"t{i}": torch.randn(10, 8) for i in range(5)}  # 320 bytes each
    writer = HFShardWriter(tmp_path, max_shard_bytes=700)       # two tensors per shard
    for name, tensor in tensors.items():
        writer.add(name, tensor)
    shards = writer.finish()
    assert shards == [f"model-0000{i}-of-00003.safetensors" for i in (1, 2, 3)]
    index = json.loads((tmp_path / "model.safetensors.index.json").read_text())
    assert index["metadata"]["total_size"] == 5 * 320
    assert index["weight_map"]["t4"] == "model-00003-of-00003.safetensors"
    with HFCheckpointReader(tmp_path) as reader:
        assert reader.names() == set(tensors)
        assert all(torch.equal(reader.read(n), t) for n, t in tensors.items())
        assert torch.equal(reader.read_range("t1", 1, 2, 5), tensors["t1"][:, 2:5])
        assert reader.shape("t3") == (10, 8)


def test_shard_writer_single_file_and_views_of_one_tensor(tmp_path):
    fused = torch.arange(8.0).reshape(4, 2)
    gate, up = torch.chunk(fused, 2)  # views of one storage (the gate/up export) must still save
    writer = HFShardWriter(tmp_path)
    writer.add("gate", gate)
    writer.add("up", up)
    assert writer.finish() == ["model.safetensors"]
    assert not (tmp_path / "model.safetensors.index.json").exists()
    with HFCheckpointReader(tmp_path) as reader:
        assert torch.equal(reader.read("up"), fused[2:])
    again = HFShardWriter(tmp_path / "again")
    again.add("a", gate)
    with pytest.raises(ValueError, match="twice"):
        again.add("a", gate)


def test_reader_errors_name_the_fix(tmp_path):
    with pytest.raises(FileNotFoundError, match="does not exist"):
        HFCheckpointReader(tmp_path / "missing")
    (tmp_path / "pytorch_model.bin").write_bytes(b"x")
    with pytest.raises(FileNotFoundError, match="save_pretrained"):
        HFCheckpointReader(tmp_path)


def test_copy_assets_skips_weights(tmp_path):
    src = tmp_path / "src"
    src.mkdir()
    for name in ("config.json", "tokenizer.json", "chat_template.jinja", "model.safetensors",
                 "model.safetensors.index.json", "LICENSE"):
        (src / name).write_text("x")
    copied = copy_hf_assets(src, tmp_path / "dst", exclude=("config.json",))
    assert copied == ["LICENSE", "chat_template.jinja", "tokenizer.json"]


def test_parse_size():
    assert parse_size("5GB") == 5 * 10**9 and parse_size("2GiB") == 2 * 2**30
    assert parse_size("500MB") == 5 * 10**8 and parse_size("1234") == 1234
    with pytest.raises(ValueError, match="cannot read"):
        parse_size("lots")


# ---------------------------------------------------------------------------------------------
# config.json -> preset

LLAMA31_8B_V4 = {  # transformers 4 layout, values of the published Llama-3.1-8B config.json
    "architectures": ["LlamaForCausalLM"], "model_type": "llama", "hidden_size": 4096,
    "intermediate_size": 14336, "num_hidden_layers": 32, "num_attention_heads": 32,
    "num_key_value_heads": 8, "vocab_size": 128256, "max_position_embeddings": 131072,
    "rms_norm_eps": 1e-5, "rope_theta": 500000.0, "tie_word_embeddings": False, "hidden_act": "silu",
    "attention_bias": False, "mlp_bias": False,
    "rope_scaling": {"factor": 8.0, "low_freq_factor": 1.0, "high_freq_factor": 4.0,
                     "original_max_position_embeddings": 8192, "rope_type": "llama3"},
}

QWEN25_05B_V4 = {  # values of the published Qwen2.5-0.5B config.json (tied, sliding window unused)
    "architectures": ["Qwen2ForCausalLM"], "model_type": "qwen2", "hidden_size": 896,
    "intermediate_size": 4864, "num_hidden_layers": 24, "num_attention_heads": 14,
    "num_key_value_heads": 2, "vocab_size": 151936, "max_position_embeddings": 32768,
    "rms_norm_eps": 1e-6, "rope_theta": 1000000.0, "tie_word_embeddings": True, "hidden_act": "silu",
    "sliding_window": 32768, "use_sliding_window": False, "max_window_layers": 21,
}


def test_infer_llama31_matches_the_registered_preset():
    preset = infer_preset_from_hf(LLAMA31_8B_V4, name="llama3.1-8b")
    assert preset == get_preset("llama3.1-8b")


def test_infer_qwen25_tied_with_unused_sliding_window():
    preset = infer_preset_from_hf(QWEN25_05B_V4, name="qwen2.5-0.5b")
    assert preset == get_preset("qwen2.5-0.5b")
    assert preset.tie_embeddings and preset.qkv_bias


def test_infer_transformers5_layout_and_directory_name(tmp_path):
    config = {k: v for k, v in LLAMA31_8B_V4.items() if k not in ("rope_theta", "rope_scaling")}
    config["rope_parameters"] = {**LLAMA31_8B_V4["rope_scaling"], "rope_theta": 500000.0}
    model_dir = tmp_path / "my-llama"
    model_dir.mkdir()
    (model_dir / "config.json").write_text(json.dumps(config))
    preset = infer_preset_from_hf(model_dir)
    assert preset.name == "hf:my-llama"
    assert preset.replace(name="llama3.1-8b") == get_preset("llama3.1-8b")


def test_explicit_head_dim_becomes_kv_channels():
    config = {**LLAMA31_8B_V4, "head_dim": 256}
    assert infer_preset_from_hf(config).head_dim == 256
    assert infer_preset_from_hf({**LLAMA31_8B_V4, "head_dim": 128}).kv_channels is None


@pytest.mark.parametrize("name", list_presets())
def test_generated_config_round_trips_every_preset(name):
    preset = get_preset(name)
    assert infer_preset_from_hf(hf_config_from_preset(preset), name=name) == preset


def test_generated_config_is_read_by_transformers():
    from transformers import AutoConfig

    preset = get_preset("llama3.2-1b")
    generated = hf_config_from_preset(preset)
    config = AutoConfig.for_model(generated.pop("model_type"), **generated)
    assert config.tie_word_embeddings and config.num_key_value_heads == 8
    as_dict = config.to_dict()
    rope = as_dict.get("rope_parameters") or as_dict.get("rope_scaling")
    assert rope["rope_type"] == "llama3" and rope["factor"] == 32.0


@pytest.mark.parametrize("change, message", [
    ({"architectures": ["Qwen3ForCausalLM"], "model_type": "qwen3"}, "not supported for conversion"),
    ({"architectures": ["MistralForCausalLM"], "model_type": "mistral", "sliding_window": 4096},
     "sliding_window=4096"),
    ({"architectures": ["Qwen2ForCausalLM"], "model_type": "qwen2", "use_sliding_window": True,
      "sliding_window": 4096}, "use_sliding_window"),
    ({"layer_types": ["full_attention", "sliding_attention"]}, "sliding_attention"),
    ({"rope_scaling": {"rope_type": "yarn", "factor": 4.0, "original_max_position_embeddings": 32768}},
     "'yarn' is not implemented"),
    ({"rope_scaling": {"type": "linear", "factor": 2.0}}, "'linear' is not implemented"),
    ({"rope_scaling": {"rope_type": "dynamic", "factor": 2.0}}, "'dynamic' is not implemented"),
    ({"rope_scaling": {**LLAMA31_8B_V4["rope_scaling"], "original_max_position_embeddings": 32768}},
     "original_max_position_embeddings=32768"),
    ({"rope_scaling": {**LLAMA31_8B_V4["rope_scaling"], "high_freq_factor": 8.0}}, "high_freq_factor=8.0"),
    ({"rope_scaling": {**LLAMA31_8B_V4["rope_scaling"], "attention_factor": 1.5}}, "attention_factor"),
    ({"partial_rotary_factor": 0.5}, "partial_rotary_factor"),
    ({"rope_theta": 10000.5}, "not an integer"),
    ({"attention_bias": True}, "attention_bias"),
    ({"mlp_bias": True}, "mlp_bias"),
    ({"hidden_act": "gelu"}, "gelu"),
    ({"quantization_config": {"quant_method": "gptq"}}, "gptq"),
    ({"vocab_size": None}, "vocab_size"),
])
def test_unsupported_configs_are_errors(change, message):
    with pytest.raises(UnsupportedHFConfig, match=message):
        infer_preset_from_hf({**LLAMA31_8B_V4, **change})
    assert issubclass(UnsupportedHFConfig, ValueError)


# RoPE layouts seen in config.json files: the transformers 4 key, the transformers 5 key, both (a
# file edited by hand or by two tools), legacy `type`, theta at the top level or inside the dict
ROPE_LAYOUTS = [
    {"rope_theta": 500000.0},
    {},
    {"rope_parameters": {"rope_type": "default", "rope_theta": 250000.0}, "rope_theta": 10000.0},
    {"rope_parameters": {"rope_type": "default"}, "rope_theta": 123456.0},
    {"rope_parameters": {"rope_type": "default"},
     "rope_scaling": {"rope_type": "yarn", "factor": 4.0, "original_max_position_embeddings": 2048}},
    {"rope_parameters": {"rope_type": "default", "rope_theta": 500000.0}, "rope_scaling": None},
    {"rope_parameters": {**LLAMA31_8B_V4["rope_scaling"]}, "rope_scaling": {}},
    {"rope_scaling": {"type": "linear", "factor": 2.0}, "rope_theta": 700000.0},
    {"rope_scaling": {**LLAMA31_8B_V4["rope_scaling"]}, "rope_theta": 500000.0,
     "rope_parameters": {"rope_type": "default", "rope_theta": 10000.0}},
]


@pytest.mark.parametrize("layout", ROPE_LAYOUTS, ids=range(len(ROPE_LAYOUTS)))
def test_rope_parameters_resolve_as_transformers_does(layout):
    import copy

    from transformers import LlamaConfig

    from megatron_solopo.model.hf.config import hf_rope_parameters

    base = {k: v for k, v in LLAMA31_8B_V4.items() if k not in ("rope_theta", "rope_scaling")}
    config = {**base, "max_position_embeddings": 131072, **layout}
    ours = hf_rope_parameters(copy.deepcopy(config))
    theirs = dict(LlamaConfig.from_dict(copy.deepcopy(config)).rope_parameters)
    assert ours == theirs


def test_rope_scaling_beside_default_rope_parameters_is_not_plain_rope():
    # transformers reads this file as YaRN: converting it as plain RoPE would change the model silently
    config = {k: v for k, v in LLAMA31_8B_V4.items() if k != "rope_scaling"}
    config["rope_parameters"] = {"rope_type": "default", "rope_theta": 500000.0}
    config["rope_scaling"] = {"rope_type": "yarn", "factor": 4.0, "original_max_position_embeddings": 8192}
    with pytest.raises(UnsupportedHFConfig, match="'yarn' is not implemented"):
        infer_preset_from_hf(config)


def test_docs_list_every_mapping():
    import pathlib

    doc = (pathlib.Path(__file__).parents[2] / "docs" / "conversion.md").read_text()
    for family in registered_families():
        assert f"`{family.hf_architecture}`" in doc and f"`{family.name}`" in doc
        for entry in (*family.weights.global_mappings, *family.weights.layer_mappings):
            names = [entry.mcore, *entry.hf_names(tied=False)]
            for name in names:
                documented = name.replace("{layer}", "{L}")
                short = documented.rsplit(".", 2)[-2] + "." + documented.rsplit(".", 1)[-1]
                assert f"`{documented}`" in doc or f"`{short}`" in doc, name


def _module_tree(tensors, num_layers):
    """An nn.Module whose state_dict has exactly these names (a stand-in for a TE-spec GPTModel)."""
    root = torch.nn.Module()
    root.decoder = torch.nn.Module()
    root.decoder.layers = torch.nn.ModuleList(torch.nn.Module() for _ in range(num_layers))
    for i, layer in enumerate(root.decoder.layers):
        layer.layer_number = i + 1
    for name, tensor in tensors.items():
        *path, leaf = name.split(".")
        node = root
        for part in path:
            if isinstance(node, torch.nn.ModuleList):
                node = node[int(part)]
                continue
            if not hasattr(node, part):
                setattr(node, part, torch.nn.Module())
            node = getattr(node, part)
        node.register_parameter(leaf, torch.nn.Parameter(torch.zeros_like(tensor)))
    return root


def _tiny_hf_tensors():
    """One Llama layer, hidden 8, 2 heads of 4, 1 kv head, ffn 6, vocab 10 (random)."""
    gen = torch.Generator().manual_seed(0)
    shapes = {"model.embed_tokens.weight": (10, 8), "model.norm.weight": (8,),
              "model.layers.0.input_layernorm.weight": (8,), "model.layers.0.post_attention_layernorm.weight": (8,),
              "model.layers.0.self_attn.q_proj.weight": (8, 8), "model.layers.0.self_attn.k_proj.weight": (4, 8),
              "model.layers.0.self_attn.v_proj.weight": (4, 8), "model.layers.0.self_attn.o_proj.weight": (8, 8),
              "model.layers.0.mlp.gate_proj.weight": (6, 8), "model.layers.0.mlp.up_proj.weight": (6, 8),
              "model.layers.0.mlp.down_proj.weight": (8, 6)}
    return {name: torch.randn(shape, generator=gen) for name, shape in shapes.items()}


def _tiny_preset(tied=True):
    from megatron_solopo.model.presets import ModelPreset

    return ModelPreset("tiny-test", "llama", num_layers=1, hidden_size=8, ffn_hidden_size=6, num_attention_heads=2,
                       num_query_groups=1, vocab_size=10, max_position_embeddings=32, tie_embeddings=tied)


@pytest.mark.parametrize("change, tied, message", [
    ({}, False, "tie_word_embeddings=false but the checkpoint has no lm_head.weight"),
    ({"lm_head.weight": torch.zeros(10, 8)}, True, "differs from model.embed_tokens.weight"),
    ({"model.layers.0.self_attn.o_proj.bias": torch.zeros(8)}, True, "unexpected"),
    ({"model.layers.0.mlp.up_proj.weight": None}, True, "missing"),
])
def test_file_contents_are_checked_against_the_table(tmp_path, change, tied, message):
    from safetensors.torch import save_file

    from megatron_solopo.model.hf.loading import check_hf_names

    tensors = {**_tiny_hf_tensors(), **change}
    save_file({k: v for k, v in tensors.items() if v is not None}, str(tmp_path / "model.safetensors"))
    with HFCheckpointReader(tmp_path) as reader, pytest.raises(ValueError, match=message):
        check_hf_names(reader, _tiny_preset(tied))


def test_tied_checkpoint_storing_the_embedding_as_lm_head_is_accepted(tmp_path):
    from safetensors.torch import save_file

    from megatron_solopo.model.hf.loading import check_hf_names

    tensors = _tiny_hf_tensors()
    tensors["lm_head.weight"] = tensors["model.embed_tokens.weight"].clone()
    save_file(tensors, str(tmp_path / "model.safetensors"))
    with HFCheckpointReader(tmp_path) as reader:
        check_hf_names(reader, _tiny_preset(tied=True))


def test_te_spec_names_load_and_export(tmp_path):
    """The TE spec keeps the norms inside linear_qkv / linear_fc1 (layer_norm_weight)."""
    from safetensors.torch import save_file

    from megatron_solopo.convert import iter_hf_tensors, load_hf_weights

    preset = _tiny_preset(tied=True)
    hf = _tiny_hf_tensors()
    save_file(hf, str(tmp_path / "model.safetensors"))
    te_names = {"embedding.word_embeddings.weight": (10, 8), "decoder.final_layernorm.weight": (8,),
                "decoder.layers.0.self_attention.linear_qkv.weight": (16, 8),
                "decoder.layers.0.self_attention.linear_qkv.layer_norm_weight": (8,),
                "decoder.layers.0.self_attention.linear_proj.weight": (8, 8),
                "decoder.layers.0.mlp.linear_fc1.weight": (12, 8),
                "decoder.layers.0.mlp.linear_fc1.layer_norm_weight": (8,),
                "decoder.layers.0.mlp.linear_fc2.weight": (8, 6)}
    model = _module_tree({n: torch.empty(s) for n, s in te_names.items()}, num_layers=1)
    with HFCheckpointReader(tmp_path) as reader:
        load_hf_weights(model, reader, preset, tp_rank=0, tp_size=1)
    layer = model.decoder.layers[0]
    assert torch.equal(layer.self_attention.linear_qkv.layer_norm_weight, hf["model.layers.0.input_layernorm.weight"])
    assert torch.equal(layer.mlp.linear_fc1.layer_norm_weight,
                       hf["model.layers.0.post_attention_layernorm.weight"])
    exported = dict(iter_hf_tensors(model, preset))
    assert sorted(exported) == sorted(hf) and all(torch.equal(exported[n], t) for n, t in hf.items())


def test_missing_model_tensor_source_is_an_error(tmp_path):
    from safetensors.torch import save_file

    from megatron_solopo.convert import load_hf_weights
    from megatron_solopo.model.presets import ModelPreset

    preset = ModelPreset("x", "llama", num_layers=0, hidden_size=8, ffn_hidden_size=6, num_attention_heads=2,
                         num_query_groups=1, vocab_size=10, max_position_embeddings=32, tie_embeddings=True)
    save_file({"model.embed_tokens.weight": torch.ones(10, 8), "model.norm.weight": torch.ones(8)},
              str(tmp_path / "model.safetensors"))
    model = _module_tree({"embedding.word_embeddings.weight": torch.empty(10, 8),
                          "decoder.final_layernorm.weight": torch.empty(8),
                          "decoder.extra_bias": torch.empty(8)}, num_layers=0)
    with HFCheckpointReader(tmp_path) as reader, pytest.raises(ValueError, match="no HF source for"):
        load_hf_weights(model, reader, preset, tp_rank=0, tp_size=1)
    wrong_shape = _module_tree({"embedding.word_embeddings.weight": torch.empty(12, 8),
                                "decoder.final_layernorm.weight": torch.empty(8)}, num_layers=0)
    with HFCheckpointReader(tmp_path) as reader, pytest.raises(ValueError, match="does config.json match"):
        load_hf_weights(wrong_shape, reader, preset, tp_rank=0, tp_size=1)
