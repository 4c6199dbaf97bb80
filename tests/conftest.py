"""Shared pytest setup: GPU tests are opt-in and skipped without CUDA."""

import os
import sys
import warnings

import pytest

sys.path.insert(0, os.path.dirname(__file__))  # tests/dist_utils.py for multi-process helpers
warnings.filterwarnings("ignore", message=".*Apex is not installed.*")
warnings.filterwarnings("ignore", message=".*Transformer Engine and Apex are not installed.*")


def pytest_addoption(parser):
    parser.addoption("--run-gpu", action="store_true", help="run tests marked gpu (needs CUDA)")


# CPU tests stay on the CPU on a GPU host too: the requested device (megatron_solopo.parallel.device) is
# inherited by every process the tests spawn (gloo ranks); only tests marked gpu request CUDA.
os.environ["SOLOPO_DEVICE"] = "cpu"


def pytest_configure(config):
    if not config.getoption("--run-gpu"):
        # hide the GPU altogether (before anything initializes CUDA): no CPU test can drift onto it
        os.environ["CUDA_VISIBLE_DEVICES"] = ""
    config.addinivalue_line("markers", "gpu: needs a CUDA GPU; run with --run-gpu (make test-gpu)")
    config.addinivalue_line("markers", "slow: longer CPU test, still part of `make test`")
    config.addinivalue_line("markers", "slurm: starts a one-node SLURM cluster on localhost (root, slurmd/slurmctld/"
                                       "munge installed); skipped with the reason where it cannot")


def pytest_collection_modifyitems(config, items):
    import torch

    run_gpu = config.getoption("--run-gpu") and torch.cuda.is_available()
    reason = "needs CUDA and --run-gpu" if not torch.cuda.is_available() else "pass --run-gpu to run"
    for item in items:
        if "gpu" in item.keywords and not run_gpu:
            item.add_marker(pytest.mark.skip(reason=reason))


@pytest.fixture(autouse=True)
def _requested_device(request, monkeypatch):
    """Tests marked gpu compute on CUDA (and spawn ranks that do); every other test on the CPU."""
    if "gpu" in request.keywords:
        monkeypatch.setenv("SOLOPO_DEVICE", "cuda")
    else:
        monkeypatch.setenv("SOLOPO_DEVICE", "cpu")


# ---- tiny models shared by the eval and experiment tests (tests/data overrides tiny_tokenizer with its own)
@pytest.fixture(scope="session")
def tiny_tokenizer():
    from tiny_models import build_tiny_tokenizer, synthetic_corpus

    return build_tiny_tokenizer(synthetic_corpus(10))


@pytest.fixture(scope="session")
def tiny_hf_dir(tmp_path_factory, tiny_tokenizer):
    """A tiny LlamaForCausalLM whose greedy outputs vary from token to token (weights re-drawn with std 0.15).
    Session-scoped on `tiny_tokenizer`: a folder that overrides `tiny_tokenizer` must not request it (the
    first request decides its tokenizer for the whole session); tests/data has its own `varied_model_dir`."""
    from tiny_models import build_tiny_llama

    return build_tiny_llama(tmp_path_factory.mktemp("tiny_llama"), tiny_tokenizer, hidden_size=64, init_std=0.15)
