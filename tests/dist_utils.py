"""Run a function in N gloo processes (CPU) and collect each rank's return value.

Importing torch + megatron costs ~10 s per process on 2 cores. The ranks are therefore forked from a
multiprocessing fork server that imported them once for the whole session (`PRELOAD`): every call still
gets fresh processes (nothing of one test's state reaches another), without paying the imports again.
A fork server's children inherit its environment, not the caller's, so each call sends the caller's
environment along (tests set SOLOPO_DEVICE and the like per test). A test module should still run many
checks in one group (return a dict of results, assert in the parent).
"""

from __future__ import annotations

import os
import socket
import tempfile
import traceback

import torch
import torch.multiprocessing as mp

PRELOAD = ["torch", "torch.distributed", "megatron.core", "megatron_solopo.parallel", "megatron_solopo.model.builder",
           "megatron_solopo.training.step"]
"""Imported once by the fork server; every rank process is forked from it with these already loaded."""
START_METHOD = "forkserver"
mp.get_context(START_METHOD).set_forkserver_preload(PRELOAD)


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def _entry(rank: int, world_size: int, port: int, fn, args, out_dir: str, environ: dict[str, str]) -> None:
    os.environ.clear()
    os.environ.update(environ)  # the caller's, as a spawned process would have it
    os.environ.update(RANK=str(rank), WORLD_SIZE=str(world_size), LOCAL_RANK=str(rank),
                      MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    torch.set_num_threads(1)
    path = os.path.join(out_dir, f"rank{rank}.pt")
    try:
        result = fn(rank, world_size, *args)
        torch.save({"ok": True, "result": result}, path)
    except BaseException:  # noqa: BLE001 - report any failure to the parent
        torch.save({"ok": False, "error": traceback.format_exc()}, path)
        raise
    finally:
        import torch.distributed as dist

        if dist.is_initialized():
            try:
                from megatron.core import parallel_state

                parallel_state.destroy_model_parallel()
            except Exception:  # noqa: BLE001
                pass
            dist.destroy_process_group()


def run_distributed(fn, world_size: int, *args, timeout_s: float = 300):
    """Runs fn(rank, world_size, *args) in `world_size` spawned processes; returns results by rank.

    `fn` must be importable (module level). torchrun-style env vars are set, so
    `megatron_solopo.parallel.initialize_parallel(...)` inside fn joins the group.
    """
    port = _free_port()
    with tempfile.TemporaryDirectory() as out_dir:
        ctx = mp.start_processes(_entry, args=(world_size, port, fn, args, out_dir, dict(os.environ)),
                                 nprocs=world_size, join=False, start_method=START_METHOD)
        try:
            while not ctx.join(timeout=timeout_s):
                pass
        except Exception as err:  # a child failed: show its traceback, not just the exit code
            errors = []
            for rank in range(world_size):
                path = os.path.join(out_dir, f"rank{rank}.pt")
                if os.path.exists(path):
                    rec = torch.load(path, weights_only=False)
                    if not rec["ok"]:
                        errors.append(f"--- rank {rank} ---\n{rec['error']}")
            raise RuntimeError("distributed test failed:\n" + "\n".join(errors or [str(err)])) from None
        results = []
        for rank in range(world_size):
            rec = torch.load(os.path.join(out_dir, f"rank{rank}.pt"), weights_only=False)
            results.append(rec["result"])
        return results
