"""Fixtures of the data tests: a tiny BPE tokenizer with a chat template, a tiny random Llama."""

import pytest


@pytest.fixture(scope="session")
def data_tokenizer():
    """The data tests' tokenizer (the default tiny BPE with a chat template); its own name, not the top-level
    `tiny_tokenizer` (another corpus): a fixture name shadowed per folder once gave the session-scoped
    top-level model the wrong vocabulary."""
    from tiny_models import build_tiny_tokenizer

    return build_tiny_tokenizer()


@pytest.fixture(scope="session")
def tiny_model_dir(tmp_path_factory, data_tokenizer):
    from tiny_models import build_tiny_llama

    return build_tiny_llama(tmp_path_factory.mktemp("tiny_llama"), data_tokenizer)


@pytest.fixture(scope="session")
def varied_model_dir(tmp_path_factory, data_tokenizer):
    """Like `tiny_model_dir`, with weights whose greedy outputs vary from token to token (the top-level
    `tiny_hf_dir` is the same kind of model on the top-level `tiny_tokenizer`, another vocabulary)."""
    from tiny_models import build_tiny_llama

    return build_tiny_llama(tmp_path_factory.mktemp("varied_llama"), data_tokenizer, hidden_size=64, init_std=0.15)


@pytest.fixture(scope="session")
def synthetic_items():
    from megatron_solopo.data.synthetic import generate_synthetic_qa

    return generate_synthetic_qa(30, seed=7)
