"""Synthetic preference pairs of the right shapes (random tokens) for every runner."""

from __future__ import annotations

import math
from typing import Any

from megatron_solopo.bench.config import BenchConfig
from megatron_solopo.objectives import ObjectiveConfig, logps_key, required_reference_sequences, required_sequences


def pair_sequences(objective: str, mode: str, long_len: int, short_len: int) -> list[tuple[str, int]]:
    """(sequence name, tokens) for one preference pair: what the policy runs forward and backward.

    solo-X: short chosen, short rejected, long chosen; long-X: long chosen, long rejected
    (`objectives.required_sequences` decides; reference log-probs are precomputed data, no pass).
    """
    names = sorted(required_sequences(ObjectiveConfig(name=objective, mode=mode)))
    return [(name, long_len if name.startswith("long") else short_len) for name in names]


def synthetic_sample(objective: str, mode: str, long_len: int, short_len: int, response_len: int,
                     vocab_size: int, generator, sample_id: str) -> dict[str, Any]:
    """One synthetic preference pair in the tokenized-sample format of `training.batching`.

    Keys: "id"; per scored role "<role>_input_ids" (random context ids, then the response: y_w for
    chosen roles, y_l for rejected ones, identical under the short and the long context) and
    "<role>_loss_mask" (1 on the response); for DPO, "ref_<role>_logps" drawn near
    response_len * -ln(vocab), what a randomly initialized reference model would give.
    """
    import torch


    def ids(n: int) -> list[int]:
        return torch.randint(0, vocab_size, (n,), generator=generator).tolist()

    responses = {"chosen": ids(response_len), "rejected": ids(response_len)}
    sample: dict[str, Any] = {"id": sample_id}
    for role, tokens in pair_sequences(objective, mode, long_len, short_len):
        sample[f"{role}_input_ids"] = ids(tokens - response_len) + responses[role.split("_")[1]]
        sample[f"{role}_loss_mask"] = [0] * (tokens - response_len) + [1] * response_len
    typical = -response_len * math.log(vocab_size)
    for role in sorted(required_reference_sequences(ObjectiveConfig(name=objective, mode=mode))):
        sample[logps_key(role, reference=True)] = typical * (1 + 0.01 * float(torch.rand((), generator=generator)))
    return sample


def synthetic_samples(objective: str, mode: str, long_len: int, cfg: "BenchConfig", vocab_size: int) -> list[dict]:
    """`cfg.pairs_per_step` synthetic samples, seeded by (seed, long length) so every runner sees the same."""
    import torch

    gen = torch.Generator().manual_seed(cfg.seed + long_len)
    return [synthetic_sample(objective, mode, long_len, cfg.short_length, cfg.response_length, vocab_size, gen,
                             f"synthetic-{long_len}-{i}") for i in range(cfg.pairs_per_step)]

