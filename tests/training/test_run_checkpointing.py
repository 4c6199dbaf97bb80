"""Checkpoints on dist_checkpointing: exact save/load, resharding to TP=2 and PP=2, completion, pruning.

One 2-process gloo group runs every distributed check (importing torch + Megatron costs ~10 s per
process): layout tp=1/dp=2 trains and saves, the same processes then rebuild the model as tp=2 and as
pp=2 and load it. Tensors are compared in their global form (reassembled from every rank's shards),
so the checks do not depend on how a layout splits them.
"""

from __future__ import annotations

import json
import os

import pytest
import torch

from dist_utils import run_distributed

PRESET = "tiny-4layer"


# ------------------------------------------------------------------------------- worker helpers
def _build(tp: int, pp: int, seed: int):
    from megatron.core.distributed import DistributedDataParallel, DistributedDataParallelConfig
    from megatron.core.optimizer import OptimizerConfig, get_megatron_optimizer

    from megatron_solopo.model import ModelConfig, get_preset
    from megatron_solopo.model.builder import build_model_chunks
    from megatron_solopo.parallel import ParallelConfig, initialize_parallel

    parallel = initialize_parallel(ParallelConfig(tp=tp, pp=pp), seed=seed)
    chunks = build_model_chunks(get_preset(PRESET), parallel,
                                ModelConfig(preset=PRESET, attention_backend="local", init_seed=seed))
    ddp_config = DistributedDataParallelConfig(grad_reduce_in_fp32=True)
    chunks = [DistributedDataParallel(c.config, ddp_config, c) for c in chunks]
    optimizer = get_megatron_optimizer(OptimizerConfig(optimizer="adam", lr=1e-2, clip_grad=0.0, weight_decay=0.1),
                                       chunks, use_gloo_process_groups=False)
    return chunks, optimizer


def _fake_step(chunks, optimizer, step: int) -> float:
    """One optimizer step on a next-token loss: the mean over a global batch that depends on `step` only."""
    from megatron.core import parallel_state as ps
    from megatron.core.distributed import finalize_model_grads

    for chunk in chunks:
        chunk.zero_grad_buffer()
    optimizer.zero_grad()
    # the global batch depends on the step only; each DP rank takes its rows (DDP averages over DP)
    dp_size, dp_rank = ps.get_data_parallel_world_size(), ps.get_data_parallel_rank()
    global_tokens = torch.randint(0, 256, (4, 12), generator=torch.Generator().manual_seed(1000 + step))
    tokens = global_tokens.chunk(dp_size)[dp_rank]
    position_ids = torch.arange(12).unsqueeze(0).expand(tokens.shape[0], -1)
    per_token = chunks[0](tokens, position_ids, None, labels=tokens.roll(-1, dims=1))  # [b, s]
    loss = per_token.mean()
    loss.backward()
    finalize_model_grads(chunks)
    ok, _, _ = optimizer.step()
    assert ok
    reduced = loss.detach().clone()
    torch.distributed.all_reduce(reduced, group=ps.get_data_parallel_group())
    return reduced.item() / ps.get_data_parallel_world_size()


def _global_pieces(chunks, optimizer) -> list[tuple[str, tuple, tuple, torch.Tensor]]:
    """Main-replica shards of the model and optimizer state: (key, global offset, global shape, data)."""
    from megatron.core.dist_checkpointing.dict_utils import nested_values
    from megatron.core.dist_checkpointing.mapping import ShardedTensor, apply_factories

    from megatron_solopo.training.run_state import _optimizer_sharded_state_dict, model_sharded_state_dict

    model_sd = model_sharded_state_dict(chunks)
    state = {"model": model_sd, "optimizer": _optimizer_sharded_state_dict(optimizer, model_sd, is_loading=False)}
    apply_factories(state)
    pieces = []
    for value in nested_values(state):
        if isinstance(value, ShardedTensor) and all(r == 0 for r in ([value.replica_id] if isinstance(
                value.replica_id, int) else value.replica_id)):
            assert value.flattened_range is None
            offset = tuple(value.global_offset)
            pieces.append((value.key, offset, tuple(value.global_shape), value.data.detach().clone().float()))
    return pieces


