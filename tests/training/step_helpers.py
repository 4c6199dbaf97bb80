"""Helpers for the training-step tests: random tokenized pairs, layout-independent weights, full tensors.

Megatron draws initial weights per pipeline stage from one RNG stream, so a PP=2 model does not start
from the PP=1 weights. `set_weights_by_name` gives every parameter a value that depends only on its
global name (layer numbers made global) and its TP slice, so all layouts hold the same function.
"""

from __future__ import annotations

import random
import re
import zlib

import pytest
import torch

from megatron_solopo.model.families.tables import te_to_local_name
from megatron_solopo.data.tokenization import sample_from_token_ids

ROLES = ("short_chosen", "short_rejected", "long_chosen", "long_rejected")


def make_samples(num_pairs: int, seed: int = 0, vocab: int = 256, short=(6, 14), long=(20, 40), response=(2, 7),
                 prefix: str = "pair"):
    """Tokenized preference pairs in the data room's format (random tokens, shared responses)."""
    rng = random.Random(seed)
    samples = []
    for index in range(num_pairs):
        x_short = [rng.randrange(1, vocab) for _ in range(rng.randint(*short))]
        x_long = [rng.randrange(1, vocab) for _ in range(rng.randint(*long))]
        y_w = [rng.randrange(1, vocab) for _ in range(rng.randint(*response))]
        y_l = [rng.randrange(1, vocab) for _ in range(rng.randint(*response))]
        samples.append(sample_from_token_ids(f"{prefix}{index}", x_short, x_long, y_w, y_l))
    return samples


def with_synthetic_reference_logps(samples: list) -> list:
    """Gives every sample made-up reference log-probs (DPO needs them), distinct per pair; returns `samples`."""
    for i, sample in enumerate(samples):
        for role in ("short_chosen", "short_rejected", "long_chosen"):
            sample[f"ref_{role}_logps"] = -5.5 * sum(sample[f"{role}_loss_mask"]) + 0.3 * i
    return samples


def _unwrap(chunk):
    while hasattr(chunk, "module"):
        chunk = chunk.module
    return chunk


def global_param_names(chunk) -> dict[str, torch.nn.Parameter]:
    """{global name: parameter} of one GPTModel chunk (decoder layer indices made global)."""
    model = _unwrap(chunk)
    offsets = {str(i): layer.layer_number - 1 for i, layer in enumerate(model.decoder.layers)}
    named = {}
    for name, param in model.named_parameters():
        match = re.match(r"decoder\.layers\.(\d+)\.(.*)", name)
        if match:
            name = f"decoder.layers.{offsets[match.group(1)]}.{match.group(2)}"
        named[name] = param
    return named


def _tp_info(param) -> tuple[int, int, int]:
    from megatron.core import parallel_state

    if not getattr(param, "tensor_model_parallel", False):
        return -1, 0, 1
    return param.partition_dim, parallel_state.get_tensor_model_parallel_rank(), \
        parallel_state.get_tensor_model_parallel_world_size()


def _full_shape(param) -> list[int]:
    dim, _, tp = _tp_info(param)
    shape = list(param.shape)
    if dim >= 0:
        shape[dim] *= tp
    return shape


def _local_slice(name: str, full: torch.Tensor, param) -> torch.Tensor:
    dim, rank, tp = _tp_info(param)
    if dim < 0:
        return full
    if name.endswith("linear_fc1.weight"):  # SwiGLU: each TP rank holds [gate_r; up_r]
        gate, up = full.chunk(2, dim=0)
        return torch.cat([gate.chunk(tp, dim=0)[rank], up.chunk(tp, dim=0)[rank]], dim=0)
    return full.chunk(tp, dim=dim)[rank]


def is_norm_weight(name: str) -> bool:
    """A norm's scale (drawn around 1), under local-spec or TE names (layer_norm_weight inside linears)."""
    name = te_to_local_name(name)
    return "layernorm" in name or "final_norm" in name


