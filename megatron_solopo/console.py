"""How `solopo` talks to its user: one-line errors with exit status 2, and quiet dependency warnings.

Library code raises ordinary exceptions whose message names the file or setting at fault and the fix
(ValueError and its subclasses such as ConfigError for bad input, OSError for files and permissions,
`UserError` where neither fits). `solopo` (cli.main) prints every exception of `USER_ERRORS` as
``solopo <command>: error: <message>`` on one line and exits with `EXIT_USER_ERROR`; under torchrun or
srun the line is printed by rank 0 only (every rank raises the same configuration error).
``SOLOPO_TRACEBACK=1`` lets the exception through with its full traceback, for bug reports.
"""

from __future__ import annotations

import contextlib
import errno
import json
import logging
import os
import pathlib
import sys
import time
import uuid
import warnings

from megatron_solopo.launch_env import read_launch_env

__all__ = ["EXIT_USER_ERROR", "USER_ERRORS", "UserError", "WrongFieldType", "check_writable_dir",
           "describe_error", "launcher_rank", "mute_dependency_warnings", "relative_path_hint", "removed_if_left_empty",
           "report_error",
           "DEPENDENCY_WARNINGS"]

EXIT_USER_ERROR = 2  # as argparse exits on a bad command line: the input is wrong, not the program


class UserError(Exception):
    """Something the user can fix (input, environment) that is neither a ValueError nor an OSError."""


class WrongFieldType(TypeError, ValueError):
    """A field of a user's file has the wrong JSON type: a TypeError for callers, a user error for `solopo`."""


USER_ERRORS: tuple[type[BaseException], ...] = (UserError, ValueError, OSError)

_OS_ERROR_FIXES = {
    errno.EACCES: "choose a directory you can write or fix its permissions",
    errno.EPERM: "choose a directory you can write or fix its permissions",
    errno.EROFS: "the file system is read-only: choose another directory",
    errno.ENOSPC: "the disk is full: free space or choose another directory",
    errno.ENOTDIR: "a part of the path is a file, not a directory: choose another path",
    errno.EISDIR: "the path is a directory where a file was expected",
    errno.EEXIST: "a file is where a directory should be created: choose another path",
    errno.ENOENT: "check the path",
}


def describe_error(err: BaseException) -> str:
    """The one-line message for `err`: its own message, or for a bare OSError the path, cause and fix."""
    if isinstance(err, OSError) and err.filename is not None and err.strerror:
        fix = _OS_ERROR_FIXES.get(err.errno)
        text = f"{err.filename}: {err.strerror}" + (f" ({fix})" if fix else "")
    else:
        text = str(err) or type(err).__name__
    return " ".join(text.split())  # one line, whatever the message's layout


def relative_path_hint(path: str | os.PathLike) -> str:
    """What to add to a message about a path that was not found: for a relative path, the working directory it
    was resolved from (a command run from another directory than the config's author's)."""
    return "" if pathlib.Path(path).is_absolute() else f" (relative to the working directory {pathlib.Path.cwd()})"


def launcher_rank() -> int:
    """This process's global rank as torchrun or srun set it (launch_env.read_launch_env); 0 alone."""
    return read_launch_env().rank


def report_error(command: str, err: BaseException, stream=None) -> int:
    """Prints ``solopo <command>: error: ...`` once per job (rank 0); returns EXIT_USER_ERROR.

    Under torchrun every rank also leaves the line in its elastic error file, so the launcher's failure
    summary ("Root Cause") shows the message instead of "To enable traceback see ...".
    """
    line = f"solopo {command}: error: {describe_error(err)}"
    if launcher_rank() == 0:
        print(line, file=stream or sys.stderr)
    _record_for_torchrun(line)
    return EXIT_USER_ERROR


def _record_for_torchrun(line: str) -> None:
    path = os.environ.get("TORCHELASTIC_ERROR_FILE")
    if not path:
        return
    record = {"message": {"message": line, "extraInfo": {"py_callstack": line, "timestamp": str(int(time.time()))}}}
    with contextlib.suppress(OSError):  # the summary is a convenience; the exit status is what counts
        pathlib.Path(path).write_text(json.dumps(record), encoding="utf-8")


