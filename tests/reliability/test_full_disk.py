"""A full disk (issue 26): `solopo train` checks the free space before the first step and before each save against
the size of the last checkpoint (an estimate from the model before the first), and a write that fails anyway
(dist_checkpointing's CheckpointException, an OSError) or a tokenized cache that cannot be written is one line
naming the path and the fix, leaving no partial checkpoint. The disk is simulated (shutil.disk_usage, the
writers) so the test runs anywhere; a real full tmpfs gives the same lines (the issue's probe list).
"""

from __future__ import annotations

import collections
import errno
import traceback

from test_user_errors import CONFIG, TOKENIZER, _one_line_error

from megatron_solopo.cli import main
from megatron_solopo.console import EXIT_USER_ERROR


def _train(tmp_path, *overrides: str) -> int:
    return main(["train", "--config", str(CONFIG), f"model.tokenizer={TOKENIZER}", f"train.output_dir={tmp_path / 'run'}",
                 f"data.cache_dir={tmp_path / 'cache'}", "train.steps=2", "train.warmup_steps=0", "train.save_every=1",
                 "train.global_batch_pairs=2", "train.micro_batch_pairs=1", *overrides])


def test_too_little_free_space_is_refused_before_the_first_step(tmp_path, monkeypatch, capsys):
    import shutil

    usage = collections.namedtuple("usage", "total used free")
    monkeypatch.setattr(shutil, "disk_usage", lambda path: usage(2**30, 2**30 - 128 * 1024, 128 * 1024))
    assert _train(tmp_path) == EXIT_USER_ERROR  # was: the up-front probe passed, the first save crashed
    line = _one_line_error(capsys, "train")
    assert f"not enough free space for the next checkpoint in {tmp_path / 'run'}" in line and "0.1 MiB free" in line
    assert not (tmp_path / "run").exists()  # nothing trained, nothing left


def test_a_save_that_fails_on_a_full_disk_names_the_checkpoint(tmp_path, monkeypatch, capsys):
    from megatron.core import dist_checkpointing
    from torch.distributed.checkpoint.api import CheckpointException

    from megatron_solopo.training import run_state

    def full_disk(state, directory):
        (run_state.pathlib.Path(directory) / "__0_0.distcp").write_bytes(b"half a shard")
        cause = OSError(errno.ENOSPC, "No space left on device")
        raise CheckpointException("Worker failure", {0: (cause, traceback.StackSummary())})

    monkeypatch.setattr(run_state, "_checkpoint_writer_dies_with_this_process", lambda: None)
    monkeypatch.setattr(dist_checkpointing, "save", full_disk)
    assert _train(tmp_path) == EXIT_USER_ERROR  # was: CheckpointException / "Worker failure", exit 1
    line = _one_line_error(capsys, "train")
    checkpoint = tmp_path / "run" / "checkpoints" / "step_000001"
    assert f"checkpoint {checkpoint} could not be written" in line and "No space left on device" in line
    assert "the disk is full" in line and "Traceback" not in line
    assert not any((tmp_path / "run" / "checkpoints").iterdir())  # no partial .step_000001.incomplete left


def test_a_tokenized_cache_on_a_full_disk_names_the_directory(tmp_path, monkeypatch, capsys):
    from megatron_solopo.data import tokenization

    def full_disk(rows, path):
        raise OSError("[Errno 28] Error writing bytes to file. Detail: [errno 28] No space left on device")

    monkeypatch.setattr(tokenization, "_write_arrow", full_disk)
    assert _train(tmp_path) == EXIT_USER_ERROR
    line = _one_line_error(capsys, "train")
    assert f"{tmp_path / 'cache'}/tokenized-" in line and "data.cache_dir" in line and "disk is full" in line
    assert not any((tmp_path / "cache").iterdir())  # the temporary cache directory is gone
