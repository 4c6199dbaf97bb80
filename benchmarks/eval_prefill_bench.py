"""Eval generation on CPU: prompt tokens/s, generated tokens/s and the fraction of the machine's matmul FLOP/s.

Compares the two HF generation paths of `megatron_solopo.eval.generation.HFGenerator` on the same
prompts, interleaved (ABBA order, so a change of machine load hits both paths alike):

    padded    hf-generate          transformers `generate` on the left-padded batch with an attention mask
    unpadded  hf-unpadded-prefill  each prompt prefilled alone (causal SDPA, no mask), batched decoding

The prompts are what `solopo eval` asks: the multihop suite at `--lengths` and `--depths`, rendered
with the chat template of the model's tokenizer. Each repeat runs every path twice: once with
`max_new_tokens=1` (prefill only: prompt tokens/s and the FLOP fraction) and once with
`--max-new-tokens` (end to end: prompt and generated tokens per second of the whole run, what the
eval report's timing block shows). Right before each prefill measurement a 2048^3 fp32 `torch.matmul`
is timed (best of 3), so the fraction is taken against the machine's throughput at that moment.

Model FLOPs per prompt token = 2 x (parameters without the embedding/LM-head matrix; prefill computes
logits for the last position only) + the causal attention term 2 x layers x (heads x head_dim) x
(mean prompt length) (QK^T and AV over the half of the score matrix below the diagonal).

Greedy outputs: the script reports whether the two paths produced the same token ids for every
prompt, and compares both with an unpadded batch-1 reference (the new path at batch size 1).

    .venv/bin/python benchmarks/eval_prefill_bench.py                        # default model, 2K prompts
    .venv/bin/python benchmarks/eval_prefill_bench.py --lengths 1024,2048 --repeats 3 --out results.json
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from megatron_solopo.env_report import measure_matmul_gflops  # noqa: E402
from megatron_solopo.eval.generation import HFGenerator  # noqa: E402

def matmul_gflops(repeats: int = 3) -> float:
    """Best-of-`repeats` fp32 GFLOP/s of a 2048^3 torch.matmul on the CPU (env_report's yardstick)."""
    return measure_matmul_gflops(repeats=repeats, device="cpu")["matmul_gflops"]


def build_prompts(hf_dir: str, lengths: list[int], depths: list[float], num_samples: int) -> tuple[list, object]:
    from megatron_solopo.data.tokenization import load_tokenizer, prompt_token_ids
    from megatron_solopo.eval.config import EvalConfig
    from megatron_solopo.eval.suites import build_suites

    tokenizer = load_tokenizer(hf_dir)
    config = EvalConfig(suites=["multihop"], num_samples=num_samples, context_lengths=lengths, depths=depths)
    items = build_suites(config, tokenizer).items
    return [prompt_token_ids(tokenizer, item.prompt, None, True) for item in items], tokenizer


def flops_per_prompt_token(model: torch.nn.Module, mean_prompt_tokens: float) -> dict[str, float]:
    config = model.config
    embedding = model.get_input_embeddings().weight.numel()
    params = sum(p.numel() for p in model.parameters())
    head = 0 if getattr(config, "tie_word_embeddings", False) else model.get_output_embeddings().weight.numel()
    dense = params - embedding - head
    head_dim = getattr(config, "head_dim", None) or config.hidden_size // config.num_attention_heads
    attention = 2 * config.num_hidden_layers * config.num_attention_heads * head_dim * mean_prompt_tokens
    return {"params": params, "dense_params": dense, "dense_flops": 2 * dense, "attention_flops": attention,
            "flops_per_token": 2 * dense + attention}


def run_path(model, tokenizer, prompts, prefill: str, max_new_tokens: int, batch_size: int) -> dict:
    eos = tokenizer.eos_token_id
    generator = HFGenerator(model, [eos], tokenizer.pad_token_id, max_new_tokens, batch_size, prefill=prefill)
    outputs = generator.generate(prompts)
    stats = generator.stats
    return {"path": generator.path, "seconds": stats.seconds, "prompt_tokens": stats.prompt_tokens,
            "generated_tokens": stats.generated_tokens, "outputs": outputs}


def main(argv: list[str] | None = None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--hf-dir", default=None, help="HF model directory (default: the fetched SmolLM2-135M)")
    parser.add_argument("--lengths", default="2048", help="comma-separated target prompt lengths")
    parser.add_argument("--depths", default="0,0.5,1", help="comma-separated evidence depths")
    parser.add_argument("--num-samples", type=int, default=2, help="questions (each at every length and depth)")
    parser.add_argument("--max-new-tokens", type=int, default=32)
    parser.add_argument("--batch-size", type=int, default=4)
    parser.add_argument("--repeats", type=int, default=2, help="ABBA rounds (each: prefill-only and end-to-end)")
    parser.add_argument("--threads", type=int, default=None, help="torch threads (default: torch's own)")
    parser.add_argument("--out", default=None, help="write the results as JSON here")
    args = parser.parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    hf_dir = args.hf_dir
    if hf_dir is None:
        from megatron_solopo.convert.default_model import default_model_dirs

        hf_dir = str(default_model_dirs()[0])
    from transformers import AutoModelForCausalLM

    prompts, tokenizer = build_prompts(hf_dir, [int(x) for x in args.lengths.split(",")],
                                       [float(x) for x in args.depths.split(",")], args.num_samples)
    model = AutoModelForCausalLM.from_pretrained(hf_dir, dtype=torch.float32).eval()
    mean_len = statistics.mean(map(len, prompts))
    flops = flops_per_prompt_token(model, mean_len)
    print(f"{len(prompts)} prompts, mean {mean_len:.0f} tokens; torch threads {torch.get_num_threads()}; "
          f"attention {model.config._attn_implementation}; model GFLOP per prompt token "
          f"{flops['flops_per_token'] / 1e9:.3f} (dense {flops['dense_flops'] / 1e9:.3f} + attention "
          f"{flops['attention_flops'] / 1e9:.3f})", flush=True)
    runs: dict[str, list] = {"padded": [], "unpadded": []}
    outputs: dict[str, list] = {}
    for repeat in range(args.repeats):
        order = ("padded", "unpadded") if repeat % 2 == 0 else ("unpadded", "padded")
        for prefill in order:
            gflops = matmul_gflops()
            pre = run_path(model, tokenizer, prompts, prefill, 1, args.batch_size)
            full = run_path(model, tokenizer, prompts, prefill, args.max_new_tokens, args.batch_size)
            prefill_tok_s = pre["prompt_tokens"] / pre["seconds"]
            decode_s = max(full["seconds"] - pre["seconds"], 1e-9)
            row = {"repeat": repeat, "path": full["path"], "matmul_gflops": gflops,
                   "prefill_seconds": pre["seconds"], "prefill_prompt_tokens_per_s": prefill_tok_s,
                   "prefill_gflops": prefill_tok_s * flops["flops_per_token"] / 1e9,
                   "prefill_fraction_of_matmul": prefill_tok_s * flops["flops_per_token"] / 1e9 / gflops,
                   "e2e_seconds": full["seconds"], "e2e_prompt_tokens_per_s": full["prompt_tokens"] / full["seconds"],
                   "e2e_generated_tokens_per_s": full["generated_tokens"] / full["seconds"],
                   "decode_generated_tokens_per_s": full["generated_tokens"] / decode_s,
                   "generated_tokens": full["generated_tokens"]}
            runs[prefill].append(row)
            outputs[prefill] = full["outputs"]
            print(json.dumps({k: round(v, 3) if isinstance(v, float) else v for k, v in row.items()}), flush=True)
    reference = run_path(model, tokenizer, prompts, "unpadded", args.max_new_tokens, 1)["outputs"]
    result = {
        "machine": {"platform": platform.platform(), "cpu_count": os.cpu_count(),
                    "torch_threads": torch.get_num_threads(), "torch": torch.__version__},
        "prompts": {"count": len(prompts), "mean_tokens": mean_len, "lengths": args.lengths, "depths": args.depths},
        "flops": flops, "max_new_tokens": args.max_new_tokens, "batch_size": args.batch_size, "runs": runs,
        "outputs_equal_padded_vs_unpadded": outputs["padded"] == outputs["unpadded"],
        "outputs_equal_unpadded_vs_batch1_reference": outputs["unpadded"] == reference,
        "outputs_equal_padded_vs_batch1_reference": outputs["padded"] == reference,
        "prompts_differing_padded_vs_unpadded": [i for i, (a, b) in enumerate(zip(outputs["padded"],
                                                                                  outputs["unpadded"])) if a != b],
    }
    summary = {}
    for key in ("prefill_prompt_tokens_per_s", "prefill_fraction_of_matmul", "e2e_prompt_tokens_per_s",
                "e2e_generated_tokens_per_s", "decode_generated_tokens_per_s", "matmul_gflops"):
        old = statistics.median(r[key] for r in runs["padded"])
        new = statistics.median(r[key] for r in runs["unpadded"])
        summary[key] = {"padded": round(old, 3), "unpadded": round(new, 3), "ratio": round(new / old, 3)}
    result["summary"] = summary
    print(json.dumps({k: v for k, v in result.items() if k not in ("runs",)}, indent=1))
    if args.out:
        Path(args.out).write_text(json.dumps(result, indent=1) + "\n")
    return result


if __name__ == "__main__":
    main()
