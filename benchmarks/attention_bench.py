"""Attention backends on one Megatron-Core layer stack: forward+backward time and peak memory vs length.

Builds a TransformerBlock (the decoder of `build_gpt_model`: RMSNorm, GQA attention with RoPE, SwiGLU)
of `--num-layers` layers shaped like `--preset`, for each attention backend:

    sdpa   megatron_solopo.model.attention.SDPACoreAttention (torch SDPA, memory linear in length)
    te     Megatron's Transformer Engine spec (fused attention; needs CUDA + TE)
    local  Megatron's unfused DotProductAttention (materializes [b, heads, s, s]: the baseline)

and times one training step of the stack (forward, backward of a fixed random output gradient) at
every length, batch 1. No embedding or LM head: the stack's own cost. Out-of-memory is caught and
recorded (`"status": "oom"`); a backend that ran out of memory is not tried at longer lengths.

    python benchmarks/attention_bench.py                                  # GPU: llama-1b shapes, 4K..128K
    python benchmarks/attention_bench.py --device cpu --lengths 256,512   # toy mode (tiny preset)
    python benchmarks/attention_bench.py --plot-only RESULTS.json         # redo the PNG from a JSON

Writes `<out>/attention-<date>-<machine>/attention_bench.json` (rewritten after every case, so a killed
run keeps what it measured) and `attention_bench.png` (time and memory vs length, log-log) when
matplotlib imports. TFLOP/s counts the matmul FLOPs of the stack (3x the forward: backward = 2x)
including causal attention (half of the s^2 score and value products).
"""

from __future__ import annotations

import argparse
import datetime
import gc
import json
import pathlib
import platform
import socket
import statistics
import sys
import time

REPO_ROOT = pathlib.Path(__file__).resolve().parent.parent
if str(REPO_ROOT) not in sys.path:  # run as a script from a checkout
    sys.path.insert(0, str(REPO_ROOT))

BACKENDS = ("sdpa", "te", "local")
GPU_LENGTHS = (4096, 8192, 16384, 32768, 65536, 131072)


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--device", choices=("cuda", "cpu"), default=None,
                        help="cuda (default when available) or cpu (toy mode)")
    parser.add_argument("--lengths", default=None,
                        help="comma-separated sequence lengths in tokens (default 4K..128K on cuda, "
                        "256,512 on cpu)")
    parser.add_argument("--backends", default=None,
                        help=f"comma-separated subset of {','.join(BACKENDS)} (default: all on cuda, "
                        "sdpa,local on cpu)")
    parser.add_argument("--preset", default=None,
                        help="model preset for the layer shapes (llama-1b on cuda, tiny on cpu)")
    parser.add_argument("--num-layers", type=int, default=2, help="layers in the stack")
    parser.add_argument("--dtype", choices=("bf16", "fp32"), default=None, help="bf16 on cuda, fp32 on cpu")
    parser.add_argument("--recompute", choices=("none", "selective", "full"), default="none",
                        help="activation recomputation of the stack (ModelConfig.recompute)")
    parser.add_argument("--warmup", type=int, default=1, help="untimed steps per case")
    parser.add_argument("--iters", type=int, default=3, help="timed steps per case (the median is reported)")
    parser.add_argument("--out", default=str(REPO_ROOT / "benchmarks" / "results"),
                        help="results root; a folder attention-<date>-<machine> is created in it")
    parser.add_argument("--plot-only", default=None, metavar="JSON", help="only redraw the PNG of a results JSON")
    args = parser.parse_args(argv)
    if args.plot_only:
        return args
    import torch

    args.device = args.device or ("cuda" if torch.cuda.is_available() else "cpu")
    if args.device == "cuda" and not torch.cuda.is_available():
        parser.error("--device cuda but CUDA is not available; use --device cpu")
    on_gpu = args.device == "cuda"
    default_lengths = GPU_LENGTHS if on_gpu else (256, 512)
    args.lengths = [int(x) for x in args.lengths.split(",")] if args.lengths else list(default_lengths)
    args.backends = (args.backends or ("sdpa,te,local" if on_gpu else "sdpa,local")).split(",")
    unknown = set(args.backends) - set(BACKENDS)
    if unknown:
        parser.error(f"unknown backends {sorted(unknown)}; choose from {','.join(BACKENDS)}")
    args.preset = args.preset or ("llama-1b" if on_gpu else "tiny")
    args.dtype = args.dtype or ("bf16" if on_gpu else "fp32")
    if args.num_layers < 1 or args.iters < 1 or args.warmup < 0:
        parser.error("--num-layers and --iters must be >= 1, --warmup >= 0")
    return args


