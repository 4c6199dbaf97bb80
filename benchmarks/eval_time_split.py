"""Where an eval's generation time goes: prefill vs decoding steps, on the items of a real eval config.

Runs `megatron_solopo.eval.evaluate` (HF backend, the `hf-unpadded-prefill` path) on the first `--items`
questions per cell of `--config`'s eval section, with timers around the two parts of
`eval.generation.HFGenerator`: `prefill_each` (every prompt prefilled alone, the caches stacked) and
each decoding step (one `last_logits` call on one token per live row). The eval itself is unchanged; the
timers only wrap it. Prints and writes JSON: seconds, calls, prompt tokens, decoding steps and rows, and
the report's timing block. Also reports the longest token prefix shared by every prompt (template,
system prompt, worked examples), the part a prefix cache would prefill once.

    .venv/bin/python benchmarks/eval_time_split.py --config RUN_DIR/configs/eval-base.yaml --items 16 \
        --out split.json
"""

from __future__ import annotations

import argparse
import os
import sys
import tempfile
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from megatron_solopo.bench.report import print_and_save_json  # noqa: E402
from megatron_solopo.config import load_config  # noqa: E402
from megatron_solopo.eval import generation  # noqa: E402
from megatron_solopo.eval.evaluate import ModelSource, evaluate  # noqa: E402


def shared_prefix_tokens(prompts: list[list[int]]) -> int:
    """Length of the longest token prefix common to every prompt (os.path.commonprefix compares lists too)."""
    return len(os.path.commonprefix(prompts))


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--config", required=True, help="an eval stage's config (its model.hf_model is evaluated)")
    parser.add_argument("--items", type=int, default=16, help="questions per cell")
    parser.add_argument("--out", help="write the figures as JSON here")
    args = parser.parse_args()

    split = {"prefill_s": 0.0, "prefill_calls": 0, "prefill_tokens": 0, "decode_s": 0.0, "decode_steps": 0,
             "decode_rows": 0}
    prompts_seen: list[list[int]] = []
    real_prefill, real_last = generation.prefill_each, generation.last_logits

    def timed_prefill(model, prompts, reserve, kwarg, prefix=None):
        began = time.perf_counter()
        result = real_prefill(model, prompts, reserve, kwarg, prefix)
        split["prefill_s"] += time.perf_counter() - began
        split["prefill_calls"] += 1
        split["prefill_tokens"] += sum(len(p) for p in prompts)
        prompts_seen.extend(list(p) for p in prompts)
        return result

    def timed_step(model, input_ids, cache, kwarg, **kwargs):
        began = time.perf_counter()
        result = real_last(model, input_ids, cache, kwarg, **kwargs)
        split["decode_s"] += time.perf_counter() - began
        split["decode_steps"] += 1
        split["decode_rows"] += int(input_ids.shape[0])
        return result

    generation.prefill_each, generation.last_logits = timed_prefill, timed_step
    with tempfile.TemporaryDirectory() as out_dir:
        config = load_config(args.config, [f"eval.num_samples={args.items}", f"eval.output_dir={out_dir}",
                                           "eval.backend=hf"])
        report, _ = evaluate(config, ModelSource("hf", config.model.hf_model), progress=False)
    split.update(threads=torch.get_num_threads(), timing=report["timing"],
                 shared_prefix_tokens=shared_prefix_tokens(prompts_seen) if prompts_seen else 0,
                 mean_prompt_tokens=round(split["prefill_tokens"] / max(len(prompts_seen), 1), 1))
    print_and_save_json(split, args.out)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
