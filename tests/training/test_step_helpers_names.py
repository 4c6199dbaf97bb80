"""step_helpers seeds the same weights into the TE and the local layer spec (TE fuses the norms into
linear_qkv / linear_fc1 as `layer_norm_weight`): the TE-vs-SDPA GPU test compares one model, not two."""

from __future__ import annotations

import torch
from step_helpers import is_norm_weight, set_weights_by_name

from megatron_solopo.model.families.tables import te_to_local_name


def _holder(**params):
    module = torch.nn.Module()
    for name, shape in params.items():
        module.register_parameter(name, torch.nn.Parameter(torch.zeros(shape)))
    return module


class _Layer(torch.nn.Module):
    def __init__(self, te: bool, number: int, h: int = 8):
        super().__init__()
        self.layer_number = number
        self.self_attention = torch.nn.Module()
        self.mlp = torch.nn.Module()
        if te:
            self.self_attention.linear_qkv = _holder(weight=(3 * h, h), layer_norm_weight=(h,))
            self.mlp.linear_fc1 = _holder(weight=(4 * h, h), layer_norm_weight=(h,))
        else:
            self.input_layernorm = _holder(weight=(h,))
            self.pre_mlp_layernorm = _holder(weight=(h,))
            self.self_attention.linear_qkv = _holder(weight=(3 * h, h))
            self.mlp.linear_fc1 = _holder(weight=(4 * h, h))


class _Model(torch.nn.Module):
    def __init__(self, te: bool):
        super().__init__()
        self.decoder = torch.nn.Module()
        self.decoder.layers = torch.nn.ModuleList([_Layer(te, 1), _Layer(te, 2)])
        self.decoder.final_layernorm = _holder(weight=(8,))


def test_te_names_map_to_local_names():
    assert te_to_local_name("decoder.layers.3.self_attention.linear_qkv.layer_norm_weight") == \
        "decoder.layers.3.input_layernorm.weight"
    assert te_to_local_name("decoder.layers.0.mlp.linear_fc1.layer_norm_weight") == \
        "decoder.layers.0.pre_mlp_layernorm.weight"
    assert te_to_local_name("decoder.layers.0.mlp.linear_fc1.weight") == "decoder.layers.0.mlp.linear_fc1.weight"
    assert is_norm_weight("decoder.layers.0.self_attention.linear_qkv.layer_norm_weight")
    assert not is_norm_weight("decoder.layers.0.self_attention.linear_qkv.weight")


def test_te_and_local_specs_get_the_same_weights():
    te, local = _Model(te=True), _Model(te=False)
    set_weights_by_name([te], seed=4)
    set_weights_by_name([local], seed=4)
    local_params = dict(local.named_parameters())
    for name, param in te.named_parameters():
        twin = local_params[te_to_local_name(name)]
        torch.testing.assert_close(param, twin, msg=name)
    norm = te.decoder.layers[0].self_attention.linear_qkv.layer_norm_weight
    assert (norm - 1.0).abs().max() < 0.5  # a norm scale (around 1), not a 0.05-std weight