def stack_train_flops(preset, num_layers: int, seq_len_tokens: int) -> float:
    """Matmul FLOPs of one forward+backward of the stack at batch 1 (backward = 2x forward)."""
    h, f, d = preset.hidden_size, preset.ffn_hidden_size, preset.head_dim
    linear_macs_per_token = h * d * (preset.num_attention_heads + 2 * preset.num_query_groups)  # QKV
    linear_macs_per_token += preset.num_attention_heads * d * h + 3 * h * f  # output proj + SwiGLU
    # causal: QK^T and PV over half of the s x s pairs, per query head
    attention_macs = 2 * seq_len_tokens * seq_len_tokens * d * preset.num_attention_heads / 2
    forward = 2 * (seq_len_tokens * linear_macs_per_token + attention_macs) * num_layers
    return 3 * forward


def environment(device: str) -> dict:
    import torch

    from megatron_solopo.model.backends import te_importable
    from megatron_solopo.versions import package_version

    info = {"host": socket.gethostname(), "platform": platform.platform(), "python": sys.version.split()[0],
            "torch": torch.__version__, "megatron_core": package_version("megatron-core"),
            "transformer_engine": package_version("transformer-engine") or package_version("transformer_engine"),
            "transformer_engine_usable": te_importable(), "device": device}
    if device == "cuda":
        info["gpu"] = torch.cuda.get_device_name(0)
    return info


def build_stack(preset, backend: str, args):
    """(TransformerBlock, RotaryEmbedding) for `backend`, on the device, in the benchmark dtype."""
    from megatron.core.models.common.embeddings.rotary_pos_embedding import RotaryEmbedding
    from megatron.core.transformer.transformer_block import TransformerBlock

    from megatron_solopo.model.backends import resolve_attention_backend
    from megatron_solopo.model.builder import layer_spec, transformer_config
    from megatron_solopo.model.config import ModelConfig
    from megatron_solopo.parallel.config import ParallelConfig

    resolve_attention_backend(backend)  # ValueError naming the reason when te cannot run here
    model = ModelConfig(attention_backend=backend, params_dtype=args.dtype, recompute=args.recompute,
                        recompute_num_layers=1)
    config = transformer_config(preset.replace(num_layers=args.num_layers), ParallelConfig(), model, backend)
    block = TransformerBlock(config=config, spec=layer_spec(backend), pre_process=True, post_process=True)
    rope = RotaryEmbedding(kv_channels=preset.head_dim, rotary_percent=1.0, rotary_base=int(preset.rotary_base))
    return block.to(device=args.device, dtype=config.params_dtype), rope


def time_case(block, rope, seq_len_tokens: int, args) -> dict:
    """Median forward+backward seconds and peak memory of `block` at one length (batch 1)."""
    import torch

    dtype = torch.bfloat16 if args.dtype == "bf16" else torch.float32
    gen = torch.Generator(device=args.device).manual_seed(0)
    hidden = block.config.hidden_size
    inputs = torch.randn(seq_len_tokens, 1, hidden, device=args.device, dtype=dtype, generator=gen)  # [s, b, h]
    grad_output = torch.randn(seq_len_tokens, 1, hidden, device=args.device, dtype=dtype, generator=gen)
    rotary = rope(seq_len_tokens)

    def step():
        x = inputs.detach().requires_grad_()
        # causal without a mask tensor: every backend builds (local) or needs (sdpa, te) none
        out = block(hidden_states=x, attention_mask=None, rotary_pos_emb=rotary)
        out.backward(grad_output)
        return out

    on_gpu = args.device == "cuda"
    for _ in range(args.warmup):
        step()
    if on_gpu:
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
    times = []
    for _ in range(args.iters):
        start = time.perf_counter()
        step()
        if on_gpu:
            torch.cuda.synchronize()
        times.append(time.perf_counter() - start)
    block.zero_grad(set_to_none=True)
    peak = torch.cuda.max_memory_allocated() / 2**30 if on_gpu else None
    return {"fwd_bwd_s": statistics.median(times), "times_s": times, "peak_mem_gib": peak}


