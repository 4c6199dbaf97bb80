"""Streaming reads and writes of Hugging Face safetensors checkpoints.

`HFCheckpointReader` opens the shards lazily (safetensors memory-maps them) and reads one tensor, or one
slice of it, at a time: converting a 70B checkpoint at TP=8 reads each rank's eighth of each tensor
and never holds the checkpoint in memory. `HFShardWriter` keeps at most one shard in memory and writes
the usual `model-0000i-of-0000N.safetensors` + `model.safetensors.index.json` layout.
"""

from __future__ import annotations

import json
import os
import pathlib
import shutil

import torch
from safetensors import SafetensorError, safe_open
from safetensors.torch import save_file

INDEX_NAME = "model.safetensors.index.json"
SINGLE_NAME = "model.safetensors"
# files in a HF model directory that hold weights: everything else (config, tokenizer, generation
# config, chat template, license, README) is an asset that travels with the converted checkpoint
_WEIGHT_SUFFIXES = (".safetensors", ".bin", ".pt", ".pth", ".gguf", ".ckpt", ".h5", ".msgpack", ".npz")
_WEIGHT_INDEXES = (INDEX_NAME, "pytorch_model.bin.index.json")


class UnreadableCheckpoint(ValueError):
    """A weight file that cannot be trusted: corrupt, truncated or empty, or holding NaN/Inf values."""


def _open_safetensors(path: pathlib.Path):
    """safe_open, with a one-line error naming the file when it is not a readable safetensors file."""
    try:
        return safe_open(str(path), framework="pt")
    except (SafetensorError, OSError) as err:
        size = path.stat().st_size if path.exists() else None
        what = "is empty" if size == 0 else f"cannot be read as safetensors ({err})"
        raise UnreadableCheckpoint(f"weight file {path} {what}; it is corrupt or truncated: download or copy "
                                   "it again") from None


def _checked_finite(tensor: torch.Tensor, name: str, path: pathlib.Path) -> torch.Tensor:
    # untrusted weights: a NaN or Inf converts silently and only shows as a NaN loss hours later
    if tensor.is_floating_point() and not bool(torch.isfinite(tensor).all()):
        bad = int((~torch.isfinite(tensor)).sum())
        raise UnreadableCheckpoint(f"tensor {name!r} in {path} holds {bad} NaN/Inf value(s) of "
                                   f"{tensor.numel()}; the checkpoint is damaged or was saved after "
                                   "training diverged")
    return tensor


class HFCheckpointReader:
    """Tensor access to a HF safetensors checkpoint (single file or sharded with an index).

    Every tensor read is checked to be finite (`UnreadableCheckpoint` names it otherwise), and a file
    that is not valid safetensors is named in the error. Use as a context manager, or call `close()`.
    """

    def __init__(self, hf_dir: str | os.PathLike):
        self.hf_dir = pathlib.Path(hf_dir)
        self._file_of = _weight_map(self.hf_dir)
        self._handles: dict[str, object] = {}

    def __enter__(self) -> HFCheckpointReader:
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    def close(self) -> None:
        self._handles.clear()  # safe_open handles release their memory map when dropped

    def names(self) -> set[str]:
        return set(self._file_of)

    def __contains__(self, name: str) -> bool:
        return name in self._file_of

    def _handle(self, name: str):
        try:
            file_name = self._file_of[name]
        except KeyError:
            raise KeyError(f"tensor {name!r} is not in the checkpoint {self.hf_dir}") from None
        if file_name not in self._handles:
            path = self.hf_dir / file_name
            if not path.is_file():
                raise FileNotFoundError(f"{self.hf_dir / INDEX_NAME} places {name!r} in {file_name}, which "
                                        f"does not exist in {self.hf_dir}; the download is incomplete")
            self._handles[file_name] = _open_safetensors(path)
        return self._handles[file_name]

    def _path(self, name: str) -> pathlib.Path:
        return self.hf_dir / self._file_of[name]

    def shape(self, name: str) -> tuple[int, ...]:
        return tuple(self._handle(name).get_slice(name).get_shape())

    def read(self, name: str) -> torch.Tensor:
        return _checked_finite(self._handle(name).get_tensor(name), name, self._path(name))

    def read_range(self, name: str, dim: int, start: int, stop: int) -> torch.Tensor:
        """Rows (dim 0) or columns (dim 1) [start, stop) of a tensor, reading only those bytes' rows."""
        part = self._handle(name).get_slice(name)
        if dim == 0:
            return _checked_finite(part[start:stop], name, self._path(name))
        if dim == 1:
            return _checked_finite(part[:, start:stop], name, self._path(name))
        raise ValueError(f"read_range supports dim 0 or 1, got {dim}")