def set_weights_by_name(model_chunks, seed: int = 0, std: float = 0.05) -> None:
    """Deterministic weights from (seed, global name): the same model on every TP/PP/CP/DP layout and
    on both layer specs (TE's fused-norm names are keyed by their local-spec names)."""
    for chunk in model_chunks:
        for name, param in global_param_names(chunk).items():
            key = te_to_local_name(name)
            gen = torch.Generator().manual_seed(seed * 1_000_003 + zlib.crc32(key.encode()))
            full = torch.randn(_full_shape(param), generator=gen, dtype=torch.float32)
            full = 1.0 + 0.1 * full if is_norm_weight(key) else std * full
            with torch.no_grad():
                param.copy_(_local_slice(name, full, param).to(param.dtype))


def snapshot(model_chunks) -> dict[str, torch.Tensor]:
    """{global name: local tensor copy}."""
    out = {}
    for chunk in model_chunks:
        for name, param in global_param_names(chunk).items():
            out[name] = param.detach().float().clone()
    return out


def local_shards(model_chunks, tensors: dict[str, torch.Tensor]) -> dict[str, dict]:
    """What a rank reports for reassembly: {name: {tensor, dim, tp_rank, tp}}."""
    out = {}
    for chunk in model_chunks:
        for name, param in global_param_names(chunk).items():
            dim, rank, tp = _tp_info(param)
            out[name] = {"tensor": tensors[name], "dim": dim, "tp_rank": rank, "tp": tp}
    return out


def assemble(rank_shards: list[dict[str, dict]]) -> dict[str, torch.Tensor]:
    """Full tensors from every rank's shards (TP concatenated; PP union; DP/CP replicas checked equal)."""
    pieces: dict[str, dict[int, torch.Tensor]] = {}
    meta: dict[str, tuple[int, int]] = {}
    for shards in rank_shards:
        for name, info in shards.items():
            slot = pieces.setdefault(name, {})
            if info["tp_rank"] in slot:
                torch.testing.assert_close(slot[info["tp_rank"]], info["tensor"], rtol=1e-5, atol=1e-7,
                                           msg=f"{name}: replicas (DP/CP) disagree")
            else:
                slot[info["tp_rank"]] = info["tensor"]
            meta[name] = (info["dim"], info["tp"])
    full = {}
    for name, slot in pieces.items():
        dim, _ = meta[name]
        ordered = [slot[r] for r in sorted(slot)]
        if dim < 0:
            full[name] = ordered[0]
        elif name.endswith("linear_fc1.weight"):
            gates, ups = zip(*(t.chunk(2, dim=0) for t in ordered))
            full[name] = torch.cat([*gates, *ups], dim=0)
        else:
            full[name] = torch.cat(ordered, dim=dim)
    return full


# --- one layout's training step, and the layout-free reference it must equal -------------------------------


def build_layout(tp: int, pp: int, cp: int, backend: str = "sdpa", preset: str = "tiny", virtual_pp=None,
                 sequence_parallel: bool = False):
    """(parallel context, model chunks) of `preset` on this layout, weights set by global name."""
    from megatron_solopo.model import ModelConfig, get_preset
    from megatron_solopo.model.builder import build_model_chunks
    from megatron_solopo.parallel import ParallelConfig, initialize_parallel

    parallel = initialize_parallel(ParallelConfig(tp=tp, pp=pp, cp=cp, virtual_pp=virtual_pp,
                                                  sequence_parallel=sequence_parallel), seed=1)
    chunks = build_model_chunks(get_preset(preset), parallel, ModelConfig(attention_backend=backend))
    set_weights_by_name(chunks)
    return parallel, chunks


def data_parallel_share(samples: list) -> list:
    """This DP rank's contiguous share of `samples` (the test's stand-in for the data loader)."""
    from megatron.core import parallel_state

    dp, dp_rank = parallel_state.get_data_parallel_world_size(), parallel_state.get_data_parallel_rank()
    per_rank = len(samples) // dp
    return samples[dp_rank * per_rank:(dp_rank + 1) * per_rank]


