"""The `train` section of an experiment config: batch sizes, optimizer, schedule, checkpoints, logging.

Values that depend on the job's shape (the data-parallel size) are checked when the run starts:
`TrainConfig.num_microbatches(dp_size)` raises when the global batch cannot be split evenly.
"""

from __future__ import annotations

import dataclasses
import importlib.util

LR_DECAYS = ("cosine", "linear", "constant")
REFERENCE_MODES = ("auto", "precomputed", "online", "none")
LAYOUTS = ("auto", "packed", "padded")
RESUME_KEYWORDS = ("none", "auto", "force")


def wandb_installed() -> bool:
    """True when the `wandb` package can be imported (it is an optional extra: pip install .[wandb])."""
    return importlib.util.find_spec("wandb") is not None


def _positive_int(name: str, value: object) -> None:
    if isinstance(value, bool) or not isinstance(value, int) or value < 1:
        raise ValueError(f"train.{name} must be a positive integer, got {value!r}")


def _non_negative_int(name: str, value: object) -> None:
    if isinstance(value, bool) or not isinstance(value, int) or value < 0:
        raise ValueError(f"train.{name} must be an integer >= 0, got {value!r}")


@dataclasses.dataclass
class TrainConfig:
    """How one training run proceeds: how long, with which batch, optimizer and schedule, where it writes.

    Batch sizes count preference pairs (one pair = the 2-4 sequences its objective needs), never
    sequences or tokens, so changing the objective or the context length keeps the step's meaning.
    """

    output_dir: str = "runs/solopo"
    """Run directory: checkpoints/ (step_000123, ...), metrics.jsonl, tensorboard/, config.yaml."""
    steps: int | None = None
    """Optimizer steps to train for. Set this or `epochs`, not both (neither = 1 epoch)."""
    epochs: int | None = None
    """Passes over the preference pairs (steps = epochs * pairs // global_batch_pairs; the last
    incomplete global batch of an epoch is dropped so every step sees the same number of pairs)."""
    global_batch_pairs: int = 8
    """Preference pairs per optimizer step, over all data-parallel ranks. The loss is the mean over
    these pairs, whatever the micro-batch size, accumulation or DP size (global normalization)."""
    micro_batch_pairs: int = 1
    """Pairs per forward/backward micro-batch on one data-parallel rank. Gradient accumulation steps
    = global_batch_pairs / (micro_batch_pairs * dp_size), which must be a whole number."""
    lr: float = 1e-6
    """Peak learning rate (reached after `warmup_steps`)."""
    min_lr: float = 0.0
    """Learning rate at the end of the decay (cosine/linear); must be <= lr."""
    warmup_steps: int = 0
    """Steps of linear warmup from 0 to `lr`."""
    lr_decay: str = "cosine"
    """Decay after warmup until the last step: cosine | linear | constant (stay at lr)."""
    weight_decay: float = 0.0
    """AdamW decoupled weight decay (not applied to norms and biases, as Megatron-Core does)."""
    adam_beta1: float = 0.9
    """AdamW first-moment decay."""
    adam_beta2: float = 0.95
    """AdamW second-moment decay (0.95 is Megatron's usual choice for LLM training)."""
    adam_eps: float = 1e-8
    """AdamW denominator epsilon."""
    clip_grad: float = 1.0
    """Clip the global gradient L2 norm (over all ranks) to this value; 0 disables clipping."""
    distributed_optimizer: bool = False
    """Megatron-Core distributed optimizer: shard the fp32 master weights and Adam states over the
    data-parallel ranks (ZeRO-1). Saves memory from dp_size >= 2 on; needs NCCL (reduce-scatter)."""
    seed: int = 1234
    """Seed for data order and every RNG (torch CPU/CUDA and Megatron's model-parallel tracker)."""
    save_every: int = 0
    """Save a checkpoint every this many steps (0 = only at the end). The final step always saves."""
    keep_last: int = 2
    """Complete checkpoints kept in output_dir/checkpoints (older ones are deleted); 0 keeps all."""
    resume: str = "auto"
    """none (start fresh; error if output_dir already holds checkpoints) | auto (continue from the
    latest complete checkpoint in output_dir/checkpoints, else start fresh) | force (as auto, but also
    when that checkpoint was trained with another objective, data, model or global batch: auto refuses
    such a resume, listing the differing keys, because it usually means a reused output_dir) | a
    checkpoint directory (refused like auto when the config differs in those keys). Schedule settings
    (lr, min_lr, warmup_steps, lr_decay, weight_decay, clip_grad, adam_*, steps, epochs) may change on
    any resume; the run logs what changed."""
    max_param_norm_growth: float = 2.0
    """Divergence guard applied after every optimizer step, before any checkpoint is written: the step
    fails (TrainingDiverged, nothing saved) when the global L2 norm of the parameters is not finite or
    grew by more than this factor in that one step (an exploding update: a sane step changes it by well
    under 1%). 0 disables the growth test (finiteness is always checked). Loss and gradients are checked
    for NaN/Inf before the optimizer step in any case."""
    log_every: int = 1
    """Write metrics (console, metrics.jsonl, TensorBoard, W&B) every this many steps."""
    diagnostics: bool = True
    """Log the training diagnostics `diag/*` (docs/training.md "Diagnostics"): the mean (per response
    token) log-prob of every scored sequence, the chosen response's short-minus-long gap, and how hard
    each loss term pushes each of those log-probs up or down. Read from the step's own log-prob sums:
    no extra model pass, a few scalars per micro-batch."""
    ra_grad_share: bool = True
    """Mode solo only (the other modes have no SoLo-RA term): at every logged step, measure how much of
    the gradient comes from the SoLo-RA term (diag/ra_grad_share = ||g_RA|| / ||g||, diag/ra_po_grad_ratio
    = ||g_RA|| / ||g_PO||, diag/grad_cos_ra_po; docs/training.md "Diagnostics"). Costs one extra forward
    and backward of the step's x_short sequences (the loss without its RA term, which reads nothing
    else) and a host-memory copy of this rank's gradient, at logged steps only; the update itself is unchanged (same gradient, same RNG
    draws) and the extra seconds are left out of step_time_s (logged as diag/extra_time_s). Skipped, with
    a warning, under fp16 loss scaling."""
    heldout_pairs: int = 0
    """Preference pairs held out of training and scored before and after it (and every `heldout_every`
    steps): the mean per-token log-prob of the chosen and rejected response on x_short and on x_long,
    averaged over these pairs (heldout/*, and before/after in run_summary.json). 0 = none. They are
    the first N pairs of `heldout_pairs_path` (null: of the training pairs), and every training pair
    with the id of one of them is left out of training (build-data names a pair by its question's id,
    so pair sets sampled on x_short and on x_long share the ids of a question)."""
    heldout_pairs_path: str | None = None
    """Pairs JSONL the held-out pairs are taken from (its first `heldout_pairs` pairs); null = the
    training pairs (data.pairs_path). Give several runs the same file to score them on the same pairs."""
    heldout_every: int = 0
    """Also score the held-out pairs every this many steps (0 = only before and after training)."""
    tensorboard: bool = False
    """Also write TensorBoard event files to output_dir/tensorboard (needs the `tensorboard` package)."""
    wandb: bool = False
    """Also log to Weights & Biases (needs `pip install wandb` and a login; project = wandb_project)."""
    wandb_project: str = "megatron-solopo"
    """W&B project name (used only when wandb is true)."""
    reference: str = "auto"
    """Where DPO/IPO/LongPO get reference log-probs: precomputed (read `reference_path`, written by
    `solopo precompute-ref`) | online (a frozen copy of the initial model scores each batch) | none
    (reference-free objectives: SimPO, ORPO) | auto (none if the objective needs no reference,
    else precomputed)."""
    reference_path: str | None = None
    """Precomputed reference log-probs file; None = `reference_logps.pt` next to the tokenized data."""
    layout: str = "auto"
    """Micro-batch layout: packed (THD rows with cu_seqlens, no padding FLOPs) | padded ([b, s] with
    padding) | auto (packed where the attention backend supports it, else padded)."""
    max_steps_per_run: int | None = None
    """Stop this process after this many steps (saving a checkpoint), even if `steps` is not reached:
    for time-limited jobs that requeue themselves with resume=auto. None = run to the end."""

    sigterm_grace_s: float = 30.0
    """On SIGTERM (what SLURM and Kubernetes send before killing a job) the run saves a checkpoint at the
    end of the current step and exits with status 75, like the stop file. If that has not happened this
    many seconds after the signal, the process stops its child processes and exits without a new
    checkpoint (status 143). Set it below the scheduler's kill delay (SLURM KillWait, Kubernetes
    terminationGracePeriodSeconds; both 30 s by default): one step plus one save must fit in it."""

    def __post_init__(self) -> None:
        self._check_lengths()
        self._check_optimizer()
        self._check_choices()

    def _check_lengths(self) -> None:
        if self.steps is not None and self.epochs is not None:
            raise ValueError(f"set one of train.steps ({self.steps}) and train.epochs ({self.epochs}), not both")
        for name in ("steps", "epochs", "max_steps_per_run"):
            if getattr(self, name) is not None:
                _positive_int(name, getattr(self, name))
        for name in ("global_batch_pairs", "micro_batch_pairs", "log_every"):
            _positive_int(name, getattr(self, name))
        for name in ("warmup_steps", "save_every", "keep_last", "seed", "heldout_pairs", "heldout_every"):
            _non_negative_int(name, getattr(self, name))
        if self.global_batch_pairs % self.micro_batch_pairs:
            raise ValueError(f"train.global_batch_pairs ({self.global_batch_pairs}) must be a multiple of "
                             f"train.micro_batch_pairs ({self.micro_batch_pairs})")
        if self.steps is not None and self.warmup_steps and self.warmup_steps >= self.steps:
            raise ValueError(f"train.warmup_steps ({self.warmup_steps}) must be shorter than the run "
                             f"(train.steps = {self.steps}); lower it")
        if not self.output_dir:
            raise ValueError("train.output_dir must name a directory")

    def _check_optimizer(self) -> None:
        if not self.lr > 0:
            raise ValueError(f"train.lr must be > 0, got {self.lr}")
        if not 0 <= self.min_lr <= self.lr:
            raise ValueError(f"train.min_lr must be in [0, train.lr = {self.lr}], got {self.min_lr}")
        for name in ("adam_beta1", "adam_beta2"):
            if not 0 <= getattr(self, name) < 1:
                raise ValueError(f"train.{name} must be in [0, 1), got {getattr(self, name)}")
        if not self.adam_eps > 0:
            raise ValueError(f"train.adam_eps must be > 0, got {self.adam_eps}")
        if self.weight_decay < 0:
            raise ValueError(f"train.weight_decay must be >= 0, got {self.weight_decay}")
        if not (self.max_param_norm_growth == 0 or self.max_param_norm_growth > 1):
            raise ValueError("train.max_param_norm_growth must be 0 (no growth test) or > 1, got "
                             f"{self.max_param_norm_growth}")
        if not self.sigterm_grace_s > 0:
            raise ValueError(f"train.sigterm_grace_s must be > 0 seconds, got {self.sigterm_grace_s}")
        if self.clip_grad < 0:
            raise ValueError(f"train.clip_grad must be >= 0 (0 disables clipping), got {self.clip_grad}")

    def _check_choices(self) -> None:
        for name, allowed in (("lr_decay", LR_DECAYS), ("reference", REFERENCE_MODES), ("layout", LAYOUTS)):
            if getattr(self, name) not in allowed:
                raise ValueError(f"train.{name}={getattr(self, name)!r} is not one of {', '.join(allowed)}")
        if not self.resume:
            raise ValueError("train.resume must be none, auto, force or a checkpoint directory (got an empty string)")
        if self.reference_path is not None and self.reference in ("none", "online"):
            raise ValueError(f"train.reference_path is set but train.reference={self.reference!r} does not read "
                             "it; set reference=precomputed (or auto) or remove reference_path")
        if self.heldout_pairs == 0 and (self.heldout_pairs_path is not None or self.heldout_every):
            raise ValueError("train.heldout_pairs_path / train.heldout_every are set but train.heldout_pairs=0 holds "
                             "no pair out; set train.heldout_pairs (e.g. 16) or remove them")
        if self.wandb and not wandb_installed():
            raise ValueError("train.wandb=true but the wandb package is not installed; "
                             "pip install wandb (or megatron_solopo[wandb]), or set train.wandb=false")

    @property
    def resume_path(self) -> str | None:
        """The explicit checkpoint directory given in `resume`, or None for none/auto."""
        return None if self.resume in RESUME_KEYWORDS else self.resume

    def num_microbatches(self, dp_size: int) -> int:
        """Micro-batches per step on each data-parallel rank (gradient accumulation steps).

        Raises ValueError naming the three numbers when global_batch_pairs is not divisible by
        micro_batch_pairs * dp_size.
        """
        per_step = self.micro_batch_pairs * dp_size
        if self.global_batch_pairs % per_step:
            raise ValueError(
                f"train.global_batch_pairs ({self.global_batch_pairs}) is not divisible by train.micro_batch_pairs "
                f"({self.micro_batch_pairs}) x data-parallel size ({dp_size}) = {per_step}; change the global "
                "batch, the micro-batch or the number of processes")
        return self.global_batch_pairs // per_step

    def total_steps(self, num_pairs: int) -> int:
        """Optimizer steps of the whole run for a dataset of `num_pairs` preference pairs."""
        if num_pairs < self.global_batch_pairs:  # whether or not train.steps is set: no step could be filled
            raise ValueError(f"the dataset has {num_pairs} preference pairs, fewer than train.global_batch_pairs "
                             f"({self.global_batch_pairs}) that one optimizer step needs: lower "
                             f"train.global_batch_pairs to at most {num_pairs} or add data")
        if self.steps is not None:
            return self.steps
        return (self.epochs or 1) * (num_pairs // self.global_batch_pairs)

    def resolve_reference(self, objective_needs_reference: bool) -> str:
        """The effective reference mode for an objective; errors when the two disagree."""
        if self.reference == "auto":
            return "precomputed" if objective_needs_reference else "none"
        if objective_needs_reference and self.reference == "none":
            raise ValueError("the objective needs reference log-probs (DPO/IPO/LongPO) but train.reference=none; "
                             "set train.reference=precomputed (after `solopo precompute-ref`) or online")
        if not objective_needs_reference and self.reference != "none":
            raise ValueError(f"train.reference={self.reference!r} but the objective is reference-free "
                             "(SimPO/ORPO); set train.reference=none or auto")
        return self.reference
