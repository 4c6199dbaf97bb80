"""GPU checks of the step (run with --run-gpu on a CUDA machine): TE path vs SDPA path, head memory.

- the same tiny model and packed batch give the same response log-prob sums and loss through the
  Transformer Engine attention and through SDPA (bf16, so a bf16 tolerance);
- the SDPA training step on CUDA in bf16 gives the loss of the same step on the CPU in fp32 (bf16
  tolerance), the model really on each device (SOLOPO_DEVICE picks it; tests/conftest.py);
- the response-only LM head at a 16K-token context with a 32K vocabulary adds far less CUDA memory
  than the [tokens x vocab] fp32 logits of the ordinary head (2 GiB) would.
"""

import pytest
import torch
from dist_utils import run_distributed
from step_helpers import make_samples, set_weights_by_name

pytestmark = pytest.mark.gpu


def _te_vs_sdpa(rank, world_size):
    from megatron_solopo.model import ModelConfig, get_preset
    from megatron_solopo.model.builder import build_model_chunks
    from megatron_solopo.objectives import ObjectiveConfig
    from megatron_solopo.parallel import ParallelConfig, initialize_parallel
    from megatron_solopo.training.batching import collate_microbatches, collate_scoring_microbatches
    from megatron_solopo.training.config import TrainConfig
    from megatron_solopo.training.optim import build_training_objects
    from megatron_solopo.training.step import forward_only, train_step

    parallel = initialize_parallel(ParallelConfig(), seed=1)
    objective = ObjectiveConfig(name="orpo", mode="solo")
    samples = make_samples(4, seed=21)
    out = {}
    for backend in ("te", "sdpa"):
        chunks = build_model_chunks(get_preset("tiny"), parallel, ModelConfig(attention_backend=backend,
                                                                              params_dtype="bf16"))
        set_weights_by_name(chunks, seed=4)
        scoring = collate_scoring_microbatches(samples, ("short_chosen", "short_rejected", "long_chosen"), parallel,
                                               "packed", 2, pad_to_multiple_of=16)
        logps = forward_only(chunks, scoring, parallel)
        chunks, optimizer, scheduler = build_training_objects(chunks, TrainConfig(lr=1e-4), total_steps=4)
        microbatches = collate_microbatches(samples, objective, parallel, "packed", 2, pad_to_multiple_of=16)
        result = train_step(chunks, optimizer, scheduler, microbatches, objective, parallel, step_index=0)
        out[backend] = {"logps": logps, "loss": result.loss, "grad_norm": result.grad_norm}
    return out


def _sdpa_step(rank, world_size, dtype):
    from megatron_solopo.model import ModelConfig, get_preset
    from megatron_solopo.model.builder import build_model_chunks
    from megatron_solopo.objectives import ObjectiveConfig
    from megatron_solopo.parallel import ParallelConfig, initialize_parallel
    from megatron_solopo.training.batching import collate_microbatches
    from megatron_solopo.training.config import TrainConfig
    from megatron_solopo.training.optim import build_training_objects
    from megatron_solopo.training.step import train_step

    parallel = initialize_parallel(ParallelConfig(), seed=1)
    objective = ObjectiveConfig(name="orpo", mode="solo")
    chunks = build_model_chunks(get_preset("tiny"), parallel, ModelConfig(attention_backend="sdpa",
                                                                          params_dtype=dtype))
    set_weights_by_name(chunks, seed=4)
    device = str(next(chunks[0].parameters()).device)
    chunks, optimizer, scheduler = build_training_objects(chunks, TrainConfig(lr=1e-4), total_steps=4)
    microbatches = collate_microbatches(make_samples(4, seed=23), objective, parallel, "packed", 2)
    result = train_step(chunks, optimizer, scheduler, microbatches, objective, parallel, step_index=0)
    return {"loss": result.loss, "grad_norm": result.grad_norm, "device": device}


def _head_memory(rank, world_size):
    from megatron_solopo.model import ModelConfig, get_preset
    from megatron_solopo.model.builder import build_model_chunks
    from megatron_solopo.model.logprobs import make_output_processor
    from megatron_solopo.parallel import ParallelConfig, initialize_parallel
    from megatron_solopo.training.batching import collate_scoring_microbatches

    parallel = initialize_parallel(ParallelConfig(), seed=1)
    vocab = 32768
    preset = get_preset("tiny").replace(vocab_size=vocab)
    # bf16: SDPA's flash kernel keeps attention memory linear in the length (fp32 would use the math kernel)
    model = build_model_chunks(preset, parallel, ModelConfig(attention_backend="sdpa", params_dtype="bf16"))[0]
    samples = make_samples(1, seed=22, vocab=vocab, long=(16384, 16384), response=(32, 32))
    mb = collate_scoring_microbatches(samples, ("long_chosen",), parallel, "packed", 1)[0].to("cuda")
    torch.cuda.synchronize()
    torch.cuda.reset_peak_memory_stats()
    base = torch.cuda.memory_allocated()
    sums = model(mb.tokens, mb.position_ids, None, packed_seq_params=mb.packed_seq_params,
                 output_processor=make_output_processor(), output_processor_context=mb.rows)
    sums.sum().backward()
    torch.cuda.synchronize()
    return {"peak_extra_bytes": torch.cuda.max_memory_allocated() - base, "tokens": mb.tokens.numel(),
            "vocab": vocab, "finite": bool(torch.isfinite(sums).all())}


def test_te_and_sdpa_paths_agree():
    pytest.importorskip("transformer_engine.pytorch")
    out = run_distributed(_te_vs_sdpa, 1)[0]
    te, sdpa = out["te"], out["sdpa"]
    for sample_id, roles in sdpa["logps"].items():
        for role, value in roles.items():
            assert te["logps"][sample_id][role] == pytest.approx(value, rel=2e-2, abs=0.5)
    assert te["loss"] == pytest.approx(sdpa["loss"], rel=2e-2)
    assert te["grad_norm"] == pytest.approx(sdpa["grad_norm"], rel=5e-2)


def test_sdpa_training_step_on_cuda_matches_the_cpu_fp32_step(monkeypatch):
    import os

    visible = os.environ.get("CUDA_VISIBLE_DEVICES")
    # the reference: the CPU path of the CPU suite, its rank spawned with CUDA hidden (as tests/conftest.py does)
    monkeypatch.setenv("SOLOPO_DEVICE", "cpu")
    monkeypatch.setenv("CUDA_VISIBLE_DEVICES", "")
    cpu = run_distributed(_sdpa_step, 1, "fp32")[0]
    if visible is None:
        monkeypatch.delenv("CUDA_VISIBLE_DEVICES")
    else:
        monkeypatch.setenv("CUDA_VISIBLE_DEVICES", visible)
    monkeypatch.setenv("SOLOPO_DEVICE", "cuda")
    gpu = run_distributed(_sdpa_step, 1, "bf16")[0]
    assert cpu["device"] == "cpu" and gpu["device"].startswith("cuda"), (cpu, gpu)
    assert gpu["loss"] == pytest.approx(cpu["loss"], rel=2e-2)
    assert gpu["grad_norm"] == pytest.approx(cpu["grad_norm"], rel=5e-2)


def test_response_only_head_memory_on_cuda():
    out = run_distributed(_head_memory, 1)[0]
    full_logits_bytes = out["tokens"] * out["vocab"] * 4
    assert out["finite"]
    assert out["peak_extra_bytes"] < full_logits_bytes / 8, out
