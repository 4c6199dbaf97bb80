"""A checkpoint written without Transformer Engine loads into a model with TE modules, and back.

With TE importable, Megatron builds the final norm (and the fused linears) as TE modules, which carry
`_extra_state`; a checkpoint written on a machine without TE has none. Here the TE side is emulated on
CPU by giving the final norm an extra state (what TE's modules add to a state dict), so the load request
asks for `decoder.final_layernorm._extra_state` as it does on a GPU with TE.
"""

from __future__ import annotations

import pytest
import torch

PRESET = "tiny"


class _ExtraState:
    """Mixin: a module with a `_extra_state` entry, like Transformer Engine's modules."""

    def get_extra_state(self):
        return {"fp8_meta": getattr(self, "_fp8_meta", 0)}

    def set_extra_state(self, state):
        self._fp8_meta = None if state is None else state["fp8_meta"]


def _with_te_like_final_norm(chunks):
    from megatron_solopo.checkpoint.weights import unwrap_model

    norm = unwrap_model(chunks[0]).decoder.final_layernorm
    norm.__class__ = type("TELikeNorm", (_ExtraState, norm.__class__), {})
    norm._fp8_meta = 7
    return norm


@pytest.fixture(scope="module")
def parallel():
    """A one-process group for this module, torn down after it (later tests expect no process group)."""
    from megatron_solopo.parallel import ParallelConfig, destroy_parallel, initialize_parallel

    yield initialize_parallel(ParallelConfig(), seed=5)
    destroy_parallel()


def _build(parallel, seed):
    from megatron_solopo.model import ModelConfig, get_preset
    from megatron_solopo.model.builder import build_model_chunks

    return build_model_chunks(get_preset(PRESET), parallel,
                              ModelConfig(preset=PRESET, attention_backend="sdpa", init_seed=seed))


def _save(chunks, directory):
    from megatron.core import dist_checkpointing

    from megatron_solopo.checkpoint.weights import model_sharded_state_dict

    directory.mkdir()
    dist_checkpointing.save(model_sharded_state_dict(chunks), str(directory))
    return directory


def _weights(chunks):
    return {k: v.detach().clone() for k, v in chunks[0].state_dict().items() if not k.endswith("_extra_state")}


def test_a_checkpoint_without_te_state_loads_into_a_te_like_model(parallel, tmp_path):
    from megatron.core import dist_checkpointing

    from megatron_solopo.checkpoint.weights import load_model_weights, model_sharded_state_dict

    source = _build(parallel, seed=1)
    path = _save(source, tmp_path / "no_te")
    target = _build(parallel, seed=2)
    _with_te_like_final_norm(target)
    request = model_sharded_state_dict(target)
    assert "decoder.final_layernorm._extra_state" in {sh.key for sh in request["model"].values()}
    with pytest.raises(BaseException):  # torch CheckpointException; what the plain load (the old code) does: Missing key ..._extra_state
        dist_checkpointing.load(request, str(path))
    load_model_weights(path, target)
    expected, got = _weights(source), _weights(target)
    assert expected.keys() == got.keys()
    for key in expected:
        torch.testing.assert_close(got[key], expected[key], msg=key)


def test_only_extra_state_may_be_missing(parallel, tmp_path, monkeypatch):
    from megatron_solopo.checkpoint import weights

    path = _save(_build(parallel, seed=1), tmp_path / "no_te")
    target = _build(parallel, seed=2)
    real = weights.model_sharded_state_dict

    def with_a_weight_the_checkpoint_lacks(chunks):
        request = real(chunks)
        sh = request["model"]["decoder.final_layernorm.weight"]
        sh.key = "decoder.final_layernorm.bias"  # a real tensor, absent from the checkpoint
        return request

    monkeypatch.setattr(weights, "model_sharded_state_dict", with_a_weight_the_checkpoint_lacks)
    with pytest.raises(BaseException) as failure:
        weights.load_model_weights(path, target)
    assert "final_layernorm.bias" in str(failure.value) or "final_layernorm.bias" in repr(failure.value.__dict__)


def test_module_state_tolerates_only_missing_extra_state():
    from megatron_solopo.checkpoint.format import CheckpointError
    from megatron_solopo.checkpoint.weights import load_module_state

    module = type("M", (_ExtraState, torch.nn.Linear), {})(2, 2)
    state = {k: v for k, v in torch.nn.Linear(2, 2).state_dict().items()}
    load_module_state(module, state)  # _extra_state missing: fine
    torch.testing.assert_close(module.weight, state["weight"])
    with pytest.raises(CheckpointError, match="missing \\['bias'\\]"):
        load_module_state(module, {"weight": state["weight"]})
    with pytest.raises(CheckpointError, match="unexpected"):
        load_module_state(module, {**state, "other": state["bias"]})


def test_a_te_like_checkpoint_loads_into_a_model_without_te(parallel, tmp_path):
    from megatron_solopo.checkpoint.weights import load_model_weights

    source = _build(parallel, seed=3)
    _with_te_like_final_norm(source)
    path = _save(source, tmp_path / "te_like")
    target = _build(parallel, seed=4)
    load_model_weights(path, target)  # the stored _extra_state is unexpected: ignored
    expected, got = _weights(source), _weights(target)
    for key in expected:
        torch.testing.assert_close(got[key], expected[key], msg=key)


def test_resume_loads_a_checkpoint_written_without_te(parallel, tmp_path):
    """training.run_state's resume path uses the same tolerant load for the model."""
    import inspect

    from megatron_solopo.training import run_state

    source = inspect.getsource(run_state.load_checkpoint)
    assert "load_tolerating_extra_state" in source and "load_module_state" in source
