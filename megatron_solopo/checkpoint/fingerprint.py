"""Content fingerprints of model files: cheap (an 8B model in well under a second), independent of
where the files are, and different when the weights are replaced.

`file_fingerprints` is the one fingerprint: per file, sha256 over its size and its first and last
MiB (reading whole weights would take minutes). The reference log-probs identify their initial model
by it (`training.run_inputs.model_identity`), and eval reports identify the evaluated model by
`directory_fingerprint`, one sha256 over those per-file fingerprints.
"""

from __future__ import annotations

import hashlib
import json
import os
import pathlib

SAMPLE_BYTES = 1 << 20
"""How much of each end of a file is read."""
REPORT_SUFFIXES = (".safetensors", ".bin", ".distcp", ".pt", ".json", ".model")
"""The weight and config files that identify a model directory in an eval report."""


def _file_fingerprint(path: pathlib.Path) -> str:
    size = path.stat().st_size
    h = hashlib.sha256(str(size).encode())
    with path.open("rb") as f:
        h.update(f.read(SAMPLE_BYTES))
        if size > 2 * SAMPLE_BYTES:
            f.seek(-SAMPLE_BYTES, os.SEEK_END)
            h.update(f.read(SAMPLE_BYTES))
    return h.hexdigest()


def file_fingerprints(directory: str | os.PathLike, suffixes: tuple[str, ...],
                      recursive: bool = False) -> dict[str, str]:
    """{path relative to `directory`: fingerprint} for the files whose names end with one of
    `suffixes` (sub-directories too when `recursive`), sorted by path. The paths are relative, so a
    moved or copied directory keeps its fingerprints."""
    root = pathlib.Path(directory)
    candidates = root.rglob("*") if recursive else root.iterdir()
    files = sorted(p for p in candidates if p.is_file() and p.name.endswith(suffixes))
    return {p.relative_to(root).as_posix(): _file_fingerprint(p) for p in files}


def directory_fingerprint(directory: str | os.PathLike, suffixes: tuple[str, ...] = REPORT_SUFFIXES) -> str:
    """One sha256 over the `file_fingerprints` of every weight/config file under `directory` (names,
    sizes, first and last MiB): two different checkpoints differ in it with near certainty."""
    fingerprints = file_fingerprints(directory, suffixes, recursive=True)
    return hashlib.sha256(json.dumps(fingerprints, sort_keys=True).encode()).hexdigest()