def _draw_random() -> list[float]:
    """One draw from each RNG a checkpoint restores."""
    import random

    import numpy as np
    from megatron.core.tensor_parallel import get_cuda_rng_tracker

    with get_cuda_rng_tracker().fork():
        tracker = torch.rand(2).tolist()
    return [random.random(), float(np.random.rand()), *torch.rand(2).tolist(), *tracker]


def _worker(rank: int, world_size: int, out_dir: str):
    from megatron_solopo.training import run_state as ckpt

    results: dict = {}
    # layout A: tp=1, pp=1, dp=2 -- train 2 steps, save, continue 2 steps (saving each)
    chunks, optimizer = _build(1, 1, seed=11)
    losses = [_fake_step(chunks, optimizer, s) for s in (1, 2)]
    state = ckpt.TrainState(step=2, sampler={"epoch": 0, "position": 4}, extra={"note": "a"})
    path2 = ckpt.save_checkpoint(out_dir, state, chunks, optimizer, keep_last=2, config_yaml="train: {}\n")
    results["pieces_at_2"] = _global_pieces(chunks, optimizer)
    results["random_after_save"] = _draw_random()
    for s in (3, 4):
        losses.append(_fake_step(chunks, optimizer, s))
        ckpt.save_checkpoint(out_dir, ckpt.TrainState(step=s, sampler={"epoch": 0, "position": 2 * s}),
                             chunks, optimizer, keep_last=3)
    results["losses"] = losses
    results["path2"] = str(path2)

    # same layout, fresh model (other init) and optimizer: load step 2, the next two steps repeat exactly
    chunks, optimizer = _build(1, 1, seed=99)
    loaded = ckpt.load_checkpoint(path2, chunks, optimizer)
    results["random_after_load"] = _draw_random()
    results["loaded_state"] = (loaded.step, loaded.sampler, loaded.extra)
    results["resumed_losses"] = [_fake_step(chunks, optimizer, s) for s in (3, 4)]

    # other layouts load the tp=1 checkpoint: same global weights and Adam moments
    for name, (tp, pp) in {"tp2": (2, 1), "pp2": (1, 2)}.items():
        chunks, optimizer = _build(tp, pp, seed=5)
        ckpt.load_checkpoint(path2, chunks, optimizer)
        results[f"pieces_{name}"] = _global_pieces(chunks, optimizer)
        if name == "tp2":
            results["tp2_losses"] = [_fake_step(chunks, optimizer, s) for s in (3, 4)]
    return results


def _assemble(per_rank_pieces: list[list]) -> dict[str, torch.Tensor]:
    """Global tensors from (key, offset, shape, local data) shards; checks each element is written once."""
    full: dict[str, torch.Tensor] = {}
    written: dict[str, torch.Tensor] = {}
    for pieces in per_rank_pieces:
        for key, offset, shape, data in pieces:
            if key not in full:
                full[key] = torch.full(shape, float("nan"))
                written[key] = torch.zeros(shape, dtype=torch.int)
            # stacked-layer keys have leading axes (layer index) that the local data does not carry
            lead = len(shape) - data.dim()
            index = tuple(slice(o, o + 1) for o in offset[:lead]) + tuple(
                slice(o, o + n) for o, n in zip(offset[lead:], data.shape))
            full[key][index] = data.reshape(full[key][index].shape)
            written[key][index] += 1
    for key, count in written.items():
        assert bool((count == 1).all()), f"{key}: every element must be written by exactly one main replica"
    return full


@pytest.fixture(scope="module")
def results(tmp_path_factory):
    out_dir = tmp_path_factory.mktemp("ckpt_run")
    per_rank = run_distributed(_worker, 2, str(out_dir))
    return {"ranks": per_rank, "out_dir": out_dir}


def test_resume_in_place_repeats_losses_exactly(results):
    r0 = results["ranks"][0]
    assert r0["resumed_losses"] == r0["losses"][2:]  # bitwise on CPU
    assert r0["losses"][0] != r0["losses"][2]  # the model really trains
    assert r0["loaded_state"] == (2, {"epoch": 0, "position": 4}, {"note": "a"})


def test_rng_states_are_restored_per_rank(results):
    for rank_result in results["ranks"]:
        assert rank_result["random_after_load"] == rank_result["random_after_save"]


