"""The checkpoint format (marker, kind, assets) and the content fingerprints, without building a model.

Which kind a real checkpoint gets (the trainer's step_N: trained; `solopo convert hf-to-mcore`:
converted) is checked where those are written: tests/training/test_run_init.py and
tests/eval/test_eval_checkpoints.py.
"""

import json
import shutil

import pytest

from megatron_solopo.checkpoint import fingerprint
from megatron_solopo.checkpoint.format import (
    ASSETS_DIR,
    CONVERTED,
    MARKER_FILE,
    MARKER_FORMAT_VERSION,
    TRAINED,
    CheckpointError,
    MarkerError,
    find_marker,
    read_marker,
    stored_tokenizer_dir,
    write_marker,
)


def test_marker_round_trip_has_an_explicit_kind(tmp_path):
    path = write_marker(tmp_path, TRAINED, {"step": 7, "preset": {"name": "tiny"}, "dtype": "bf16",
                                            "kind": "ignored", "format_version": 99})
    assert path == tmp_path / MARKER_FILE and not (tmp_path / f"{MARKER_FILE}.tmp").exists()
    raw = json.loads(path.read_text())
    assert (raw["kind"], raw["format_version"]) == (TRAINED, MARKER_FORMAT_VERSION)  # fields cannot override them
    marker = read_marker(tmp_path)
    assert marker.kind == TRAINED and marker.fields["step"] == 7
    assert marker.preset == {"name": "tiny"} and marker.dtype == "bf16" and marker.hf_config is None
    assert marker.assets_dir == tmp_path / ASSETS_DIR
    with pytest.raises(ValueError, match="checkpoint kind 'other'"):
        write_marker(tmp_path, "other", {})


@pytest.mark.parametrize("fmt, kind", [("megatron_solopo.mcore_checkpoint", CONVERTED),
                                       ("megatron_solopo.train_checkpoint", TRAINED)])
def test_old_markers_without_kind_are_read_by_their_format(tmp_path, fmt, kind):
    # what convert and the trainer wrote before the marker had a kind (both with a preset)
    (tmp_path / MARKER_FILE).write_text(json.dumps({"format": fmt, "format_version": 1, "step": 3,
                                                    "preset": {"name": "tiny"}, "hf_assets_dir": None}))
    marker = read_marker(tmp_path)
    assert marker.kind == kind and marker.format_version == 1
    assert marker.assets_dir == tmp_path / ASSETS_DIR  # a null hf_assets_dir means the default name


@pytest.mark.parametrize("content, message", [
    ("{not json", "is not valid JSON"),
    ("[1, 2]", "not a JSON object"),
    (json.dumps({"format": "x", "format_version": 1}), "no known checkpoint kind"),
    (json.dumps({"kind": "converted"}), "no valid format_version"),
    (json.dumps({"kind": "sharded", "format_version": 2}), "no known checkpoint kind"),
    (json.dumps({"kind": "trained", "format_version": MARKER_FORMAT_VERSION + 1}), "upgrade megatron_solopo"),
    (json.dumps({"kind": "trained", "format_version": 2, "preset": "tiny"}), "'preset' must be an object"),
])
def test_a_broken_marker_is_a_clear_error_naming_the_file(tmp_path, content, message):
    (tmp_path / MARKER_FILE).write_text(content)
    with pytest.raises(MarkerError, match=message) as err:
        read_marker(tmp_path)
    assert str(tmp_path / MARKER_FILE) in str(err.value)
    with pytest.raises(MarkerError):
        find_marker(tmp_path)  # a marker that exists but is broken is never taken for "no marker"
    # a user error for the commands (ValueError) and a checkpoint error for the trainer
    assert isinstance(err.value, ValueError) and isinstance(err.value, CheckpointError)


def test_a_missing_marker(tmp_path):
    assert find_marker(tmp_path) is None
    with pytest.raises(MarkerError, match="not a complete checkpoint of this project") as err:
        read_marker(tmp_path)
    assert str(tmp_path / MARKER_FILE) in str(err.value)


