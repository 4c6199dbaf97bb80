"""Shared fixtures of the eval tests: a tiny local tokenizer and a tiny random HF Llama (no model hub)."""

import pytest


@pytest.fixture(scope="session")
def tiny_tokenizer():
    from megatron_solopo.data.testing import build_tiny_tokenizer, synthetic_corpus

    return build_tiny_tokenizer(synthetic_corpus(10))


@pytest.fixture(scope="session")
def tiny_hf_dir(tmp_path_factory, tiny_tokenizer):
    """A tiny LlamaForCausalLM whose weights are re-drawn with std 0.15 so greedy outputs vary from token to
    token (transformers' 0.02 init makes a 2-layer model repeat one token, which would make parity trivial)."""
    import torch
    import transformers

    from megatron_solopo.data.testing import build_tiny_llama

    path = tmp_path_factory.mktemp("tiny_llama")
    build_tiny_llama(path, tiny_tokenizer, hidden_size=64)
    model = transformers.AutoModelForCausalLM.from_pretrained(str(path))
    generator = torch.Generator().manual_seed(0)
    with torch.no_grad():
        for name, param in model.named_parameters():
            if "norm" not in name:
                param.copy_(torch.randn(param.shape, generator=generator) * 0.15)
    model.save_pretrained(str(path))
    return str(path)
