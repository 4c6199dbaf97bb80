"""Fixtures of the data tests: a tiny BPE tokenizer with a chat template, a tiny random Llama."""

import pytest


@pytest.fixture(scope="session")
def tiny_tokenizer():
    from tiny_models import build_tiny_tokenizer

    return build_tiny_tokenizer()


@pytest.fixture(scope="session")
def tiny_model_dir(tmp_path_factory, tiny_tokenizer):
    from tiny_models import build_tiny_llama

    return build_tiny_llama(tmp_path_factory.mktemp("tiny_llama"), tiny_tokenizer)


@pytest.fixture(scope="session")
def varied_model_dir(tmp_path_factory, tiny_tokenizer):
    """Like `tiny_model_dir`, with weights whose greedy outputs vary from token to token (not the top-level
    `tiny_hf_dir`: it is session-scoped on the top-level tokenizer, which this folder overrides)."""
    from tiny_models import build_tiny_llama

    return build_tiny_llama(tmp_path_factory.mktemp("varied_llama"), tiny_tokenizer, hidden_size=64, init_std=0.15)


@pytest.fixture(scope="session")
def synthetic_items():
    from megatron_solopo.data.synthetic import generate_synthetic_qa

    return generate_synthetic_qa(30, seed=7)


@pytest.fixture(scope="session")
def tiny_hf_dir():
    """Refused here: the top-level fixture is session-scoped on `tiny_tokenizer`, which this folder overrides,
    so building it from here would hand every later test a model with the wrong tokenizer."""
    raise RuntimeError("tests/data overrides tiny_tokenizer: use varied_model_dir (or tiny_model_dir) here")
