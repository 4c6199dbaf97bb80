"""Test fixtures: tiny random Hugging Face models (no model hub access needed).

The tiny tokenizer they pair with is package code (megatron_solopo.data.tiny_tokenizer: the packaged
sample data is built with it); tests import both from here.
"""

from __future__ import annotations

import os
from typing import Any

from megatron_solopo.data.tiny_tokenizer import CHATML_TEMPLATE, build_tiny_tokenizer, synthetic_corpus

__all__ = ["CHATML_TEMPLATE", "build_tiny_tokenizer", "build_tiny_llama", "synthetic_corpus"]


def build_tiny_llama(save_dir: str | os.PathLike, tokenizer: Any, hidden_size: int = 32, num_layers: int = 2,
                     seed: int = 0, init_std: float | None = None) -> str:
    """Saves a random tiny LlamaForCausalLM plus `tokenizer` to `save_dir` (a loadable HF directory).

    `init_std`: re-draw every weight but the norms from N(0, init_std^2) (seeded), e.g. 0.15 so that
    greedy outputs vary from token to token (transformers' 0.02 init makes a 2-layer model repeat one
    token, which would make parity checks trivial)."""
    import torch
    import transformers

    torch.manual_seed(seed)
    config = transformers.LlamaConfig(
        vocab_size=len(tokenizer), hidden_size=hidden_size, intermediate_size=2 * hidden_size,
        num_hidden_layers=num_layers, num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=4096,
        eos_token_id=tokenizer.eos_token_id, pad_token_id=tokenizer.pad_token_id, bos_token_id=tokenizer.bos_token_id,
        tie_word_embeddings=True)
    model = transformers.LlamaForCausalLM(config)
    if init_std is not None:
        generator = torch.Generator().manual_seed(seed)
        with torch.no_grad():
            for name, param in model.named_parameters():
                if "norm" not in name:
                    param.copy_(torch.randn(param.shape, generator=generator) * init_std)
    model.save_pretrained(str(save_dir))
    tokenizer.save_pretrained(str(save_dir))
    return str(save_dir)