def test_reshard_to_tp2_and_pp2_gives_the_same_global_state(results):
    ranks = results["ranks"]
    reference = _assemble([r["pieces_at_2"] for r in ranks])
    assert any(k.startswith("optimizer.state.exp_avg.") for k in reference)  # Adam moments are in it
    for layout in ("tp2", "pp2"):
        loaded = _assemble([r[f"pieces_{layout}"] for r in ranks])
        assert sorted(loaded) == sorted(reference), layout
        for key in reference:
            torch.testing.assert_close(loaded[key], reference[key], rtol=0, atol=0, msg=f"{layout}: {key}")


def test_tp2_continues_the_tp1_run(results):
    r0 = results["ranks"][0]
    torch.testing.assert_close(torch.tensor(r0["tp2_losses"]), torch.tensor(r0["losses"][2:]), rtol=1e-5, atol=1e-6)


def test_completion_marker_and_pruning(results):
    from megatron_solopo.training import run_state as ckpt

    out_dir = results["out_dir"]
    steps = [step for step, _ in ckpt.list_checkpoints(out_dir)]
    assert steps == [2, 3, 4]  # keep_last=3 at the last save
    latest = ckpt.find_latest_checkpoint(out_dir)
    assert latest.name == "step_000004"
    info = json.loads((latest / ckpt.MARKER_FILE).read_text())
    assert info["step"] == 4 and info["layout"]["dp"] == 2
    assert (out_dir / "checkpoints" / "step_000002" / "config.yaml").read_text() == "train: {}\n"
    assert not [p for p in (out_dir / "checkpoints").iterdir() if p.name.startswith(".")]  # no leftovers


def test_incomplete_checkpoints_are_ignored(tmp_path):
    from megatron_solopo.training import run_state as ckpt

    root = tmp_path / "checkpoints"
    good = root / "step_000003"
    good.mkdir(parents=True)
    (good / "metadata.json").write_text("{}")
    (good / ".metadata").write_bytes(b"index")  # resume verifies a checkpoint without manifest by these two
    ckpt.write_marker(good, ckpt.TRAINED, {"step": 3})
    # a save killed before the rename, a step_N without the marker, one without dist metadata
    (root / ".step_000009.incomplete").mkdir()
    (root / ".step_000009.incomplete" / "metadata.json").write_text("{}")
    no_marker = root / "step_000007"
    no_marker.mkdir()
    (no_marker / "metadata.json").write_text("{}")
    no_meta = root / "step_000008"
    no_meta.mkdir()
    (no_meta / ckpt.MARKER_FILE).write_text("{}")
    (root / "step_000010").write_text("a file, not a checkpoint")
    assert ckpt.find_latest_checkpoint(tmp_path) == good
    assert ckpt.find_latest_checkpoint(root) == good
    assert ckpt.resolve_resume("auto", tmp_path) == good
    assert ckpt.resolve_resume(str(tmp_path), tmp_path / "elsewhere") == good
    with pytest.raises(ckpt.CheckpointError, match="resume=none"):
        ckpt.resolve_resume("none", tmp_path)
    with pytest.raises(ckpt.CheckpointError, match="neither a complete checkpoint"):
        ckpt.resolve_resume(str(no_marker), tmp_path)
    with pytest.raises(ckpt.CheckpointError, match="interrupted while saving"):
        ckpt.read_checkpoint_info(no_marker)
    assert ckpt.resolve_resume("auto", tmp_path / "fresh") is None
    assert ckpt.resolve_resume("none", tmp_path / "fresh") is None
    os.rename(good, root / "step_000004")  # a renamed copy is still found by its own name
    assert ckpt.find_latest_checkpoint(tmp_path).name == "step_000004"


def test_prune_keeps_the_newest(tmp_path):
    from megatron_solopo.training import run_state as ckpt

    for step in (1, 5, 12, 30):
        path = tmp_path / "checkpoints" / ckpt.checkpoint_name(step)
        path.mkdir(parents=True)
        (path / "metadata.json").write_text("{}")
        (path / ckpt.MARKER_FILE).write_text("{}")
    deleted = ckpt.prune_checkpoints(tmp_path, keep_last=2)
    assert [p.name for p in deleted] == ["step_000001", "step_000005"]
    assert [s for s, _ in ckpt.list_checkpoints(tmp_path)] == [12, 30]
    with pytest.raises(ValueError, match="keep_last"):
        ckpt.prune_checkpoints(tmp_path, keep_last=0)