def check_writable_dir(path: str | os.PathLike, setting: str) -> pathlib.Path:
    """Creates directory `path` if needed and proves it writable by writing a probe file.

    Raises UserError naming `setting` (e.g. "train.output_dir") and the path, before any long work
    starts, instead of an OSError deep inside a save hours later. A real write is the only check that
    also holds for root (which os.access always lets through) and read-only mounts.
    """
    path = pathlib.Path(path)
    if path.exists() and not path.is_dir():
        raise UserError(f"{setting}={path} is a file, not a directory; choose a directory")
    probe = path / f".solopo-write-probe-{uuid.uuid4().hex[:8]}"
    try:
        path.mkdir(parents=True, exist_ok=True)
        probe.write_bytes(b"")
        probe.unlink()
    except OSError as err:
        raise UserError(f"{setting}={path} is not a writable directory ({describe_error(err)})") from None
    return path


@contextlib.contextmanager
def removed_if_left_empty(path: str | os.PathLike, enabled: bool = True):
    """For a command that creates its output directory `path` up front (check_writable_dir): when the command
    then fails, the directory is removed again if it did not exist before and is still empty, so a refused or
    failed command leaves nothing behind. `enabled=False` (ranks other than 0) does nothing."""
    path = pathlib.Path(path)
    created_now = enabled and not path.exists()
    try:
        yield path
    except BaseException:
        if created_now:
            with contextlib.suppress(OSError):  # not empty (or gone): keep it
                path.rmdir()
        raise


# Messages of optional-dependency and deprecation warnings that Megatron-Core, Transformer Engine and
# torch print at every import on a machine without TE/apex/CUDA: the user can do nothing about them
# in the middle of a run, and `solopo env` reports what is missing in one line.
DEPENDENCY_WARNINGS = (
    r"Transformer Engine and Apex are not installed",
    r"Apex is not installed",
    r".*is deprecated",
    r"MimoModelConfig is experimental",
    r".*[Tt]ransformer[ _][Ee]ngine.*not installed",
)
_TORCH_NOISE_LOGGERS = ("torch.utils.cpp_extension",)  # "No CUDA runtime is found" on CPU machines
_NOISE_WARNINGS = (
    r"torch.distributed is disabled, unavailable or uninitialized",  # torch.distributed.checkpoint in one process
)
_NOISE_LOG_MESSAGES = {
    # once per rank at every first save: the project saves synchronously, so the notice is about nothing it does
    "megatron.core.dist_checkpointing.strategies.torch": "async save is deprecated",
    # the distributed optimizer's layout, computed inside DDP as intended: an API notice for Megatron's callers
    "megatron.core.distributed.distributed_data_parallel": "full_param_layout not provided",
}


class _DropMessage(logging.Filter):
    def __init__(self, text: str):
        super().__init__()
        self.text = text

    def filter(self, record: logging.LogRecord) -> bool:
        return self.text not in record.getMessage()


def mute_dependency_warnings() -> None:
    """Hides DEPENDENCY_WARNINGS and the few notices of Megatron-Core and torch that describe their own API,
    not the run (_NOISE_WARNINGS, _NOISE_LOG_MESSAGES), unless SOLOPO_SHOW_WARNINGS=1 or python -W says
    otherwise. Every other warning is shown."""
    if os.environ.get("SOLOPO_SHOW_WARNINGS") == "1":
        return
    if not sys.warnoptions:  # python -W / PYTHONWARNINGS decide about warnings (not about log records)
        for message in DEPENDENCY_WARNINGS:
            warnings.filterwarnings("ignore", message=message, category=UserWarning)
            warnings.filterwarnings("ignore", message=message, category=FutureWarning)
            warnings.filterwarnings("ignore", message=message, category=DeprecationWarning)
        for message in _NOISE_WARNINGS:
            warnings.filterwarnings("ignore", message=message, category=UserWarning)
    for name in _TORCH_NOISE_LOGGERS:
        logging.getLogger(name).setLevel(logging.ERROR)
    for name, text in _NOISE_LOG_MESSAGES.items():
        logger = logging.getLogger(name)
        if not any(isinstance(f, _DropMessage) and f.text == text for f in logger.filters):
            logger.addFilter(_DropMessage(text))
