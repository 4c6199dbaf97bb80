"""The response-only LM head, the layouts, NaN handling and the LR schedule in one process.

- head log-probs == log_softmax of GPTModel's full logits (the standard path) per response token,
  for local attention + padded layout and SDPA + padded / packed layouts;
- chunking + recomputation changes nothing (values, parameter gradients);
- memory: the output layer sees exactly the response rows, chunk by chunk, and the largest
  vocab-wide tensor of forward + backward does not grow with the context length;
- forward_only returns the same sums; NaN loss / NaN gradients stop the step before the update.
"""

import math

import pytest
import torch
from dist_utils import run_distributed
from step_helpers import make_samples, set_weights_by_name, snapshot

ROLES = ("short_chosen", "short_rejected", "long_chosen", "long_rejected")
VOCAB = 384  # the memory test tells logits by their last dimension: unlike tiny's 256 = 2 x ffn (SwiGLU fc1)


def _model(backend, vocab_size=256):
    from megatron_solopo.model import ModelConfig, get_preset
    from megatron_solopo.model.builder import build_model_chunks
    from megatron_solopo.parallel import ParallelConfig

    preset = get_preset("tiny").replace(vocab_size=vocab_size)
    chunks = build_model_chunks(preset, ParallelConfig(), ModelConfig(attention_backend=backend))
    set_weights_by_name(chunks, seed=2)
    return chunks


def _full_logits_reference(model, samples):
    """{(sample, role): [response-token log-probs]} from the model's ordinary full-vocabulary logits."""
    out = {}
    for sample in samples:
        for role in ROLES:
            ids = torch.tensor(sample[f"{role}_input_ids"]).unsqueeze(0)
            mask = torch.tensor(sample[f"{role}_loss_mask"])
            logits = model(ids, torch.arange(ids.size(1)).unsqueeze(0), None)  # [1, s, V]
            logps = torch.log_softmax(logits.float()[0, :-1], dim=-1).gather(1, ids[0, 1:, None])[:, 0]
            out[(sample["id"], role)] = logps[mask[1:].bool()].detach()
    return out


