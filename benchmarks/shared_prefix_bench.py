"""Side by side: prompts prefilled whole vs their shared prefix prefilled once (data.kv_cache.SharedPrefix).

On the prompts of a real eval config (`--items` questions per cell), with the config's model in fp32:

* greedy eval generation: `HFGenerator` with `share_prefix=False` and `True`, `--repeats` times each in
  alternating order; wall seconds, and whether every generated token sequence is identical;
* sampling: `HFBackend` (`--responses` per prompt at `--temperature`, the same seed) on the short suite's
  prompts (x_short prompts like those data construction samples on), with the shared prefix off and on;
  wall seconds and how many responses are identical;
* the first-token logits of a few prompts both ways (largest absolute difference).

    .venv/bin/python benchmarks/shared_prefix_bench.py --config RUN_DIR/configs/eval-base.yaml --items 16 \
        --out shared_prefix.json
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from megatron_solopo.bench.report import print_and_save_json  # noqa: E402
from megatron_solopo.config import load_config  # noqa: E402
from megatron_solopo.data.contexts import ContextTemplates, config_prompt_examples  # noqa: E402
from megatron_solopo.data.kv_cache import SharedPrefix, cache_kwarg, prefill_each  # noqa: E402
from megatron_solopo.data.sampling import HFBackend  # noqa: E402
from megatron_solopo.data.tokenization import load_tokenizer, prompt_token_ids  # noqa: E402
from megatron_solopo.eval.generation import HFGenerator  # noqa: E402
from megatron_solopo.eval.suites import build_suites  # noqa: E402


def eval_prompts(config) -> tuple[list[list[int]], list[str]]:
    """Token ids of the config's eval prompts, as `solopo eval` renders them, and each prompt's suite."""
    tokenizer = load_tokenizer(config.model.hf_model)
    built = build_suites(config.eval, tokenizer, ContextTemplates.from_config(config.data))
    examples = config_prompt_examples(config.data)
    prompts = [prompt_token_ids(tokenizer, item.prompt, config.data.system_prompt, config.data.use_chat_template,
                                examples) for item in built.items]
    return prompts, [item.suite for item in built.items]


def greedy_side_by_side(model, tokenizer, config, prompts, repeats: int) -> dict:
    eos = [tokenizer.eos_token_id]
    seconds: dict[str, list[float]] = {"whole": [], "shared_prefix": []}
    outputs: dict[str, list[list[int]]] = {}
    for repeat in range(repeats):
        order = ("whole", "shared_prefix") if repeat % 2 == 0 else ("shared_prefix", "whole")
        for name in order:
            generator = HFGenerator(model, eos, tokenizer.pad_token_id, config.eval.max_new_tokens,
                                    config.eval.batch_size, share_prefix=name == "shared_prefix")
            began = time.perf_counter()
            outputs[name] = generator.generate(prompts)
            seconds[name].append(round(time.perf_counter() - began, 2))
    same = [a == b for a, b in zip(outputs["whole"], outputs["shared_prefix"])]
    return {"prompts": len(prompts), "batch_size": config.eval.batch_size, "seconds": seconds,
            "identical_outputs": sum(same), "differing_prompts": [i for i, s in enumerate(same) if not s]}


def sampling_side_by_side(config, prompts, responses: int, temperature: float, seed: int) -> dict:
    result: dict = {"prompts": len(prompts), "responses_per_prompt": responses, "temperature": temperature,
                    "seconds": {}}
    samples = {}
    for name in ("whole", "shared_prefix"):
        backend = HFBackend(config.model.hf_model, device="cpu", dtype="fp32",
                            batch_size=config.data.sampling_batch_size or 16, share_prefix=name == "shared_prefix")
        generator = torch.Generator().manual_seed(seed)
        per_call = max(1, backend.batch_size // responses)  # as HFBackend.requests_per_call
        began = time.perf_counter()
        rows = []
        with torch.no_grad():
            for start in range(0, len(prompts), per_call):
                rows += backend.sample_token_ids(prompts[start:start + per_call], responses, temperature, 1.0,
                                                 config.data.max_new_tokens or 48, generator)
        result["seconds"][name] = round(time.perf_counter() - began, 2)
        samples[name] = rows
    pairs = [(a, b) for pa, pb in zip(samples["whole"], samples["shared_prefix"]) for a, b in zip(pa, pb)]
    result["identical_responses"] = sum(a == b for a, b in pairs)
    result["responses"] = len(pairs)
    return result


def first_token_logit_diff(model, prompts) -> list[float]:
    kwarg = cache_kwarg(model)
    with torch.no_grad():
        whole, _, _ = prefill_each(model, prompts, 1, kwarg)
        shared, _, _ = prefill_each(model, prompts, 1, kwarg, SharedPrefix())
    return [float(d) for d in (whole - shared).abs().amax(-1)]


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--config", required=True, help="an eval stage's config (its model.hf_model is used)")
    parser.add_argument("--items", type=int, default=16, help="questions per cell")
    parser.add_argument("--repeats", type=int, default=2, help="greedy runs per variant (alternating order)")
    parser.add_argument("--responses", type=int, default=8, help="sampled responses per x_short prompt")
    parser.add_argument("--temperature", type=float, default=0.85)
    parser.add_argument("--sampling-prompts", type=int, default=16, help="x_short prompts to sample on (0: skip)")
    parser.add_argument("--out", help="write the figures as JSON here")
    args = parser.parse_args()

    from transformers import AutoModelForCausalLM

    config = load_config(args.config, [f"eval.num_samples={args.items}", "eval.backend=hf"])
    prompts, suites = eval_prompts(config)
    tokenizer = load_tokenizer(config.model.hf_model)
    model = AutoModelForCausalLM.from_pretrained(config.model.hf_model, dtype=torch.float32).eval()
    prefix = SharedPrefix()
    with torch.no_grad():
        shared = prefix.prepare(model, prompts, cache_kwarg(model))
    result = {"config": Path(args.config).name, "threads": torch.get_num_threads(), "shared_prefix_tokens": shared,
              "mean_prompt_tokens": round(sum(map(len, prompts)) / len(prompts), 1),
              "first_token_max_abs_logit_diff": first_token_logit_diff(model, prompts[:4]),
              "greedy": greedy_side_by_side(model, tokenizer, config, prompts, args.repeats)}
    short = [p for p, suite in zip(prompts, suites) if suite.endswith("_short")][:args.sampling_prompts]
    if short:
        result["sampling_x_short"] = sampling_side_by_side(config, short, args.responses, args.temperature, seed=0)
    print_and_save_json(result, args.out)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
