"""The on-disk format of this project's Megatron checkpoints: file names, the marker, its kind.

A checkpoint directory (converted by `solopo convert hf-to-mcore`, or a training `step_N`) holds::

    .metadata, __*_*.distcp, metadata.json   dist_checkpointing's files (the model under global keys)
    hf_assets/                               tokenizer files, the HF config.json (+ generation config, ...)
    config.yaml                              trained only: the experiment config that produced it
    solopo_checkpoint.json                   the marker, written last (the completion signal)

Every checkpoint (trained and converted) also holds `manifest.json` (`write_manifest`, written after
every other file): the relative name and size in bytes of every file. Every reader (resume, a run's
model.checkpoint, eval, conversion back to HF) checks it first (`check_checkpoint`), so a truncated,
emptied or missing file is reported by path instead of failing inside torch.distributed.checkpoint;
a checkpoint without a manifest (older saves, Megatron checkpoints from elsewhere) is checked for a
valid marker (when it has one) and a non-empty `.metadata` only.

The marker is one JSON object with `format` ("megatron_solopo.checkpoint"), `format_version`,
`kind` ("converted" | "trained") and what loading needs (`preset`, `dtype`, `hf_assets_dir`;
`step` and `layout` for a trained one; `hf_config`, `source`, `versions` for a converted one).
`write_marker` writes it, `read_marker` reads and validates it. Markers of format_version 1 have
no `kind`; it is inferred from their `format` string.
"""

from __future__ import annotations

import dataclasses
import json
import os
import pathlib
from collections.abc import Mapping
from typing import Any

from megatron_solopo.console import UserError, relative_path_hint

MARKER_FILE = "solopo_checkpoint.json"
"""The marker of a complete checkpoint (written last, atomically)."""
ASSETS_DIR = "hf_assets"
"""Sub-directory with the tokenizer and the HF config.json (+ generation config, chat template, license)."""
CONFIG_FILE = "config.yaml"
"""The experiment config saved with a training checkpoint."""
HF_CONFIG_FILE = "config.json"
"""A Hugging Face model's config (in an HF directory, and in hf_assets/)."""
DIST_METADATA_FILE = "metadata.json"
"""dist_checkpointing's own metadata: present in every Megatron distributed checkpoint."""
TORCH_DCP_METADATA_FILE = ".metadata"
"""torch.distributed.checkpoint's index of the .distcp shards."""
MANIFEST_FILE = "manifest.json"
"""Names and sizes of every file of a training checkpoint (written last before publishing)."""

MARKER_FORMAT = "megatron_solopo.checkpoint"
MARKER_FORMAT_VERSION = 2
"""2: an explicit `kind`. 1: no kind, one `format` string per kind (still read)."""
CONVERTED, TRAINED = "converted", "trained"
KINDS = (CONVERTED, TRAINED)
_LEGACY_FORMATS = {"megatron_solopo.mcore_checkpoint": CONVERTED, "megatron_solopo.train_checkpoint": TRAINED}


class CheckpointError(UserError, RuntimeError):
    """A checkpoint is missing, incomplete or does not fit this run; the message says which and why (a user
    error: `solopo` prints it as one line)."""


class MarkerError(CheckpointError, ValueError):
    """A checkpoint's marker is missing, not valid JSON, or describes no known kind (names the file)."""


@dataclasses.dataclass(frozen=True)
class CheckpointMarker:
    """A validated marker: the checkpoint's kind and the fields loading needs."""

    path: pathlib.Path
    """The checkpoint directory."""
    kind: str
    """converted | trained."""
    format_version: int
    fields: dict[str, Any]
    """Everything in the file, as written."""

    @property
    def preset(self) -> dict[str, Any] | None:
        """The architecture (ModelPreset fields), or None for a marker that does not carry it."""
        return self.fields.get("preset")

    @property
    def dtype(self) -> str | None:
        """The params dtype the weights were stored in (fp32 | bf16 | fp16), if recorded."""
        return self.fields.get("dtype")

    @property
    def hf_config(self) -> dict[str, Any] | None:
        """The source's HF config.json, as recorded by a conversion (None for a training checkpoint)."""
        return self.fields.get("hf_config")

    @property
    def assets_dir(self) -> pathlib.Path:
        """Where the tokenizer / HF config files of this checkpoint are (may not exist)."""
        return self.path / (self.fields.get("hf_assets_dir") or ASSETS_DIR)


def marker_path(path: str | os.PathLike) -> pathlib.Path:
    """The marker file of the checkpoint directory `path`."""
    return pathlib.Path(path) / MARKER_FILE


def write_marker(directory: str | os.PathLike, kind: str, fields: Mapping[str, Any]) -> pathlib.Path:
    """Writes the marker of a finished checkpoint atomically (the last file of a save): `format`,
    `format_version` and `kind` first, then `fields`. Returns the marker's path."""
    if kind not in KINDS:
        raise ValueError(f"checkpoint kind {kind!r} is not one of {', '.join(KINDS)}")
    marker = {"format": MARKER_FORMAT, "format_version": MARKER_FORMAT_VERSION, "kind": kind,
              **{k: v for k, v in fields.items() if k not in ("format", "format_version", "kind")}}
    final = marker_path(directory)
    tmp = final.with_name(f"{MARKER_FILE}.tmp")
    with tmp.open("w", encoding="utf-8") as f:
        json.dump(marker, f, indent=2)
        f.write("\n")
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, final)
    return final


