"""A training run's setup: everything the step loop needs, built once by `build_run`.

    architecture, tokenizer, tokenized pairs (less the held-out ones) -> initial model (hf_model |
    checkpoint | random; not read when resuming) -> the run's Collator -> reference (precomputed table |
    frozen copy | none) -> DDP + optimizer + schedule -> sampler -> resume (weights, optimizer, sampler,
    RNG states of the checkpoint)
"""

from __future__ import annotations

import dataclasses
import pathlib
from typing import TYPE_CHECKING, Any

from megatron_solopo.checkpoint import loader
from megatron_solopo.data.pair_order import DistributedPairSampler
from megatron_solopo.objectives import needs_reference
from megatron_solopo.parallel.parallel_context import ParallelContext
from megatron_solopo.training import reference as ref, run_inputs
from megatron_solopo.training.batching import Collator, resolve_layout
from megatron_solopo.training.diagnostics import grad_share_unsupported
from megatron_solopo.training.heldout import select_heldout
from megatron_solopo.training.optim import build_training_objects
from megatron_solopo.training.resume import check_not_past_the_end
from megatron_solopo.training.run_state import check_checkpoint_space, load_checkpoint

if TYPE_CHECKING:
    from megatron_solopo.config import ExperimentConfig

__all__ = ["Run", "build_run"]


@dataclasses.dataclass
class Run:
    """Everything the step loop needs, built once by `build_run`."""

    config: ExperimentConfig
    dataset: Any
    tokenizer: Any
    preset: Any
    chunks: list
    optimizer: Any
    scheduler: Any
    sampler: Any
    collator: Collator
    """This rank's parallel context, layout, micro-batch size and padding: the same for every step."""
    total_steps: int
    train_positions: Any
    """Dataset positions that train (all but the held-out pairs); the sampler draws indices into it."""
    heldout: Any = None
    """The held-out pairs (heldout.HeldOut) or None (train.heldout_pairs = 0)."""
    reference_table: Any = None
    reference_scorer: Any = None
    start_step: int = 0
    checkpoint: str | None = None
    """The newest complete checkpoint (the one resumed from, then each one saved)."""

    def describe(self) -> str:
        """The line rank 0 prints before the first step."""
        config, preset = self.config, self.preset
        reference = ("precomputed" if self.reference_table is not None else
                     "online" if self.reference_scorer is not None else "none")
        resumed = f", resuming from {self.checkpoint} (step {self.start_step})" if self.checkpoint else ""
        return (f"SoLoPO training: {config.objective.name}/{config.objective.mode} on {len(self.dataset)} pairs, "
                f"model {preset.name} ({preset.num_parameters() / 1e6:.1f}M params, {config.model.params_dtype}), "
                f"tp={config.parallel.tp} pp={config.parallel.pp} cp={config.parallel.cp} "
                f"dp={self.collator.parallel.dp_size}, {self.total_steps} steps x {config.train.global_batch_pairs} "
                f"pairs, layout {self.collator.layout}, reference {reference}{resumed}{self._describe_diagnostics()}")

    def _describe_diagnostics(self) -> str:
        train, text = self.config.train, ""
        if self.heldout is not None:
            text += f"; {len(self.heldout.samples)} held-out pairs from {self.heldout.source}, not trained on"
        if train.ra_grad_share and self.config.objective.mode == "solo":
            why = grad_share_unsupported(self.optimizer)
            text += (f"; warning: train.ra_grad_share is skipped: {why}" if why else
                     "; RA gradient share measured at logged steps (one extra forward/backward of the x_short "
                     "sequences each)")
        return text


def _build_reference(config: ExperimentConfig, dataset, preset, collator: Collator):
    """(table, scorer): the precomputed table (verified) or the frozen online model, or neither."""
    mode = config.train.resolve_reference(needs_reference(config.objective))
    roles = ref.reference_roles(config.objective)
    if mode == "precomputed":
        path = ref.resolve_reference_path(config.train, config.data)
        table = ref.ReferenceTable.from_file(path)
        table.verify(dataset, roles, run_inputs.model_identity(config.model, preset), where=str(path))
        return table, None
    if mode == "online":
        frozen = run_inputs.build_initial_model(config.model, config.parallel, preset)
        return None, ref.ReferenceScorer(frozen, roles, collator, head=config.model.logprob_head)
    return None, None


def _split_heldout(config: ExperimentConfig, dataset, tokenizer):
    """(heldout.HeldOut | None, the dataset positions left for training): train.heldout_pairs."""
    def load_source(path: str):
        return run_inputs.load_dataset(dataclasses.replace(config.data, pairs_path=path), tokenizer)

    return select_heldout(config.train.heldout_pairs, config.train.heldout_pairs_path, dataset, load_source,
                          training_path=config.data.resolved_pairs_path)


def _total_steps(config: ExperimentConfig, train_positions, heldout) -> int:
    try:
        return config.train.total_steps(len(train_positions))
    except ValueError as err:
        held = f", less the {config.train.heldout_pairs} held-out pairs" if heldout is not None else ""
        raise ValueError(f"{err} (data.pairs_path={config.data.pairs_path}{held})") from None


def _resume(run: Run, resume_from: pathlib.Path) -> None:
    """Loads the checkpoint into the run: weights, optimizer, schedule, RNG states (same layout), sampler."""
    state = load_checkpoint(resume_from, run.chunks, run.optimizer, run.scheduler)
    run.sampler.load_state_dict(state.sampler)
    run.start_step, run.checkpoint = state.step, str(resume_from)


def build_run(config: ExperimentConfig, parallel: ParallelContext, resume_from: pathlib.Path | None) -> Run:
    """The run of `config` on this rank, resumed from `resume_from` when given (collective)."""
    train, preset = config.train, loader.resolve_preset(config.model)
    tokenizer = run_inputs.load_run_tokenizer(config.model, preset)
    dataset = run_inputs.load_dataset(config.data, tokenizer)
    heldout, train_positions = _split_heldout(config, dataset, tokenizer)
    total_steps = _total_steps(config, train_positions, heldout)
    if resume_from is not None:
        check_not_past_the_end(train, resume_from, total_steps)
    chunks = run_inputs.build_initial_model(config.model, config.parallel, preset, load_weights=resume_from is None)
    layout = resolve_layout(train.layout, run_inputs.attention_backend_of(chunks))
    collator = Collator.for_model(config.model, parallel, layout, train.micro_batch_pairs,
                                  pad_token_id=run_inputs.pad_token_id(tokenizer), vocab_size=preset.vocab_size)
    table, scorer = _build_reference(config, dataset, preset, collator)
    chunks, optimizer, scheduler = build_training_objects(chunks, train, total_steps)
    sampler = DistributedPairSampler(len(train_positions), parallel.dp_rank, parallel.dp_size, seed=train.seed)
    run = Run(config, dataset, tokenizer, preset, chunks, optimizer, scheduler, sampler, collator, total_steps,
              train_positions, heldout, reference_table=table, reference_scorer=scorer)
    loader.seed_everything(train.seed)  # after init_seed drew the weights: train's own RNG stream
    if resume_from is not None:
        _resume(run, resume_from)
    if run.start_step < total_steps:  # room for a checkpoint, before the first step (again before each save)
        check_checkpoint_space(train.output_dir, chunks, optimizer)
    return run