def _weight_map(hf_dir: pathlib.Path) -> dict[str, str]:
    """tensor name -> file name, from the index or by listing the single safetensors file."""
    if not hf_dir.is_dir():
        raise FileNotFoundError(f"Hugging Face model directory {hf_dir} does not exist")
    index = hf_dir / INDEX_NAME
    if index.exists():
        try:
            return dict(json.loads(index.read_text())["weight_map"])
        except (json.JSONDecodeError, UnicodeDecodeError, KeyError, TypeError, ValueError) as err:
            raise UnreadableCheckpoint(f"{index} is not a safetensors index with a 'weight_map' ({err}); "
                                       "download it again") from None
    files = sorted(p.name for p in hf_dir.glob("*.safetensors"))
    if not files:
        found = sorted(p.name for p in hf_dir.iterdir() if p.suffix in (".bin", ".pt", ".pth", ".gguf"))
        hint = (f" (found {', '.join(found)}: re-save it as safetensors with transformers, "
                "AutoModelForCausalLM.from_pretrained(dir).save_pretrained(out_dir))" if found else "")
        raise FileNotFoundError(f"no *.safetensors weights in {hf_dir}{hint}")
    if len(files) > 1:
        raise FileNotFoundError(f"{hf_dir} has several safetensors files ({', '.join(files)}) but no "
                                f"{INDEX_NAME} saying which tensor lives where")
    with _open_safetensors(hf_dir / files[0]) as handle:
        return {name: files[0] for name in handle.keys()}


def _default_file_mode() -> int:
    """The mode open() gives a new file under the process umask (0644 with the usual umask 022)."""
    umask = os.umask(0)
    os.umask(umask)
    return 0o666 & ~umask


class HFShardWriter:
    """Writes tensors into safetensors shards of at most `max_shard_bytes` (one shard in memory).

    `add` in any order, then `finish()`: one shard becomes `model.safetensors`; several become
    `model-0000i-of-0000N.safetensors` plus `model.safetensors.index.json`.
    """

    def __init__(self, out_dir: str | os.PathLike, max_shard_bytes: int = 5 * 2**30):
        if max_shard_bytes <= 0:
            raise ValueError(f"max_shard_bytes must be positive, got {max_shard_bytes}")
        self.out_dir = pathlib.Path(out_dir)
        self.out_dir.mkdir(parents=True, exist_ok=True)
        self.max_shard_bytes = max_shard_bytes
        self._pending: dict[str, torch.Tensor] = {}
        self._pending_bytes = 0
        self._shards: list[tuple[str, list[str]]] = []  # temporary file name, tensor names
        self.total_bytes = 0

    def add(self, name: str, tensor: torch.Tensor) -> None:
        if name in self._pending or any(name in names for _, names in self._shards):
            raise ValueError(f"tensor {name!r} written twice")
        nbytes = tensor.numel() * tensor.element_size()
        if self._pending and self._pending_bytes + nbytes > self.max_shard_bytes:
            self._flush()
        # own, contiguous CPU memory: views of one parameter (gate/up halves) must not share storage
        self._pending[name] = tensor.detach().to("cpu").contiguous().clone()
        self._pending_bytes += nbytes
        self.total_bytes += nbytes

    def _flush(self) -> None:
        tmp_name = f".shard-{len(self._shards):05d}.safetensors.tmp"
        save_file(self._pending, str(self.out_dir / tmp_name), metadata={"format": "pt"})
        self._shards.append((tmp_name, list(self._pending)))
        self._pending, self._pending_bytes = {}, 0

    def finish(self) -> list[str]:
        """Writes the last shard and the index; returns the shard file names."""
        if self._pending or not self._shards:
            self._flush()
        count = len(self._shards)
        if count == 1:
            final_names = [SINGLE_NAME]
        else:
            final_names = [f"model-{i + 1:05d}-of-{count:05d}.safetensors" for i in range(count)]
        weight_map = {}
        for (tmp_name, names), final in zip(self._shards, final_names):
            # safetensors creates files 0600; give the shards the mode every other file here gets
            os.chmod(self.out_dir / tmp_name, _default_file_mode())
            os.replace(self.out_dir / tmp_name, self.out_dir / final)
            weight_map.update({name: final for name in names})
        if count > 1:
            index = {"metadata": {"total_size": self.total_bytes}, "weight_map": dict(sorted(weight_map.items()))}
            (self.out_dir / INDEX_NAME).write_text(json.dumps(index, indent=2) + "\n")
        return final_names


def is_weight_file(name: str) -> bool:
    return name.endswith(_WEIGHT_SUFFIXES) or name in _WEIGHT_INDEXES


def copy_hf_assets(src_dir: str | os.PathLike, dst_dir: str | os.PathLike,
                   exclude: tuple[str, ...] = ()) -> list[str]:
    """Copies every top-level non-weight file (config, tokenizer, generation config, chat template,
    license, README) from `src_dir` to `dst_dir`; returns the copied names."""
    src, dst = pathlib.Path(src_dir), pathlib.Path(dst_dir)
    dst.mkdir(parents=True, exist_ok=True)
    copied = []
    for path in sorted(src.iterdir()):
        if path.is_file() and not is_weight_file(path.name) and path.name not in exclude:
            shutil.copy2(path, dst / path.name)
            copied.append(path.name)
    return copied


def parse_size(text: str) -> int:
    """'5GB', '500MB', '2GiB', '1000000' -> bytes (HF's max_shard_size convention: GB = 10**9)."""
    units = {"KIB": 2**10, "MIB": 2**20, "GIB": 2**30, "KB": 10**3, "MB": 10**6, "GB": 10**9, "B": 1}
    value = text.strip().upper()
    for unit, factor in units.items():
        if value.endswith(unit):
            number = value[: -len(unit)].strip()
            break
    else:
        number, factor = value, 1
    try:
        size = int(float(number) * factor)
    except ValueError:
        raise ValueError(f"cannot read the size {text!r}; write e.g. 5GB, 500MB, 2GiB or a byte count") from None
    if size <= 0:
        raise ValueError(f"size {text!r} must be positive")
    return size
