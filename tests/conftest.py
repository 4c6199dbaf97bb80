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


def pytest_configure(config):
    config.addinivalue_line("markers", "gpu: needs a CUDA GPU; run with --run-gpu (make test-gpu)")
    config.addinivalue_line("markers", "slow: longer CPU test, still part of `make test`")


def pytest_collection_modifyitems(config, items):
    import torch

    run_gpu = config.getoption("--run-gpu") and torch.cuda.is_available()
    reason = "needs CUDA and --run-gpu" if not torch.cuda.is_available() else "pass --run-gpu to run"
    for item in items:
        if "gpu" in item.keywords and not run_gpu:
            item.add_marker(pytest.mark.skip(reason=reason))
