"""The baseline runner: transformers LlamaForCausalLM trained with TRL's ORPO loss or a plain ORPO step."""

from __future__ import annotations

from collections.abc import Callable, Mapping
from typing import Any

from megatron_solopo.bench.random_pairs import pair_sequences, synthetic_samples
from megatron_solopo.bench.config import BenchConfig
from megatron_solopo.bench.measure import free_memory
from megatron_solopo.objectives import ObjectiveConfig, objective_loss

BASELINE_DESCRIPTIONS = {
    "trl": "transformers LlamaForCausalLM (SDPA) + TRL ORPOTrainer.get_batch_loss_metrics (chosen and rejected "
           "concatenated into one batch, full-vocabulary logits) + torch AdamW; TRL's Trainer loop not used",
    "transformers": "transformers LlamaForCausalLM (SDPA), full-vocabulary logits, ORPO from "
                    "megatron_solopo.objectives on response log-prob sums, torch AdamW",
}


def resolve_baseline(kind: str) -> str:
    """auto -> trl when TRL's ORPO trainer imports, else transformers; trl without TRL is an error."""
    if kind in ("none", "transformers"):
        return kind
    try:
        from trl.experimental.orpo import ORPOTrainer  # noqa: F401
        have_trl = True
    except Exception:  # noqa: BLE001 - any import failure means TRL is not usable
        have_trl = False
    if kind == "trl" and not have_trl:
        raise ValueError("bench --baseline trl: trl.experimental.orpo.ORPOTrainer does not import; "
                         "pip install trl (>= 1.0), or use --baseline transformers")
    return "trl" if have_trl else "transformers"


def hf_llama_config(preset, dtype: str):
    """A transformers LlamaConfig with the preset's shape (SDPA attention)."""
    from transformers import LlamaConfig

    if preset.qkv_bias:
        raise ValueError(f"bench baseline: preset {preset.name!r} has a QKV bias (Qwen2); the transformers "
                         "baseline builds LlamaForCausalLM: pick a Llama-shaped preset")
    return LlamaConfig(
        vocab_size=preset.vocab_size, hidden_size=preset.hidden_size, intermediate_size=preset.ffn_hidden_size,
        num_hidden_layers=preset.num_layers, num_attention_heads=preset.num_attention_heads,
        num_key_value_heads=preset.num_query_groups, head_dim=preset.head_dim,
        max_position_embeddings=preset.max_position_embeddings, rms_norm_eps=preset.norm_epsilon,
        rope_theta=preset.rotary_base, tie_word_embeddings=preset.tie_embeddings, use_cache=False,
        attn_implementation="sdpa")


class HFBaselineRunner:
    """What a user would run instead: transformers LlamaForCausalLM (SDPA) + an ORPO step + AdamW.

    kind 'trl': the loss path of TRL's ORPOTrainer (`get_batch_loss_metrics`: chosen and rejected
    concatenated into one [2, L] batch, full-vocabulary logits, TRL's log-prob and odds-ratio code)
    on a trainer object built without its __init__ (no dataset, tokenizer or accelerate loop needed;
    the compute per step is TRL's). kind 'transformers': the same forward, ORPO from
    `megatron_solopo.objectives` on response log-prob sums. Both compute logits at every position,
    as these trainers do. Mode solo (ORPO only) runs SoLoPO's three sequences on this stack.
    """

    def __init__(self, preset, kind: str, grad_ckpt: bool, cfg: BenchConfig):
        import torch
        from transformers import LlamaForCausalLM

        self.preset, self.kind, self.grad_ckpt, self.cfg = preset, kind, grad_ckpt, cfg
        self.name = f"baseline-{kind}"
        self.variant_name = "gc" if grad_ckpt else "no-gc"
        torch.manual_seed(cfg.seed)
        dtype = {"bf16": torch.bfloat16, "fp16": torch.float16, "fp32": torch.float32}[cfg.dtype]
        with torch.device(cfg.device):  # initialize on the GPU: a 1.1B model's CPU init takes tens of seconds
            self.model = LlamaForCausalLM(hf_llama_config(preset, cfg.dtype)).to(dtype=dtype)
        if grad_ckpt:
            self.model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
        self.model.train()
        self.optimizer = torch.optim.AdamW(self.model.parameters(), lr=1e-6, weight_decay=0.0)
        self.trl_trainer = _trl_orpo_trainer(cfg.device) if kind == "trl" else None

    def make_step(self, objective: str, mode: str, long_len: int) -> Callable[[], None]:
        import torch

        if objective != "orpo":
            raise ValueError(f"bench baseline runs ORPO only, not {objective!r}")
        samples = synthetic_samples(objective, mode, long_len, self.cfg, self.preset.vocab_size)
        roles = [role for role, _ in pair_sequences(objective, mode, long_len, self.cfg.short_length)]
        seqs = {role: torch.tensor([s[f"{role}_input_ids"] for s in samples], device=self.cfg.device)
                for role in roles}  # [pairs, tokens] per role
        response = self.cfg.response_length

        def step() -> None:
            if mode == "long" and self.trl_trainer is not None:
                loss = _trl_orpo_loss(self.trl_trainer, self.model, seqs["long_chosen"], seqs["long_rejected"],
                                      response)
            else:
                loss = _hf_orpo_loss(self.model, seqs, mode, response)
            loss.backward()
            self.optimizer.step()
            self.optimizer.zero_grad(set_to_none=True)

        return step

    def recover(self) -> None:
        self.optimizer.zero_grad(set_to_none=True)

    def close(self) -> None:
        self.model = self.optimizer = self.trl_trainer = None
        free_memory(self.cfg.device)


