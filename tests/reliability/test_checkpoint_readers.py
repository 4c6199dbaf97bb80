"""Every reader of a checkpoint verifies it as resuming does (issue 26): `solopo eval --checkpoint`, `solopo convert
mcore-to-hf` and a run's `model.checkpoint` refuse a truncated or garbage checkpoint with one line naming the
file (converted checkpoints carry a manifest too), and a damaged reference_logps.pt is named with its fix.
Nothing is written: no --output, no eval report, no run directory.
"""

from __future__ import annotations

import os
import pathlib
import shutil

import pytest
from test_user_errors import CONFIG, TOKENIZER, _one_line_error, _tiny_hf_model, _tree_hash

from megatron_solopo.cli import main
from megatron_solopo.console import EXIT_USER_ERROR


@pytest.fixture(scope="module")
def converted(tmp_path_factory) -> pathlib.Path:
    """A converted (hf-to-mcore) tiny checkpoint with the sample tokenizer in its hf_assets/."""
    root = tmp_path_factory.mktemp("converted")
    hf_dir = _tiny_hf_model(root / "hf")
    assert main(["convert", "hf-to-mcore", "--hf-model", str(hf_dir), "--output", str(root / "mcore"),
                 "--dtype", "fp32"]) == 0
    return root / "mcore"


def test_a_converted_checkpoint_carries_a_manifest_of_every_file(converted):
    import json

    from megatron_solopo.checkpoint.format import MANIFEST_FILE, verify_manifest

    files = json.loads((converted / MANIFEST_FILE).read_text())["files"]
    assert "__0_0.distcp" in files and ".metadata" in files and "solopo_checkpoint.json" in files
    assert verify_manifest(converted) == []


def _damaged(source: pathlib.Path, to: pathlib.Path, how: str) -> pathlib.Path:
    shutil.copytree(source, to)
    shard = next(to.glob("*.distcp"))
    size = shard.stat().st_size
    shard.write_bytes(shard.read_bytes()[: size // 2] if how == "truncated" else os.urandom(size))
    if how == "garbage_without_manifest":  # an older checkpoint: only reading it can tell
        (to / "manifest.json").unlink()
    return to


def _readers(checkpoint: pathlib.Path, tmp_path: pathlib.Path) -> dict[str, list[str]]:
    return {
        "eval": ["eval", "--no-progress", "--checkpoint", str(checkpoint), "eval.suites=[short]",
                 "eval.num_samples=1", f"eval.output_dir={tmp_path / 'eval'}"],
        "convert": ["convert", "mcore-to-hf", "--checkpoint", str(checkpoint), "--output", str(tmp_path / "hf_out")],
        "train": ["train", "--config", str(CONFIG), f"model.checkpoint={checkpoint}", f"model.tokenizer={TOKENIZER}",
                  f"train.output_dir={tmp_path / 'run'}", f"data.cache_dir={tmp_path / 'cache'}", "train.steps=2",
                  "train.warmup_steps=0", "train.global_batch_pairs=2", "train.micro_batch_pairs=1"],
    }


@pytest.mark.parametrize("how", ["truncated", "garbage", "garbage_without_manifest"])
@pytest.mark.parametrize("reader", ["eval", "convert", "train"])
def test_every_reader_names_a_damaged_checkpoint(converted, tmp_path, how, reader, capsys):
    checkpoint = _damaged(converted, tmp_path / "damaged", how)
    before = _tree_hash(tmp_path)
    assert main(_readers(checkpoint, tmp_path)[reader]) == EXIT_USER_ERROR
    line = _one_line_error(capsys, reader.split()[0])
    assert f"checkpoint {checkpoint}" in line and "damaged" in line
    if how == "truncated":
        assert str(next(checkpoint.glob("*.distcp"))) in line and "the manifest says" in line
    else:
        assert "Traceback" not in line and len(line) < 600
    assert not (tmp_path / "hf_out").exists() and not (tmp_path / "run").exists() and not (tmp_path / "eval").exists()
    assert {k: v for k, v in _tree_hash(tmp_path).items() if k in before} == before


def test_a_truncated_reference_file_is_named_with_its_fix(tmp_path, capsys):
    reference = tmp_path / "reference_logps.pt"
    reference.write_bytes(b"PK\x03\x04 a zip cut short")
    before = _tree_hash(tmp_path)
    code = main(["train", "--config", str(CONFIG), f"model.tokenizer={TOKENIZER}", "objective.name=dpo",
                 "objective.lam=null", "train.reference=precomputed", f"train.reference_path={reference}",
                 f"train.output_dir={tmp_path / 'run'}", f"data.cache_dir={tmp_path / 'cache'}", "train.steps=2",
                 "train.warmup_steps=0", "train.global_batch_pairs=2", "train.micro_batch_pairs=1"])
    assert code == EXIT_USER_ERROR
    line = _one_line_error(capsys, "train")
    assert f"{reference} is damaged" in line and "solopo precompute-ref" in line
    assert {k: v for k, v in _tree_hash(tmp_path).items() if k in before} == before
    assert not (tmp_path / "run").exists()