def _head_per_token(model, mb, head=None):
    from megatron_solopo.model.logprobs import response_token_logprobs

    def processor(hidden_states, output_layer, output_weight, context, **_):
        return response_token_logprobs(hidden_states, output_layer, context, output_weight, head)

    logps, segments = model(mb.tokens, mb.position_ids, None, packed_seq_params=mb.packed_seq_params,
                            output_processor=processor, output_processor_context=mb.rows)
    out = {}
    for k in range(mb.num_sequences):
        out[(mb.sample_ids[k // len(mb.roles)], mb.roles[k % len(mb.roles)])] = logps[segments == k].detach()
    return out


def _head_checks():
    from megatron_solopo.parallel import current_parallel_context
    from megatron_solopo.training.batching import collate_scoring_microbatches

    samples = make_samples(3, seed=11)
    results = {}
    for backend, layout in (("local", "padded"), ("sdpa", "padded"), ("sdpa", "packed")):
        model = _model(backend)[0]
        reference = _full_logits_reference(model, samples)
        mb = collate_scoring_microbatches(samples, ROLES, current_parallel_context(), layout, 3)[0]
        results[(backend, layout)] = {"head": _head_per_token(model, mb), "reference": reference}
    return results


def _chunking_and_recompute():
    from megatron_solopo.model.logprobs import LogprobHeadConfig, make_output_processor
    from megatron_solopo.parallel import current_parallel_context
    from megatron_solopo.training.batching import collate_scoring_microbatches

    mb = collate_scoring_microbatches(make_samples(3, seed=12), ROLES, current_parallel_context(), "packed", 3)[0]
    out = {}
    for head in (LogprobHeadConfig(chunk_tokens=4096, recompute=False), LogprobHeadConfig(chunk_tokens=3)):
        model = _model("sdpa")[0]
        sums = model(mb.tokens, mb.position_ids, None, packed_seq_params=mb.packed_seq_params,
                     output_processor=make_output_processor(head), output_processor_context=mb.rows)
        (sums * torch.linspace(0.5, 2.0, sums.numel())).sum().backward()
        out[head.chunk_tokens] = {"sums": sums.detach(),
                                  "grads": {n: p.grad.clone() for n, p in model.named_parameters()}}
    return out


class _VocabWideTensors(torch.utils._python_dispatch.TorchDispatchMode):
    """Records the most rows of any [..., vocab] activation made in forward + backward (logits,
    softmax, their gradients); the output weight's transpose [hidden, vocab] is not an activation."""

    def __init__(self, hidden_size: int):
        super().__init__()
        self.hidden_size, self.largest_rows = hidden_size, 0

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        result = func(*args, **(kwargs or {}))
        for tensor in result if isinstance(result, (tuple, list)) else (result,):
            if (isinstance(tensor, torch.Tensor) and tensor.dim() >= 1 and tensor.size(-1) == VOCAB
                    and tuple(tensor.shape) != (self.hidden_size, VOCAB)):
                self.largest_rows = max(self.largest_rows, tensor.numel() // VOCAB)
        return result


def _memory_checks():
    """Rows fed to the output layer and the largest vocab-wide tensor, short vs 16x longer contexts."""
    from megatron_solopo.model.logprobs import LogprobHeadConfig, make_output_processor
    from megatron_solopo.parallel import current_parallel_context
    from megatron_solopo.training.batching import collate_scoring_microbatches

    model = _model("sdpa", vocab_size=VOCAB)[0]
    out = {}
    for name, long_len in (("short", (40, 40)), ("long", (640, 640))):
        samples = make_samples(2, seed=13, long=long_len, response=(5, 5))
        mb = collate_scoring_microbatches(samples, ("long_chosen",), current_parallel_context(), "packed", 2)[0]
        rows_per_call: list[int] = []

        def count_rows(module, args, output, rows_per_call=rows_per_call):
            rows_per_call.append(args[0].shape[0] * args[0].shape[1])  # input [rows, 1, h]

        hook = model.output_layer.register_forward_hook(count_rows)
        tracker = _VocabWideTensors(model.config.hidden_size)
        with tracker:
            sums = model(mb.tokens, mb.position_ids, None, packed_seq_params=mb.packed_seq_params,
                         output_processor=make_output_processor(LogprobHeadConfig(chunk_tokens=4)),
                         output_processor_context=mb.rows)
            sums.sum().backward()
        hook.remove()
        model.zero_grad()
        out[name] = {"rows_per_call": rows_per_call, "response_tokens": mb.num_response_tokens,
                     "tokens": mb.tokens.numel(), "largest_vocab_rows": tracker.largest_rows}
    return out


def _train_objects(backend="sdpa", **train_fields):
    from megatron_solopo.training.config import TrainConfig
    from megatron_solopo.training.optim import build_training_objects

    return build_training_objects(_model(backend), TrainConfig(**{"lr": 1e-3, **train_fields}), total_steps=10)


def _forward_only_and_nan_checks():
    from megatron_solopo.objectives import ObjectiveConfig
    from megatron_solopo.parallel import current_parallel_context
    from megatron_solopo.training.batching import collate_microbatches, collate_scoring_microbatches
    from megatron_solopo.training.step import NonFiniteGradError, NonFiniteLossError, forward_only, train_step

    parallel, objective = current_parallel_context(), ObjectiveConfig(name="simpo", mode="solo")
    samples = make_samples(4, seed=14, prefix="s")
    out = {}
    chunks, optimizer, scheduler = _train_objects()
    scoring = collate_scoring_microbatches(samples, ROLES, parallel, "packed", 3)
    was_training = chunks[0].training
    out["forward_only"] = forward_only(chunks, scoring, parallel)
    out["mode_restored"] = chunks[0].training == was_training
    out["reference"] = {key: float(v.sum()) for key, v in _full_logits_reference(chunks[0].module, samples).items()}

    microbatches = collate_microbatches(samples, objective, parallel, "packed", 2)
    norm = chunks[0].module.decoder.final_layernorm.weight
    with torch.no_grad():
        norm[3] = float("nan")  # every hidden state of the second micro-batch... and the first: all NaN
    before = snapshot(chunks)
    try:
        train_step(chunks, optimizer, scheduler, microbatches, objective, parallel, step_index=7)
        out["nan_loss"] = None
    except NonFiniteLossError as err:
        out["nan_loss"] = {"step": err.step_index, "ids": err.sample_ids, "message": str(err)}
    after = snapshot(chunks)
    out["unchanged_after_nan_loss"] = all(torch.equal(before[k].nan_to_num(), after[k].nan_to_num()) for k in before)

    chunks, optimizer, scheduler = _train_objects()
    chunks[0].module.decoder.layers[0].mlp.linear_fc2.weight.register_hook(lambda g: g * float("nan"))
    before = snapshot(chunks)
    try:
        train_step(chunks, optimizer, scheduler, microbatches, objective, parallel, step_index=3)
        out["nan_grad"] = None
    except NonFiniteGradError as err:
        out["nan_grad"] = {"step": err.step_index, "message": str(err)}
    after = snapshot(chunks)
    out["unchanged_after_nan_grad"] = all(torch.equal(before[k], after[k]) for k in before)
    return out


def _schedule_lrs():
    from megatron_solopo.training.config import TrainConfig
    from megatron_solopo.training.optim import build_scheduler, current_lr

    _, optimizer, _ = _train_objects(lr=1.0, min_lr=0.1, weight_decay=0.01)
    scheduler = build_scheduler(optimizer, TrainConfig(warmup_steps=2, lr_decay="linear"), total_steps=6)
    lrs = []
    for _ in range(8):
        lrs.append(current_lr(optimizer))
        scheduler.step(1)
    _, optimizer, _ = _train_objects(lr=1.0)
    cosine = build_scheduler(optimizer, TrainConfig(lr_decay="cosine"), total_steps=4)
    cos_lrs = []
    for _ in range(5):
        cos_lrs.append(current_lr(optimizer))
        cosine.step(1)
    decays = sorted({group["weight_decay"] for group in scheduler.optimizer.param_groups})
    return {"linear": lrs, "cosine": cos_lrs, "weight_decays": decays}


class _AllocatesOnCudaInBackward(torch.autograd.Function):
    """Like Megatron's sequence-parallel linear: its backward allocates with device=current_device()."""

    @staticmethod
    def forward(ctx, x):
        return x * 2

    @staticmethod
    def backward(ctx, grad):
        buffer = torch.empty(grad.shape, device=torch.cuda.current_device())
        return buffer.copy_(grad) * 2


def _shim_checks():
    """The CPU shim's additions for the step (parallel/shim.py rules 1, 5 and 7)."""
    x = torch.ones(3, requires_grad=True)
    _AllocatesOnCudaInBackward.apply(x).sum().backward()  # Tensor.backward runs the engine under the shim
    return {"type": torch.zeros(2).type(), "long_type": torch.zeros(2, dtype=torch.long).type(),
            "converted": torch.zeros(2).type("torch.cuda.DoubleTensor").dtype,
            "pinned": torch.tensor([1, 2], pin_memory=True).device.type, "backward_grad": x.grad.tolist()}


def _ra_gradient_steps():
    """One step of every SoLo-X from the same weights under ra_gradient both / long."""
    from megatron_solopo.objectives import ObjectiveConfig
    from megatron_solopo.parallel import current_parallel_context
    from megatron_solopo.training.batching import collate_microbatches
    from megatron_solopo.training.step import train_step
    from step_helpers import with_synthetic_reference_logps

    parallel = current_parallel_context()
    samples = with_synthetic_reference_logps(make_samples(2, seed=15, prefix="r"))
    out = {}
    for name in ("dpo", "ipo", "simpo", "orpo"):
        for ra_gradient in ("both", "long"):
            objective = ObjectiveConfig(name=name, mode="solo", alpha=3.0, ra_gradient=ra_gradient)
            chunks, optimizer, scheduler = _train_objects()
            microbatches = collate_microbatches(samples, objective, parallel, "packed", 2)
            result = train_step(chunks, optimizer, scheduler, microbatches, objective, parallel, step_index=1)
            out[(name, ra_gradient)] = {"loss": result.loss, "ra": result.metrics["loss/ra"],
                                        "weights": snapshot(chunks)}
    return out


def _worker(rank, world_size):
    from megatron_solopo.parallel import ParallelConfig, initialize_parallel

    initialize_parallel(ParallelConfig(), seed=3)
    return {"head": _head_checks(), "chunking": _chunking_and_recompute(), "memory": _memory_checks(),
            "steps": _forward_only_and_nan_checks(), "lrs": _schedule_lrs(), "shim": _shim_checks(),
            "ra_gradient": _ra_gradient_steps()}


@pytest.fixture(scope="module")
def results():
    return run_distributed(_worker, 1)[0]


@pytest.mark.parametrize("combo", [("local", "padded"), ("sdpa", "padded"), ("sdpa", "packed")])
def test_head_matches_full_logits_log_softmax(results, combo):
    got = results["head"][combo]
    assert set(got["head"]) == set(got["reference"]) and len(got["head"]) == 12
    for key, reference in got["reference"].items():
        torch.testing.assert_close(got["head"][key], reference, rtol=1e-5, atol=1e-5, msg=str((combo, key)))
        assert (reference < 0).all()


def test_chunking_and_recompute_change_nothing(results):
    whole, chunked = results["chunking"][4096], results["chunking"][3]
    torch.testing.assert_close(chunked["sums"], whole["sums"], rtol=1e-6, atol=1e-6)
    for name, grad in whole["grads"].items():
        torch.testing.assert_close(chunked["grads"][name], grad, rtol=1e-5, atol=1e-5, msg=name)
    assert whole["grads"]["output_layer.weight"].abs().sum() > 0


def test_lm_head_memory_does_not_grow_with_context(results):
    short, long = results["memory"]["short"], results["memory"]["long"]
    assert long["tokens"] >= 8 * short["tokens"]
    for run in (short, long):
        # each chunk runs twice (forward, and recomputed in the backward): 2 x 2 pairs x 5 response tokens
        assert run["response_tokens"] == 10 and sum(run["rows_per_call"]) == 2 * 10
        assert max(run["rows_per_call"]) <= 4  # chunk_tokens
        # the largest [rows x vocab] activation anywhere in forward + backward: one chunk, not tokens x vocab
        assert 1 <= run["largest_vocab_rows"] <= 4
    assert long["largest_vocab_rows"] == short["largest_vocab_rows"]
    assert long["tokens"] > 100 * long["largest_vocab_rows"]  # the full-logits path holds tokens x vocab


def test_forward_only_returns_per_sample_role_sums(results):
    steps = results["steps"]
    assert steps["mode_restored"]
    assert len(steps["forward_only"]) == 4
    for (sample_id, role), value in steps["reference"].items():
        assert steps["forward_only"][sample_id][role] == pytest.approx(value, rel=1e-5, abs=1e-4)


def test_nan_loss_raises_before_the_update(results):
    steps = results["steps"]
    assert steps["nan_loss"] is not None, "a NaN model must not train silently"
    assert steps["nan_loss"]["step"] == 7
    assert steps["nan_loss"]["ids"] == ["s0", "s1", "s2", "s3"]
    assert "step 7" in steps["nan_loss"]["message"] and "s2" in steps["nan_loss"]["message"]
    assert steps["unchanged_after_nan_loss"]


def test_nan_gradient_raises_before_the_update(results):
    steps = results["steps"]
    assert steps["nan_grad"] is not None and steps["nan_grad"]["step"] == 3
    assert "gradients contain NaN" in steps["nan_grad"]["message"]
    assert steps["unchanged_after_nan_grad"]


def test_learning_rate_schedule(results):
    # Megatron's convention: step k of the warmup uses lr * k / warmup; linear decay to min_lr at the end
    expected = [0.0, 0.5, 1.0, 0.775, 0.55, 0.325, 0.1, 0.1]
    assert results["lrs"]["linear"] == pytest.approx(expected)
    cosine = [0.5 * (1 + math.cos(math.pi * k / 4)) for k in range(5)]
    assert results["lrs"]["cosine"] == pytest.approx(cosine)
    assert results["lrs"]["weight_decays"] == [0.0, 0.01]  # norms/biases are not decayed


def test_cpu_shim_covers_the_step_paths(results):
    shim = results["shim"]
    assert shim["type"] == "torch.cuda.FloatTensor" and shim["long_type"] == "torch.cuda.LongTensor"
    assert shim["converted"] == torch.float64
    assert shim["pinned"] == "cpu"
    assert shim["backward_grad"] == [2.0, 2.0, 2.0]


@pytest.mark.parametrize("name", ["dpo", "ipo", "simpo", "orpo"])
def test_ra_gradient_reaches_the_step(name, results):
    both, long = results["ra_gradient"][(name, "both")], results["ra_gradient"][(name, "long")]
    # same objective value (the option only changes where the RA gradient flows) ...
    assert long["loss"] == pytest.approx(both["loss"], rel=1e-6) and both["ra"] > 0
    # ... and a different update: the option is not accepted and ignored
    assert any(not torch.equal(both["weights"][k], long["weights"][k]) for k in both["weights"])
