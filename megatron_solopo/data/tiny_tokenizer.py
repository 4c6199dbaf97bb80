"""A tiny local tokenizer for the packaged sample data, examples and tests (no model hub access needed).

``build_tiny_tokenizer`` trains a byte-level BPE on synthetic QA text and wraps it in
``transformers.PreTrainedTokenizerFast`` with a ChatML chat template and an EOS token, so every code
path that uses a real chat model's tokenizer (chat template, EOS, special tokens) runs in tests.
"""

from __future__ import annotations

from collections.abc import Iterable
from typing import Any
from megatron_solopo.data.config import DEFAULT_PROMPT_TEMPLATE
from megatron_solopo.data.synthetic import generate_synthetic_qa

__all__ = ["CHATML_TEMPLATE", "build_tiny_tokenizer", "synthetic_corpus"]

CHATML_TEMPLATE = (
    "{% for message in messages %}<|im_start|>{{ message['role'] }}\n{{ message['content'] }}<|im_end|>\n"
    "{% endfor %}{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}")
_SPECIAL_TOKENS = ("<|endoftext|>", "<|im_start|>", "<|im_end|>", "<pad>")


def synthetic_corpus(num_items: int = 40, seed: int = 0) -> list[str]:
    """Text to train the tiny tokenizer on: synthetic questions, documents and the default prompt."""
    texts = [DEFAULT_PROMPT_TEMPLATE]
    for namespace in ("train", "eval"):
        for item in generate_synthetic_qa(num_items, seed, entity_namespace=namespace):
            texts.append(item.question)
            texts.extend(f"{d.title} {d.text}" for d in item.supporting_docs + item.distractor_docs)
    return texts


def build_tiny_tokenizer(texts: Iterable[str] | None = None, vocab_size: int = 1000,
                         model_max_length: int = 1 << 30, byte_level: bool = True) -> Any:
    """A BPE tokenizer trained on `texts` (default: synthetic QA text) with a ChatML chat template.

    EOS is ``<|im_end|>`` (the end of an assistant turn, as in SmolLM2/Qwen2.5 instruct models).
    byte_level=True encodes any text (256 byte symbols + merges, so vocab_size > 260). byte_level=False
    starts from printable ASCII plus newline (other characters become ``<unk>``), which allows
    vocabularies as small as ~110, e.g. 256 for the `tiny` model presets.
    """
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    texts = list(texts) if texts is not None else synthetic_corpus()
    specials = list(_SPECIAL_TOKENS)
    if byte_level:
        backend = Tokenizer(models.BPE())
        backend.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
        backend.decoder = decoders.ByteLevel()
        alphabet = pre_tokenizers.ByteLevel.alphabet()
    else:
        specials.append("<unk>")
        backend = Tokenizer(models.BPE(unk_token="<unk>"))
        # Metaspace keeps spaces (as "▁") so decode(encode(text)) == text for ASCII text
        backend.pre_tokenizer = pre_tokenizers.Metaspace(prepend_scheme="never")
        backend.decoder = decoders.Metaspace(prepend_scheme="never")
        alphabet = [chr(c) for c in range(33, 127)] + ["\n", "\u2581"]
    trainer = trainers.BpeTrainer(vocab_size=vocab_size, special_tokens=specials, initial_alphabet=alphabet,
                                  limit_alphabet=len(alphabet), show_progress=False)
    backend.train_from_iterator(texts, trainer=trainer)
    return PreTrainedTokenizerFast(tokenizer_object=backend, eos_token="<|im_end|>", pad_token="<pad>",
                                   bos_token="<|endoftext|>", unk_token=None if byte_level else "<unk>",
                                   chat_template=CHATML_TEMPLATE, model_max_length=model_max_length)
