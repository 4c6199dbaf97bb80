"""Megatron-Core DistributedDataParallel, optimizer and learning-rate schedule for the SoLoPO step.

    chunks = wrap_ddp(build_model_chunks(preset, parallel, model_cfg), use_distributed_optimizer=False)
    optimizer = build_optimizer(chunks, config.train)      # or build_optimizer(chunks, lr=1e-6, clip_grad=1.0)
    scheduler = build_scheduler(optimizer, config.train, total_steps=1000)
    # all three at once: chunks, optimizer, scheduler = build_training_objects(chunks, config.train, 1000)

The optimizer and schedule settings (lr, min_lr, weight_decay, adam_beta1/2, adam_eps, clip_grad,
warmup_steps, lr_decay, distributed_optimizer) are read from the `train` section (`TrainConfig`), the
one place their defaults are written.

`wrap_ddp` sets `calculate_per_token_loss=True` on the model config: the step's loss function returns
a SUM over preference pairs and the pair count, and Megatron divides the summed gradients by the
global count (derivation in training/step.py). `build_optimizer` sets `finalize_model_grads_func`
and `grad_scale_func` on the config, as Megatron's training loop does. bf16/fp16 master weights
follow the model's own config (TransformerConfig.bf16 / fp16), so they cannot disagree.
"""

from __future__ import annotations

import dataclasses

from megatron_solopo.parallel.distributed import megatron_gloo_groups_wanted
from megatron_solopo.parallel.shim import shim_active
from megatron_solopo.training.config import LR_DECAYS, TrainConfig

__all__ = [
    "LR_DECAYS",
    "build_optimizer",
    "build_scheduler",
    "build_training_objects",
    "current_lr",
    "wrap_ddp",
]


def _model_config(chunk):
    from megatron.core.utils import get_model_config

    return get_model_config(chunk)


def wrap_ddp(model_chunks: list, *, use_distributed_optimizer: bool = TrainConfig.distributed_optimizer,
             grad_reduce_in_fp32: bool = True, overlap_grad_reduce: bool = False, bucket_size: int | None = None
             ) -> list:
    """Wraps each GPTModel chunk in Megatron-Core DistributedDataParallel (grads in `param.main_grad`).

    use_distributed_optimizer: lay the grad buffers out for the distributed optimizer (ZeRO-1;
    build_optimizer follows them; default: train.distributed_optimizer's). grad_reduce_in_fp32: keep and all-reduce grads in fp32 (bf16
    models). overlap_grad_reduce: overlap the DP reduction with the backward (GPU only: it needs CUDA
    streams). bucket_size: elements per reduction bucket (None = Megatron's default).
    """
    from megatron.core.distributed import DistributedDataParallel, DistributedDataParallelConfig


    if not model_chunks:
        raise ValueError("wrap_ddp needs at least one model chunk")
    if overlap_grad_reduce and shim_active():
        raise ValueError("overlap_grad_reduce overlaps the gradient reduction with the backward on CUDA streams; "
                         "it is not available on the CPU path, set it to False")
    ddp_config = DistributedDataParallelConfig(
        grad_reduce_in_fp32=grad_reduce_in_fp32, overlap_grad_reduce=overlap_grad_reduce,
        use_distributed_optimizer=use_distributed_optimizer, bucket_size=bucket_size,
        average_in_collective=False)  # the loss contract (step.py) needs plain sums over DP x CP
    wrapped = []
    for index, chunk in enumerate(model_chunks):
        config = _model_config(chunk)
        config.calculate_per_token_loss = True  # read by DDP at construction: no 1/(dp*cp) pre-scaling
        wrapped.append(DistributedDataParallel(config=config, ddp_config=ddp_config, module=chunk,
                                               # as Megatron's get_model: one bucket set for chunk 0 only
                                               disable_bucketing=index > 0))
    for chunk in wrapped:
        chunk.broadcast_params()  # identical replicas over DP whatever each rank loaded or drew
    return wrapped


