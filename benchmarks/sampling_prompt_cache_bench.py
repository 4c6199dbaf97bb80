"""On-policy sampling on CPU: one copy of a prompt's KV cache for its n responses vs one copy per response.

`solopo build-data` samples `data.num_responses` answers per prompt with `data.sampling.HFBackend`.
Each prompt is prefilled once; for decoding, its keys/values were repeated once per response
(`share_prompt_cache=False`), so every decoding step read n copies of the same prompt cache. With
`share_prompt_cache=True` (the default) they are kept once per prompt (`data.kv_cache.SharedPrompts`).
This script times both on the same prompts, interleaved (ABBA, so a change of machine load hits both
alike), and checks that they produce the same tokens: greedy, and sampled with the same seed.

The prompts are what the RULER experiment samples on: `ruler_<task>` at `--length` tokens (x_long, the
evidence at depth 0.5) and `ruler_<task>_short` (x_short), rendered with the model's chat template.

    .venv/bin/python benchmarks/sampling_prompt_cache_bench.py                    # default model
    .venv/bin/python benchmarks/sampling_prompt_cache_bench.py --prompts 8 --repeats 2 --out result.json
"""

from __future__ import annotations

import argparse
import json
import platform
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from megatron_solopo.data import sampling  # noqa: E402
from megatron_solopo.data.sampling import HFBackend  # noqa: E402
from megatron_solopo.data.tokenization import load_tokenizer, prompt_token_ids  # noqa: E402
from megatron_solopo.eval.config import EvalConfig  # noqa: E402
from megatron_solopo.eval.suites import build_suites  # noqa: E402


def build_prompts(hf_dir: str, suite: str, length: int, num_prompts: int) -> list[list[int]]:
    """Token ids of `num_prompts` questions of an eval suite, as the sampler renders them."""
    tokenizer = load_tokenizer(hf_dir)
    config = EvalConfig(suites=[suite], num_samples=num_prompts, context_lengths=[length], depths=[0.5])
    return [prompt_token_ids(tokenizer, item.prompt, None, True) for item in build_suites(config, tokenizer).items]


def sample_all(backend: HFBackend, prompts: list[list[int]], args: argparse.Namespace, share: bool,
               greedy: bool) -> tuple[float, list]:
    """(seconds, token ids) of sampling `args.responses` answers per prompt, `backend.batch_size` rows per call."""
    backend.share_prompt_cache = share
    generator = torch.Generator().manual_seed(args.seed)
    per_call = max(1, backend.batch_size // args.responses)
    start, out = time.perf_counter(), []
    for first in range(0, len(prompts), per_call):
        out += backend.sample_token_ids(prompts[first:first + per_call], args.responses, args.temperature, 1.0,
                                        args.max_new_tokens, generator, greedy=greedy)
    return time.perf_counter() - start, out


def compare(backend: HFBackend, prompts: list[list[int]], args: argparse.Namespace) -> dict:
    """ABBA timings of both schemes (sampled), and whether their sampled and greedy tokens agree."""
    seconds: dict[str, list[float]] = {"shared": [], "repeated": []}
    tokens: dict[str, list] = {}
    for _ in range(args.repeats):
        for name in ("shared", "repeated", "repeated", "shared"):
            elapsed, out = sample_all(backend, prompts, args, share=name == "shared", greedy=False)
            seconds[name].append(round(elapsed, 2))
            tokens.setdefault(name, out)
    generated = sum(len(r) for rows in tokens["shared"] for r in rows)
    greedy = {name: sample_all(backend, prompts, args, share=name == "shared", greedy=True)[1]
              for name in ("shared", "repeated")}
    best = {name: min(values) for name, values in seconds.items()}
    return {"prompts": len(prompts), "mean_prompt_tokens": round(sum(map(len, prompts)) / len(prompts), 1),
            "generated_tokens": generated, "seconds": seconds,
            "generated_tokens_per_s_best": {k: round(generated / v, 1) for k, v in best.items()},
            "speedup_best": round(best["repeated"] / best["shared"], 3),
            "same_sampled_tokens": tokens["shared"] == tokens["repeated"],
            "same_greedy_tokens": greedy["shared"] == greedy["repeated"]}


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--hf-model", default=None, help="HF model directory (default: the default model)")
    parser.add_argument("--task", default="niah_multikey")
    parser.add_argument("--length", type=int, default=1024)
    parser.add_argument("--prompts", type=int, default=8)
    parser.add_argument("--responses", type=int, default=8)
    parser.add_argument("--batch-size", type=int, default=16, help="rows per call (data.sampling_batch_size)")
    parser.add_argument("--max-new-tokens", type=int, default=48)
    parser.add_argument("--temperature", type=float, default=0.85)
    parser.add_argument("--repeats", type=int, default=1, help="ABBA rounds")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--out", default=None, help="write the result as JSON here")
    args = parser.parse_args()
    model_name = args.hf_model or "default model"
    if args.hf_model is None:
        from megatron_solopo.convert.default_model import fetch_default_model

        args.hf_model = str(fetch_default_model())
    sampling.SHARED_PROMPT_MIN_TOKENS = 1  # time the scheme itself on both prompt lengths
    backend = HFBackend(args.hf_model, device="cpu", dtype="fp32", batch_size=args.batch_size)
    result = {"machine": {"platform": platform.platform(), "processor": platform.processor(),
                          "torch_threads": torch.get_num_threads()},
              "versions": {"torch": torch.__version__, "python": platform.python_version()},
              "settings": {**{k: v for k, v in vars(args).items() if k != "out"}, "hf_model": model_name}}
    for context, suite in (("x_long", f"ruler_{args.task}"), ("x_short", f"ruler_{args.task}_short")):
        result[context] = compare(backend, build_prompts(args.hf_model, suite, args.length, args.prompts), args)
        print(context, json.dumps(result[context]), flush=True)
    if args.out:
        Path(args.out).write_text(json.dumps(result, indent=2) + "\n", encoding="utf-8")
    return 0


if __name__ == "__main__":
    sys.exit(main())