def train_layout(samples: list, objective, tp: int, pp: int, cp: int, backend: str, layout: str,
                 micro_batch_pairs: int, distributed_optimizer: bool = False, preset: str = "tiny",
                 virtual_pp=None, sequence_parallel: bool = False) -> dict:
    """One real training step (collate -> Megatron schedule -> DDP -> optimizer) on this layout.

    Adam with lr = eps = 1e6 and no clipping makes the update -g / (1 + |g| / 1e6): the negative
    gradient to 1e-7 relative, so `update` can be compared with `manual_reference`'s."""
    from megatron_solopo.training.batching import collate_microbatches
    from megatron_solopo.training.config import TrainConfig
    from megatron_solopo.training.optim import build_training_objects
    from megatron_solopo.training.step import train_step

    parallel, chunks = build_layout(tp, pp, cp, backend, preset, virtual_pp, sequence_parallel)
    train = TrainConfig(lr=1e6, adam_eps=1e6, clip_grad=0.0, distributed_optimizer=distributed_optimizer)
    chunks, optimizer, scheduler = build_training_objects(chunks, train, total_steps=4)
    before = snapshot(chunks)
    microbatches = collate_microbatches(data_parallel_share(samples), objective, parallel, layout, micro_batch_pairs)
    result = train_step(chunks, optimizer, scheduler, microbatches, objective, parallel, step_index=0)
    after = snapshot(chunks)
    return {"loss": result.loss, "metrics": result.metrics, "num_pairs": result.num_pairs,
            "num_tokens": result.num_tokens, "lr": result.lr, "n_microbatches": len(microbatches),
            "update": local_shards(chunks, {k: after[k] - before[k] for k in before})}


def manual_reference(samples: list, objective, tp: int = 1, preset: str = "tiny") -> dict:
    """Mean objective over all `samples` by plain autograd on an unwrapped model (CP=PP=1, no schedule,
    DDP or optimizer): {"loss", "update" = -gradient as local shards}."""
    from megatron_solopo.model.logprobs import make_output_processor
    from megatron_solopo.objectives import objective_loss
    from megatron_solopo.training.batching import collate_microbatches

    parallel, chunks = build_layout(tp, 1, 1, "sdpa", preset)
    model = chunks[0]
    microbatches = collate_microbatches(samples, objective, parallel, "packed", 2)
    stats: dict[str, list] = {}
    for mb in microbatches:
        sums = model(mb.tokens, mb.position_ids, None, packed_seq_params=mb.packed_seq_params,
                     output_processor=make_output_processor(), output_processor_context=mb.rows)
        for key, value in mb.batch_stats(sums).items():
            stats.setdefault(key, []).append(value)
    loss, _ = objective_loss(objective, {k: torch.cat(v) for k, v in stats.items()}, reduction="mean")
    loss.backward()
    named = {}
    for chunk in chunks:
        named.update(global_param_names(chunk))
    grads = {name: -param.grad.detach().clone() for name, param in named.items()}
    return {"loss": float(loss), "update": local_shards(chunks, grads)}


def run_timed(runs: dict) -> dict:
    """{name: runs[name]()} in order, plus "seconds": {name: wall seconds} (printed by the tests)."""
    import time

    results, seconds = {}, {}
    for name, run in runs.items():
        start = time.perf_counter()
        results[name] = run()
        seconds[name] = round(time.perf_counter() - start, 2)
    results["seconds"] = seconds
    return results


def assert_update_is_minus_reference_gradient(group_results: list, layout: str, rtol: float, atol: float) -> None:
    """Every rank's reassembled update of `layout` equals the (reassembled) negative reference gradient."""
    reference = assemble([r["reference"]["update"] for r in group_results])
    update = assemble([r[layout]["update"] for r in group_results])
    assert set(update) == set(reference)
    for name in reference:
        torch.testing.assert_close(update[name], reference[name], rtol=rtol, atol=atol, msg=f"{layout}: {name}")
    assert max(t.abs().max() for t in reference.values()) > 1e-4  # a real gradient, not zeros


def assert_loss_and_counts_are_global(group_results: list, layout: str, num_pairs: int) -> None:
    """Every rank reports the reference's global mean loss, all pairs and one token count."""
    expected = group_results[0]["reference"]["loss"]
    for rank_result in group_results:
        got = rank_result[layout]
        assert got["loss"] == pytest.approx(expected, rel=1e-5)
        assert got["num_pairs"] == num_pairs
    assert len({r[layout]["num_tokens"] for r in group_results}) == 1