def build_optimizer(model_chunks: list, train: TrainConfig | None = None, *,
                    use_distributed_optimizer: bool | None = None, **train_fields):
    """Megatron-Core optimizer over DDP-wrapped chunks (`get_megatron_optimizer`).

    AdamW (decoupled weight decay, not applied to norms/biases; fused TE/apex kernels when installed,
    else torch's) with train.lr / min_lr (peak and final learning rate of the schedule: build_scheduler
    reads them from here), weight_decay, adam_beta1/2, adam_eps and clip_grad (global L2-norm clipping
    over all ranks, 0 disables). train: the `train` section (None: TrainConfig's defaults); train_fields
    replace some of its fields by name (e.g. lr=1e-6), for callers without a config. The distributed
    optimizer (ZeRO-1) is used when the chunks were wrapped for it (wrap_ddp); use_distributed_optimizer,
    if given, must say the same. Precision (bf16/fp16 with fp32 master weights) follows the model
    config. Also sets config.finalize_model_grads_func and config.grad_scale_func.
    """
    from megatron.core.distributed import DistributedDataParallel, finalize_model_grads
    from megatron.core.optimizer import OptimizerConfig, get_megatron_optimizer

    if not all(isinstance(chunk, DistributedDataParallel) for chunk in model_chunks):
        raise TypeError("build_optimizer needs the chunks returned by wrap_ddp: Megatron's optimizer reads "
                        "param.main_grad, which only DistributedDataParallel fills")
    train = dataclasses.replace(train or TrainConfig(), **train_fields)  # validates the replaced fields
    distributed = model_chunks[0].ddp_config.use_distributed_optimizer
    if use_distributed_optimizer is not None and use_distributed_optimizer != distributed:
        raise ValueError(f"use_distributed_optimizer={use_distributed_optimizer} but the chunks were wrapped with "
                         f"wrap_ddp(use_distributed_optimizer={distributed}); pass the same value to both")
    config = _model_config(model_chunks[0])
    opt_config = OptimizerConfig(
        optimizer="adam", lr=train.lr, min_lr=train.min_lr, weight_decay=train.weight_decay,
        adam_beta1=train.adam_beta1, adam_beta2=train.adam_beta2, adam_eps=train.adam_eps,
        clip_grad=train.clip_grad, bf16=bool(config.bf16), fp16=bool(config.fp16), params_dtype=config.params_dtype,
        use_distributed_optimizer=distributed)
    # Megatron's gloo side groups exist only when the main backend is NCCL (initialize_parallel)
    megatron_optimizer = get_megatron_optimizer(opt_config, model_chunks,
                                                use_gloo_process_groups=megatron_gloo_groups_wanted())
    for chunk in model_chunks:
        chunk_config = _model_config(chunk)
        chunk_config.finalize_model_grads_func = finalize_model_grads
        chunk_config.grad_scale_func = megatron_optimizer.scale_loss
    return megatron_optimizer


def build_scheduler(optimizer, train: TrainConfig, total_steps: int):
    """Megatron's OptimizerParamScheduler: linear warmup 0 -> lr over train.warmup_steps, then
    train.lr_decay (cosine | linear | constant) to min_lr at `total_steps`; constant weight decay.

    lr, min_lr and weight_decay are those given to build_optimizer (Megatron's param groups carry
    max_lr/min_lr, which override the scheduler's own values, so they are read from there: one source).
    Step k (0-based) trains with lr * k / warmup_steps during warmup (Megatron's convention: the first
    warmup step has lr 0). Call `scheduler.step(1)` after each successful optimizer step (train_step does).

    Built with Megatron's `override_opt_param_scheduler=True`: when a checkpoint is loaded, only the
    step count comes from it; lr, min_lr, warmup, decay steps and style and weight decay are this
    run's (changing them on resume is how a diverged run is continued with a lower lr).
    """
    from megatron.core.optimizer_param_scheduler import OptimizerParamScheduler

    warmup_steps, decay = train.warmup_steps, train.lr_decay  # decay: checked by TrainConfig
    if total_steps < 1 or warmup_steps < 0 or warmup_steps >= total_steps:
        raise ValueError(f"need 0 <= warmup_steps ({warmup_steps}) < total_steps ({total_steps})")
    config = optimizer.config
    return OptimizerParamScheduler(
        optimizer, init_lr=0.0 if warmup_steps else config.lr, max_lr=config.lr, min_lr=config.min_lr,
        lr_warmup_steps=warmup_steps, lr_decay_steps=total_steps, lr_decay_style=decay,
        start_wd=config.weight_decay, end_wd=config.weight_decay, wd_incr_steps=total_steps,
        wd_incr_style="constant", use_checkpoint_opt_param_scheduler=False, override_opt_param_scheduler=True)


def build_training_objects(model_chunks: list, train: TrainConfig, total_steps: int, *,
                           overlap_grad_reduce: bool = False):
    """wrap_ddp + build_optimizer + build_scheduler from the `train` section; returns (chunks, optimizer,
    scheduler). overlap_grad_reduce: see wrap_ddp (GPU only)."""
    chunks = wrap_ddp(model_chunks, use_distributed_optimizer=train.distributed_optimizer,
                      overlap_grad_reduce=overlap_grad_reduce)
    megatron_optimizer = build_optimizer(chunks, train)
    scheduler = build_scheduler(megatron_optimizer, train, total_steps)
    return chunks, megatron_optimizer, scheduler


def current_lr(optimizer) -> float:
    """The learning rate the next optimizer step uses (first parameter group)."""
    value = optimizer.param_groups[0]["lr"]
    return float(value.item() if hasattr(value, "item") else value)
