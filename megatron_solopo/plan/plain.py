"""Peak memory of a PLAIN forward + backward of one sequence with full logits (no DDP, no optimizer), traced
like the dry run: the shape of the single-GPU measurements quoted in ../shared/DESIGN.md (1.1B, local layer
spec + SDPA core attention, full recompute), for the plan-vs-GPU comparison in docs/scaling.md.

    PYTHONPATH=. python -m megatron_solopo.plan.plain --preset llama-1b --tokens 32K,64K,128K --recompute full

The loss is cross-entropy over every position on fp32 logits (`logits.float()`), the usual plain-stack
recipe; the gradients are the parameters' own `.grad` in the parameter dtype (no fp32 buffer).
"""

from __future__ import annotations

import argparse
import time

import torch

from megatron_solopo.checkpoint.loader import load_model
from megatron_solopo.model import ModelConfig, get_preset
from megatron_solopo.parallel import ParallelConfig, destroy_parallel, initialize_parallel
from megatron_solopo.plan.dry_run import _init_process_group, _TensorOfFakeScalars, PlanSpec, parse_tokens
from megatron_solopo.plan.memory import GIB, LiveBytesTracker


def plain_step_peak(preset_name: str, tokens: int, recompute: str = "full", dtype: str = "bf16") -> dict:
    from torch._subclasses.fake_tensor import FakeTensorMode


    preset = get_preset(preset_name)
    _init_process_group(PlanSpec(preset=preset_name), fake=True)
    try:
        parallel = initialize_parallel(ParallelConfig())
        model_cfg = ModelConfig(preset=preset_name, attention_backend="sdpa", params_dtype=dtype, recompute=recompute)
        ids = torch.randint(1, preset.vocab_size, (1, tokens))
        positions = torch.arange(tokens).unsqueeze(0)
        tracker = LiveBytesTracker(fake_scalars=True)
        modes = [FakeTensorMode(allow_non_fake_inputs=True), _TensorOfFakeScalars(), tracker]
        for mode in modes:
            mode.__enter__()
        try:
            start = time.perf_counter()
            (model,) = load_model(model_cfg, parallel, preset=preset, load_weights=False)
            weights = sum(p.numel() * p.element_size() for p in model.parameters())
            tracker.reset_peak()
            logits = model(ids, positions, None)
            loss = torch.nn.functional.cross_entropy(logits.float().view(-1, logits.shape[-1]), ids.view(-1))
            del logits
            loss.backward()
            seconds = time.perf_counter() - start
        finally:
            for mode in reversed(modes):
                mode.__exit__(None, None, None)
        return {"tokens": tokens, "peak_bytes": tracker.peak_bytes, "weights_bytes": weights,
                "peak_phase": tracker.breakdown().peak_phase, "seconds": seconds}
    finally:
        destroy_parallel()


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--preset", default="llama-1b")
    parser.add_argument("--tokens", default="32K,64K,128K")
    parser.add_argument("--recompute", default="full")
    args = parser.parse_args(argv)
    for text in args.tokens.split(","):
        r = plain_step_peak(args.preset, parse_tokens(text), args.recompute)
        print(f"{args.preset} {text}: peak {r['peak_bytes'] / GIB:.2f} GiB = {r['peak_bytes'] / 1e9:.2f} GB "
              f"(weights {r['weights_bytes'] / GIB:.2f} GiB; peak in {r['peak_phase']}; {r['seconds']:.0f} s)",
              flush=True)


if __name__ == "__main__":
    main()
