"""The requested device wins over a visible GPU (CPU tests and `bench --device cpu` on a GPU host).

CUDA is made to look available by monkeypatching torch.cuda.is_available; the checks are what each
component would pick, never an actual CUDA call.
"""

from __future__ import annotations

import argparse

import pytest
import torch

from megatron_solopo.parallel import device as device_mod
from megatron_solopo.parallel.device import DEVICE_ENV, cuda_in_use, request_device, requested_device


@pytest.fixture
def gpu_host(monkeypatch):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.delenv(DEVICE_ENV, raising=False)
    return monkeypatch


def test_the_test_suite_runs_on_the_cpu():
    assert requested_device() == "cpu"  # tests/conftest.py
    assert not cuda_in_use()


def test_a_cpu_request_keeps_gloo_and_the_cpu_on_a_gpu_host(gpu_host):
    from megatron_solopo.parallel.distributed import default_backend

    assert cuda_in_use() and default_backend() == "nccl"  # nothing requested: the GPU
    gpu_host.setenv(DEVICE_ENV, "cpu")
    assert not cuda_in_use()
    assert default_backend() == "gloo"
    assert device_mod.compute_device() == torch.device("cpu")


def test_a_cpu_request_picks_sdpa_and_refuses_te(gpu_host):
    from megatron_solopo.model import backends

    gpu_host.setattr(backends, "te_importable", lambda: True)
    gpu_host.setenv(DEVICE_ENV, "cpu")
    assert backends.resolve_attention_backend("auto", "fp32") == "sdpa"
    with pytest.raises(ValueError, match="needs a CUDA GPU"):
        backends.resolve_attention_backend("te", "bf16")


def test_request_device_validates_and_is_inherited_through_the_environment(gpu_host):
    request_device("cpu")
    assert requested_device() == "cpu" and not cuda_in_use()
    request_device(None)
    assert requested_device() is None and cuda_in_use()
    with pytest.raises(ValueError, match="cpu, cuda"):
        request_device("tpu")
    gpu_host.setenv(DEVICE_ENV, "gpu0")
    with pytest.raises(ValueError, match=DEVICE_ENV):
        requested_device()


def test_cuda_requested_without_a_gpu_is_an_error(monkeypatch):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    monkeypatch.setenv(DEVICE_ENV, "cuda")
    with pytest.raises(ValueError, match="no CUDA GPU"):
        cuda_in_use()


def test_the_cpu_shim_installs_on_a_gpu_host_when_the_cpu_is_requested(gpu_host):
    from megatron_solopo.parallel import shim

    gpu_host.setattr(shim, "_installed", True)  # do not patch torch.cuda for real: only the decision is tested
    gpu_host.setenv(DEVICE_ENV, "cpu")
    assert shim.install_cpu_shim() is True
    gpu_host.setenv(DEVICE_ENV, "cuda")
    assert shim.install_cpu_shim() is False


def test_bench_device_cpu_runs_our_stack_on_the_cpu(gpu_host):
    from megatron_solopo.commands import bench as commands

    parser = argparse.ArgumentParser()
    commands.add_arguments(parser)
    cfg = commands.config_from_args(parser.parse_args(["--device", "cpu"]))
    assert cfg.device == "cpu" and cfg.preset == "tiny"
    assert commands.config_from_args(parser.parse_args([])).device == "cuda"  # GPU host, nothing requested
    calls = {}

    def fake_initialize_parallel(parallel, seed, backend=None):
        calls["backend"] = backend
        calls["device_env"] = requested_device()

    gpu_host.setattr(commands, "initialize_parallel", fake_initialize_parallel)  # where _init_parallel looks it up
    commands._init_parallel(cfg)
    assert calls == {"backend": "gloo", "device_env": "cpu"}  # the builder then keeps the model on the CPU
    assert not cuda_in_use()


def test_fp32_with_auto_on_a_gpu_with_te_is_refused(gpu_host):
    from megatron_solopo.model import backends

    gpu_host.setattr(backends, "te_importable", lambda: True)
    with pytest.raises(ValueError, match="params_dtype=bf16"):
        backends.resolve_attention_backend("auto", "fp32")
    assert backends.resolve_attention_backend("auto", "bf16") == "te"
    assert backends.resolve_attention_backend("auto", None) == "te"  # reports: no dtype, no check
    assert backends.resolve_attention_backend("sdpa", "fp32") == "sdpa"  # explicit fp32 SDPA stays allowed
    gpu_host.setattr(backends, "te_importable", lambda: False)
    assert backends.resolve_attention_backend("auto", "fp32") == "sdpa"  # no TE: SDPA runs fp32