def _response_logps(model, input_ids, response_tokens: int):
    """[b] sums of log p(token) over the last `response_tokens` tokens, from full-vocabulary logits."""
    import torch

    logits = model(input_ids=input_ids, use_cache=False).logits  # [b, s, V]
    targets = input_ids[:, -response_tokens:]  # [b, R]
    # position t predicts token t+1: the response's R tokens are predicted from positions s-R-1 .. s-2
    pred = logits[:, -response_tokens - 1:-1, :].float()
    return torch.gather(pred.log_softmax(-1), 2, targets.unsqueeze(-1)).squeeze(-1).sum(-1)


def _hf_orpo_loss(model, seqs: Mapping[str, Any], mode: str, response_tokens: int):
    """Mean ORPO (mode long) or SoLo-ORPO (mode solo) loss over the batch, objectives room formulas."""
    import torch


    stats = {}
    context = "long" if mode == "long" else "short"
    pair = torch.cat([seqs[f"{context}_chosen"], seqs[f"{context}_rejected"]])  # [2b, s] like TRL
    b = seqs[f"{context}_chosen"].shape[0]
    logps = _response_logps(model, pair, response_tokens)
    stats[f"{context}_chosen_logps"], stats[f"{context}_rejected_logps"] = logps[:b], logps[b:]
    if mode == "solo":
        stats["long_chosen_logps"] = _response_logps(model, seqs["long_chosen"], response_tokens)
    counts = torch.full((b,), float(response_tokens), device=logps.device)
    stats["chosen_tokens"] = stats["rejected_tokens"] = counts
    loss, _ = objective_loss(ObjectiveConfig(name="orpo", mode=mode), stats, reduction="mean")
    return loss


def _trl_orpo_trainer(device: str):
    """TRL's ORPOTrainer object without its __init__: its loss methods need only these attributes."""
    import types

    from trl.experimental.orpo import ORPOTrainer

    trainer = ORPOTrainer.__new__(ORPOTrainer)
    trainer.beta = 0.1  # ORPO's lambda (TRL's default)
    trainer.is_encoder_decoder = False
    trainer.padding_value = 0
    trainer.aux_loss_enabled = False
    trainer.accelerator = types.SimpleNamespace(device=device, gather_for_metrics=lambda x: x)
    return trainer


def _trl_orpo_loss(trainer, model, chosen_ids, rejected_ids, response_tokens: int):
    """TRL ORPOTrainer.get_batch_loss_metrics on pre-tokenized chosen/rejected rows ([b, L] each)."""
    import torch

    def side(ids):
        labels = ids.clone()
        labels[:, :-response_tokens] = -100  # TRL masks the prompt in the labels
        return {"input_ids": ids, "attention_mask": torch.ones_like(ids), "labels": labels}

    batch = {f"{name}_{key}": value for name, ids in (("chosen", chosen_ids), ("rejected", rejected_ids))
             for key, value in side(ids).items()}
    loss, _metrics = trainer.get_batch_loss_metrics(model, batch, train_eval="train")
    return loss