def run_backend(backend: str, preset, args, record) -> None:
    import torch

    try:
        block, rope = build_stack(preset, backend, args)
    except (ImportError, ValueError) as err:  # e.g. te without Transformer Engine
        record({"backend": backend, "status": "unavailable", "error": str(err)})
        return
    for seq_len in args.lengths:
        case = {"backend": backend, "seq_len_tokens": seq_len}
        try:
            case.update(time_case(block, rope, seq_len, args), status="ok")
            case["tflops"] = stack_train_flops(preset, args.num_layers, seq_len) / case["fwd_bwd_s"] / 1e12
        except torch.OutOfMemoryError as err:
            case.update(status="oom", error=str(err).splitlines()[0])
        finally:
            block.zero_grad(set_to_none=True)
            gc.collect()
            if args.device == "cuda":
                torch.cuda.empty_cache()
        record(case)
        if case["status"] == "oom":
            for longer in (x for x in args.lengths if x > seq_len):
                record({"backend": backend, "seq_len_tokens": longer, "status": "skipped",
                        "error": f"out of memory at {seq_len} tokens"})
            break
    del block, rope


def plot(results_path: pathlib.Path) -> pathlib.Path | None:
    """time and peak memory vs length per backend, log-log; None when matplotlib is missing."""
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        print("matplotlib is not installed: no PNG (redo it with --plot-only on a machine that has it)")
        return None
    data = json.loads(results_path.read_text())
    fig, (ax_time, ax_mem) = plt.subplots(1, 2, figsize=(11, 4.2))
    for backend in data["config"]["backends"]:
        ok = [c for c in data["cases"] if c["backend"] == backend and c.get("status") == "ok"]
        if not ok:
            continue
        lengths = [c["seq_len_tokens"] for c in ok]
        ax_time.plot(lengths, [c["fwd_bwd_s"] for c in ok], marker="o", label=backend)
        if all(c.get("peak_mem_gib") is not None for c in ok):
            ax_mem.plot(lengths, [c["peak_mem_gib"] for c in ok], marker="o", label=backend)
        failed = [c for c in data["cases"] if c["backend"] == backend and c.get("status") == "oom"]
        for case in failed:
            ax_time.axvline(case["seq_len_tokens"], linestyle=":", alpha=0.4)
            ax_time.annotate(f"{backend} OOM", (case["seq_len_tokens"], ax_time.get_ylim()[1]), rotation=90,
                             va="top", fontsize=7)
    env, cfg = data["environment"], data["config"]
    title = (f"{cfg['preset']} shapes, {cfg['num_layers']} layers, {cfg['dtype']}, recompute={cfg['recompute']} "
             f"on {env.get('gpu', env['device'])}")
    for ax, ylabel in ((ax_time, "forward+backward (s)"), (ax_mem, "peak memory (GiB)")):
        ax.set_xscale("log", base=2)
        ax.set_yscale("log")
        ax.set_xlabel("sequence length (tokens)")
        ax.set_ylabel(ylabel)
        ax.grid(True, which="both", alpha=0.3)
        if ax.get_legend_handles_labels()[0]:
            ax.legend()
    if not ax_mem.get_legend_handles_labels()[0]:
        ax_mem.text(0.5, 0.5, "peak memory is measured on CUDA only", transform=ax_mem.transAxes, ha="center")
    fig.suptitle(title, fontsize=9)
    fig.tight_layout()
    png = results_path.with_suffix(".png")
    fig.savefig(png, dpi=120)
    plt.close(fig)
    return png


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    if args.plot_only:
        print(plot(pathlib.Path(args.plot_only)))
        return 0
    import torch

    from megatron_solopo.model.presets import get_preset
    from megatron_solopo.parallel import ParallelConfig, initialize_parallel

    initialize_parallel(ParallelConfig(), seed=1234)  # one process; installs the CPU shim without CUDA
    preset = get_preset(args.preset)
    env = environment(args.device)
    machine = (env.get("gpu") or platform.machine()).replace(" ", "-")
    folder = pathlib.Path(args.out) / f"attention-{datetime.date.today().isoformat()}-{machine}"
    folder.mkdir(parents=True, exist_ok=True)
    results_path = folder / "attention_bench.json"
    config = {key: value for key, value in vars(args).items() if key != "plot_only"}
    data = {"environment": env, "config": config, "cases": []}

    def record(case: dict) -> None:
        data["cases"].append(case)
        results_path.write_text(json.dumps(data, indent=2))
        shown = {k: (round(v, 4) if isinstance(v, float) else v) for k, v in case.items() if k != "times_s"}
        print(json.dumps(shown), flush=True)

    for backend in args.backends:
        run_backend(backend, preset, args, record)
    results_path.write_text(json.dumps(data, indent=2))
    png = plot(results_path)
    print(f"wrote {results_path}" + (f" and {png}" if png else ""))
    if torch.distributed.is_initialized():
        torch.distributed.destroy_process_group()
    return 0 if any(c.get("status") == "ok" for c in data["cases"]) else 1


if __name__ == "__main__":
    sys.exit(main())