def read_marker(path: str | os.PathLike) -> CheckpointMarker:
    """The validated marker of the checkpoint directory `path`; MarkerError naming the file when it
    is missing, not a JSON object, of an unknown kind or format, or from a newer format version."""
    path = pathlib.Path(path)
    file = marker_path(path)
    if not file.is_file():
        raise MarkerError(f"{file} does not exist: {path} is not a complete checkpoint of this project (neither "
                          "`solopo convert hf-to-mcore` output nor a training step_N directory), or its save "
                          "was interrupted")
    try:
        fields = json.loads(file.read_text(encoding="utf-8"))
    except (json.JSONDecodeError, UnicodeDecodeError) as err:
        raise MarkerError(f"{file} is not valid JSON ({err}); the checkpoint {path} is damaged: use another "
                          "checkpoint (or re-create it)") from err
    if not isinstance(fields, dict):
        raise MarkerError(f"{file} holds a {type(fields).__name__}, not a JSON object; the checkpoint {path} "
                          "is damaged")
    version = fields.get("format_version")
    if not isinstance(version, int) or version < 1:
        raise MarkerError(f"{file} has no valid format_version (got {version!r}); it was not written by "
                          "megatron_solopo")
    if version > MARKER_FORMAT_VERSION:
        raise MarkerError(f"{file} has format_version {version}, newer than the {MARKER_FORMAT_VERSION} this "
                          "version of megatron_solopo reads; upgrade megatron_solopo")
    kind = fields.get("kind") if "kind" in fields else _LEGACY_FORMATS.get(fields.get("format"))
    if kind not in KINDS:
        raise MarkerError(f"{file} describes no known checkpoint kind (kind={fields.get('kind')!r}, "
                          f"format={fields.get('format')!r}); expected kind {' or '.join(KINDS)}")
    preset = fields.get("preset")
    if preset is not None and not isinstance(preset, dict):
        raise MarkerError(f"{file}: 'preset' must be an object of architecture fields, got {preset!r}")
    return CheckpointMarker(path=path, kind=kind, format_version=version, fields=fields)


def find_marker(path: str | os.PathLike) -> CheckpointMarker | None:
    """`read_marker`, or None when `path` has no marker file at all (a Megatron checkpoint from
    elsewhere); a marker that exists but is broken is still an error."""
    return read_marker(path) if marker_path(path).is_file() else None


def stored_tokenizer_dir(path: str | os.PathLike) -> pathlib.Path | None:
    """The tokenizer saved with the checkpoint `path` (its assets directory holding tokenizer files)."""
    marker = find_marker(path)
    assets = marker.assets_dir if marker is not None else pathlib.Path(path) / ASSETS_DIR
    return assets if any(assets.glob("tokenizer*")) else None


# ------------------------------------------------------------------------------------- manifest
def _files_of(directory: pathlib.Path) -> dict[str, int]:
    return {file.relative_to(directory).as_posix(): file.stat().st_size
            for file in sorted(directory.rglob("*")) if file.is_file() and file.name != MANIFEST_FILE}


def write_manifest(directory: str | os.PathLike) -> pathlib.Path:
    """Writes manifest.json listing {relative file name: size in bytes} of every file in `directory`
    (atomically; call it after every other file is written). Returns its path."""
    directory = pathlib.Path(directory)
    final = directory / MANIFEST_FILE
    tmp = final.with_name(f"{MANIFEST_FILE}.tmp")
    files = _files_of(directory)
    with tmp.open("w", encoding="utf-8") as f:
        json.dump({"format": MARKER_FORMAT, "files": files}, f, indent=1)
        f.write("\n")
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, final)
    return final


def verify_manifest(directory: str | os.PathLike) -> list[str]:
    """What is wrong with the checkpoint `directory` (empty list = intact): files of its manifest that
    are missing or have another size, an unreadable manifest or marker, an empty or missing `.metadata`.
    Every problem names the file."""
    directory = pathlib.Path(directory)
    problems: list[str] = []
    try:
        read_marker(directory)
    except CheckpointError as err:
        problems.append(str(err))
    manifest = directory / MANIFEST_FILE
    if manifest.is_file():
        try:
            files = json.loads(manifest.read_text(encoding="utf-8"))["files"]
            if not isinstance(files, dict):
                raise TypeError("files is not an object")
        except (ValueError, KeyError, TypeError, UnicodeDecodeError) as err:
            return [*problems, f"{manifest} is damaged ({err})"]
        for name, size in files.items():
            file = directory / name
            if not file.is_file():
                problems.append(f"{file} is missing")
            elif file.stat().st_size != size:
                problems.append(f"{file} has {file.stat().st_size} bytes, the manifest says {size}")
    else:
        index = directory / TORCH_DCP_METADATA_FILE
        if not index.is_file() or index.stat().st_size == 0:
            problems.append(f"{index} is missing or empty")
    return problems


def check_checkpoint(path: str | os.PathLike, fix: str = "use an intact checkpoint or re-create this one") -> None:
    """CheckpointError naming `path`, every damaged file and `fix` unless the checkpoint directory is intact:
    its manifest when it has a marker (`verify_manifest`), else (a Megatron checkpoint from elsewhere) a
    non-empty `.metadata`. What every reader of a checkpoint calls before loading it."""
    path = pathlib.Path(path)
    if not path.is_dir():
        raise CheckpointError(f"checkpoint {path} {'is not a directory' if path.exists() else 'does not exist'}"
                              + relative_path_hint(path))
    if marker_path(path).is_file():
        problems = verify_manifest(path)
    else:
        index = path / TORCH_DCP_METADATA_FILE
        problems = [] if index.is_file() and index.stat().st_size > 0 else [f"{index} is missing or empty"]
    if problems:
        raise CheckpointError(f"checkpoint {path} is damaged: {'; '.join(problems)}; {fix}")

