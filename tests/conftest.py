"""Shared pytest setup: GPU tests and real-model tests are opt-in (--run-gpu, --real-model)."""

import os
import subprocess
import sys
import warnings

import pytest

sys.path.insert(0, os.path.dirname(__file__))  # tests/dist_utils.py for multi-process helpers
from tiny_runs import REPO, tiny_run_command, tiny_run_env  # noqa: E402
warnings.filterwarnings("ignore", message=".*Apex is not installed.*")
warnings.filterwarnings("ignore", message=".*Transformer Engine and Apex are not installed.*")


def pytest_addoption(parser):
    parser.addoption("--run-gpu", action="store_true", help="run tests marked gpu (needs CUDA)")
    parser.addoption("--real-model", action="store_true",
                     help="run tests marked real_model on the default model (fetched first when not cached)")


# CPU tests stay on the CPU on a GPU host too: the requested device (megatron_solopo.parallel.device) is
# inherited by every process the tests spawn (gloo ranks); only tests marked gpu request CUDA.
os.environ["SOLOPO_DEVICE"] = "cpu"


def pytest_configure(config):
    if not config.getoption("--run-gpu"):
        # hide the GPU altogether (before anything initializes CUDA): no CPU test can drift onto it
        os.environ["CUDA_VISIBLE_DEVICES"] = ""
    config.addinivalue_line("markers", "gpu: needs a CUDA GPU; run with --run-gpu (make test-gpu)")
    config.addinivalue_line("markers", "slow: longer CPU test, still part of `make test`")
    config.addinivalue_line("markers", "real_model: runs the default model (SmolLM2-135M); run with --real-model "
                                       "(make test-real-model), whatever the model cache holds")
    config.addinivalue_line("markers", "slurm: starts a one-node SLURM cluster on localhost (root, slurmd/slurmctld/"
                                       "munge installed); skipped with the reason where it cannot")


def pytest_collection_modifyitems(config, items):
    import torch

    run_gpu = config.getoption("--run-gpu") and torch.cuda.is_available()
    reason = "needs CUDA and --run-gpu" if not torch.cuda.is_available() else "pass --run-gpu to run"
    run_real_model = config.getoption("--real-model")
    for item in items:
        if "gpu" in item.keywords and not run_gpu:
            item.add_marker(pytest.mark.skip(reason=reason))
        if "real_model" in item.keywords and not run_real_model:
            item.add_marker(pytest.mark.skip(reason="pass --real-model to run (make test-real-model)"))


@pytest.fixture(scope="session")
def finished_tiny_run(tmp_path_factory):
    """(run directory, data cache) of one finished `tiny_run_command` training, made once per session in a
    subprocess and shared by the fault tests (resume, damaged checkpoints, locks) and the no-overwrite tests. Read-only: a test that changes the
    run works on a copy (shutil.copytree)."""
    root = tmp_path_factory.mktemp("finished_tiny_run")
    run, cache = root / "run", root / "cache"
    result = subprocess.run(tiny_run_command(run, cache), cwd=REPO, env=tiny_run_env(),
                            capture_output=True, text=True, timeout=600, check=False)
    assert result.returncode == 0, result.stderr[-3000:]
    return run, cache


@pytest.fixture(scope="session")
def real_model_dirs():
    """(hf_dir, mcore_dir) of the default model, fetched when the cache lacks it (real_model tests only:
    whether they run is the --real-model option's choice, never the cache's)."""
    from megatron_solopo.convert.default_model import default_model_dirs as dirs
    from megatron_solopo.convert.default_model import ensure_default_model

    ensure_default_model()
    return dirs()


@pytest.fixture(autouse=True)
def _requested_device(request, monkeypatch):
    """Tests marked gpu compute on CUDA (and spawn ranks that do); every other test on the CPU."""
    if "gpu" in request.keywords:
        monkeypatch.setenv("SOLOPO_DEVICE", "cuda")
    else:
        monkeypatch.setenv("SOLOPO_DEVICE", "cpu")


# ---- tiny models shared by the eval and experiment tests (tests/data has its own, named data_tokenizer etc.)
@pytest.fixture(scope="session")
def tiny_tokenizer():
    from tiny_models import build_tiny_tokenizer, synthetic_corpus

    return build_tiny_tokenizer(synthetic_corpus(10))


@pytest.fixture(scope="session")
def tiny_hf_dir(tmp_path_factory, tiny_tokenizer):
    """A tiny LlamaForCausalLM whose greedy outputs vary from token to token (weights re-drawn with std 0.15).
    Session-scoped on `tiny_tokenizer`; no folder may define another fixture of that name (the first request
    would decide the tokenizer for the whole session): tests/data names its own `data_tokenizer`."""
    from tiny_models import build_tiny_llama

    return build_tiny_llama(tmp_path_factory.mktemp("tiny_llama"), tiny_tokenizer, hidden_size=64, init_std=0.15)