def test_stored_tokenizer_dir(tmp_path):
    assert stored_tokenizer_dir(tmp_path) is None
    (tmp_path / ASSETS_DIR).mkdir()
    (tmp_path / ASSETS_DIR / "config.json").write_text("{}")
    assert stored_tokenizer_dir(tmp_path) is None  # assets without a tokenizer
    (tmp_path / ASSETS_DIR / "tokenizer.json").write_text("{}")
    assert stored_tokenizer_dir(tmp_path) == tmp_path / ASSETS_DIR
    write_marker(tmp_path, CONVERTED, {"hf_assets_dir": "elsewhere"})
    assert stored_tokenizer_dir(tmp_path) is None  # the marker names the assets directory


def _weights_dir(path, tail: bytes = b""):
    path.mkdir()
    (path / "model.safetensors").write_bytes(b"a" * (3 << 20) + tail)  # > 2 MiB: both ends are read
    (path / "config.json").write_text('{"hidden_size": 8}')
    (path / "notes.txt").write_text("not a weight file")
    (path / "sub").mkdir()
    (path / "sub" / "extra.bin").write_bytes(b"b" * 10)
    return path


def test_fingerprints_are_content_not_paths(tmp_path):
    a = _weights_dir(tmp_path / "a")
    per_file = fingerprint.file_fingerprints(a, (".safetensors", "config.json"))
    assert sorted(per_file) == ["config.json", "model.safetensors"]
    assert fingerprint.file_fingerprints(a, (".bin",), recursive=True) == {
        "sub/extra.bin": fingerprint.file_fingerprints(a / "sub", (".bin",))["extra.bin"]}
    moved = tmp_path / "elsewhere" / "b"
    moved.parent.mkdir()
    shutil.copytree(a, moved)
    assert fingerprint.file_fingerprints(moved, (".safetensors", "config.json")) == per_file
    assert fingerprint.directory_fingerprint(moved) == fingerprint.directory_fingerprint(a)
    # the last MiB changed: another model
    changed = _weights_dir(tmp_path / "c", tail=b"!")
    assert (fingerprint.file_fingerprints(changed, (".safetensors",))["model.safetensors"]
            != per_file["model.safetensors"])
    assert fingerprint.directory_fingerprint(changed) != fingerprint.directory_fingerprint(a)
    # a file that is no weight or config file is not part of the identity
    (a / "notes.txt").write_text("edited")
    assert fingerprint.directory_fingerprint(a) == fingerprint.directory_fingerprint(moved)


def test_architecture_and_dtype_of_a_checkpoint(tmp_path):
    import dataclasses

    from megatron_solopo.checkpoint.loader import (
        checkpoint_dtype,
        checkpoint_preset,
        resolve_preset,
        resolve_tokenizer_dir,
    )
    from megatron_solopo.model.config import ModelConfig
    from megatron_solopo.model.presets import get_preset

    tiny = get_preset("tiny")
    converted, trained, bare = tmp_path / "converted", tmp_path / "trained", tmp_path / "bare"
    for path in (converted, trained, bare):
        path.mkdir()
    write_marker(converted, CONVERTED, {"preset": dataclasses.asdict(tiny), "dtype": "bf16"})
    assert checkpoint_preset(converted) == tiny and checkpoint_dtype(converted) == "bf16"
    assert resolve_preset(ModelConfig(checkpoint=str(converted))) == tiny
    # a training checkpoint whose marker has neither: the model section of the config saved with it
    write_marker(trained, TRAINED, {"step": 1})
    (trained / "config.yaml").write_text("model:\n  preset: tiny\n  params_dtype: fp16\n  recompute: full\n")
    assert checkpoint_preset(trained) == tiny and checkpoint_dtype(trained) == "fp16"
    # a converted marker without a preset says nothing about the architecture
    write_marker(bare, CONVERTED, {})
    with pytest.raises(MarkerError, match="records no preset"):
        checkpoint_preset(bare)
    assert checkpoint_dtype(bare) is None
    # the tokenizer: model.tokenizer, else the HF directory, else the checkpoint's hf_assets/
    assert resolve_tokenizer_dir(ModelConfig(checkpoint=str(converted), tokenizer="tok")) == "tok"
    with pytest.raises(ValueError, match="no tokenizer for this model"):
        resolve_tokenizer_dir(ModelConfig(checkpoint=str(converted)))
    (converted / ASSETS_DIR).mkdir()
    (converted / ASSETS_DIR / "tokenizer_config.json").write_text("{}")
    assert resolve_tokenizer_dir(ModelConfig(checkpoint=str(converted))) == str(converted / ASSETS_DIR)
