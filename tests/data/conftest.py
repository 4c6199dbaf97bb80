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
def synthetic_items():
    from megatron_solopo.data.synthetic import generate_synthetic_qa

    return generate_synthetic_qa(30, seed=7)
