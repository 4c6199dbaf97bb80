"""Tokenized triplets: format, response masks, EOS, length checks, the Arrow cache."""

import json
import os

import pytest
from tiny_models import build_tiny_tokenizer

from megatron_solopo.data.config import DataConfig
from megatron_solopo.data.contexts import config_prompt_examples
from megatron_solopo.data.tokenization import ROLES, load_tokenized_pairs, prompt_token_ids, tokenize_pair

RECORDS = [
    {"id": f"p{i}", "question": "Who wrote it?", "answers": ["Ann"],
     "short_context": f"Document [1] Ann wrote book {i}.\n\nQuestion: Who wrote it?",
     "long_context": f"Document [1] Filler text.\n\nDocument [2] Ann wrote book {i}.\n\nDocument [3] More filler."
                     "\n\nQuestion: Who wrote it?",
     "chosen": "Ann wrote it.\nAnswer: Ann", "rejected": "Not stated.\nAnswer: not mentioned", "meta": {}}
    for i in range(5)
]


def _config(tmp_path, **changes):
    return DataConfig(cache_dir=str(tmp_path / "cache"), **changes)


def test_sample_format_masks_and_eos(data_tokenizer, tmp_path):
    config = _config(tmp_path)
    sample = tokenize_pair(RECORDS[0], data_tokenizer, config)
    assert set(sample) == {"id"} | {f"{r}_{k}" for r in ROLES for k in ("input_ids", "loss_mask")}
    eos = data_tokenizer.eos_token_id
    for role in ROLES:
        ctx, kind = role.split("_")
        ids, mask = sample[f"{role}_input_ids"], sample[f"{role}_loss_mask"]
        assert len(ids) == len(mask) and set(mask) == {0, 1}
        # the prompt is exactly the chat template's rendering of the worked-example turns, the user turn and
        # the generation prompt
        examples = [{"role": role, "content": text} for pair in config_prompt_examples(config)
                    for role, text in zip(("user", "assistant"), pair)]
        assert len(examples) == 2 * config.num_prompt_examples == 2
        rendered = data_tokenizer.apply_chat_template(
            examples + [{"role": "user", "content": RECORDS[0][f"{ctx}_context"]}], tokenize=False,
            add_generation_prompt=True)
        prompt = data_tokenizer(rendered, add_special_tokens=False)["input_ids"]
        assert ids[:len(prompt)] == prompt and mask[:len(prompt)] == [0] * len(prompt)
        # the masked tokens are the response followed by EOS, and nothing else
        response = [t for t, m in zip(ids, mask, strict=True) if m]
        assert mask[len(prompt):] == [1] * (len(ids) - len(prompt))
        assert response[-1] == eos and ids[-1] == eos
        assert data_tokenizer.decode(response[:-1]) == RECORDS[0][kind]
    # the same response tokens under the short and the long prompt (SoLo-RA compares them)
    n = sum(sample["short_chosen_loss_mask"])
    assert sample["short_chosen_input_ids"][-n:] == sample["long_chosen_input_ids"][-n:]
    assert len(sample["long_chosen_input_ids"]) > len(sample["short_chosen_input_ids"])


def test_system_prompt_and_plain_prompts(data_tokenizer, tmp_path):
    with_system = prompt_token_ids(data_tokenizer, "hello", "Be brief.", use_chat_template=True)
    plain = prompt_token_ids(data_tokenizer, "hello", None, use_chat_template=False)
    assert data_tokenizer.decode(with_system).startswith("<|im_start|>system\nBe brief.<|im_end|>")
    assert plain == data_tokenizer("hello", add_special_tokens=True)["input_ids"]
    no_template = build_tiny_tokenizer(["hello world"] * 5, vocab_size=300)
    no_template.chat_template = None
    with pytest.raises(ValueError, match="has no chat template.*use_chat_template=false"):
        tokenize_pair(RECORDS[0], no_template, _config(tmp_path))
    sample = tokenize_pair(RECORDS[0], no_template, _config(tmp_path, use_chat_template=False))
    assert sample["short_chosen_input_ids"][-1] == no_template.eos_token_id


def test_too_long_error_or_skip(data_tokenizer, tmp_path):
    long_len = min(len(tokenize_pair(r, data_tokenizer, _config(tmp_path))["long_chosen_input_ids"]) for r in RECORDS)
    config = _config(tmp_path, max_seq_len_tokens=long_len - 1)
    with pytest.raises(ValueError, match=r"pair 'p0': long_chosen has \d+ tokens .* > max length"):
        load_tokenized_pairs(RECORDS, data_tokenizer, config)
    assert not any((tmp_path / "cache").glob("tokenized-*"))  # nothing half-built left behind
    records = [dict(RECORDS[0], long_context=RECORDS[0]["short_context"])] + RECORDS[1:]  # only p0 fits
    dataset = load_tokenized_pairs(records, data_tokenizer, _config(tmp_path, max_seq_len_tokens=long_len - 1,
                                                                      on_too_long="skip"))
    assert dataset["id"] == ["p0"]
    stats = json.loads(dataset.info.description)
    assert (stats["skipped_too_long"], stats["num_samples"]) == (4, 1)
    with pytest.raises(ValueError, match="no pair survived"):
        load_tokenized_pairs(RECORDS, data_tokenizer, _config(tmp_path, max_seq_len_tokens=10, on_too_long="skip"))


def test_model_max_length_is_the_default_limit(tmp_path):
    tokenizer = build_tiny_tokenizer(vocab_size=400, model_max_length=20)
    with pytest.raises(ValueError, match="max length 20"):
        load_tokenized_pairs(RECORDS, tokenizer, _config(tmp_path))


def test_cache_roundtrip_and_keying(data_tokenizer, tmp_path):
    path = tmp_path / "pairs.jsonl"
    path.write_text("".join(json.dumps(r) + "\n" for r in RECORDS), encoding="utf-8")
    config = _config(tmp_path)
    first = load_tokenized_pairs(path, data_tokenizer, config)
    assert len(first) == 5 and first[2]["id"] == "p2"
    assert first[0] == tokenize_pair(RECORDS[0], data_tokenizer, config)
    (cache_dir,) = (tmp_path / "cache").glob("tokenized-*")
    stamp = os.stat(cache_dir / "data.arrow").st_mtime_ns
    again = load_tokenized_pairs(path, data_tokenizer, config)
    assert os.stat(cache_dir / "data.arrow").st_mtime_ns == stamp  # loaded, not rebuilt
    assert again[4] == first[4]
    # settings unrelated to tokenization share the cache; tokenization settings, records and tokenizer do not
    load_tokenized_pairs(path, data_tokenizer, _config(tmp_path, num_responses=8))
    assert len(list((tmp_path / "cache").glob("tokenized-*"))) == 1
    load_tokenized_pairs(path, data_tokenizer, _config(tmp_path, system_prompt="Be brief."))
    load_tokenized_pairs(RECORDS[:3], data_tokenizer, config)
    load_tokenized_pairs(path, build_tiny_tokenizer(vocab_size=500), config)
    assert len(list((tmp_path / "cache").glob("tokenized-*"))) == 4
    assert not list((tmp_path / "cache").glob(".*"))  # no temporary directories left


def test_invalid_records_are_rejected_before_tokenizing(data_tokenizer, tmp_path):
    with pytest.raises(ValueError, match=r"records\[1\]: chosen == rejected"):
        load_tokenized_pairs([RECORDS[0], dict(RECORDS[1], rejected=RECORDS[1]["chosen"])], data_tokenizer,
                             _config(tmp_path))
    with pytest.raises(ValueError, match=r"records\[1\]: duplicate id 'p0'"):
        load_tokenized_pairs([RECORDS[0], RECORDS[0]], data_tokenizer, _config(tmp_path))


def test_sentencepiece_model_file(tmp_path):
    """A bare SentencePiece .model loads and tokenizes pairs with plain prompts (no chat template)."""
    spm = pytest.importorskip("sentencepiece")
    from tiny_models import synthetic_corpus

    from megatron_solopo.data.tokenization import load_tokenizer

    corpus = tmp_path / "corpus.txt"
    corpus.write_text("\n".join(synthetic_corpus(10)) + "\nAnswer: Ann\n", encoding="utf-8")
    spm.SentencePieceTrainer.train(input=str(corpus), model_prefix=str(tmp_path / "sp"), vocab_size=600,
                                   model_type="bpe", byte_fallback=True, minloglevel=2)
    tokenizer = load_tokenizer(tmp_path / "sp.model")
    assert len(tokenizer) == 600
    config = _config(tmp_path, use_chat_template=False)
    sample = tokenize_pair(RECORDS[0], tokenizer, config)
    ids, mask = sample["short_chosen_input_ids"], sample["short_chosen_loss_mask"]
    assert ids[-1] == tokenizer.eos_token_id
    assert tokenizer.decode([t for t, m in zip(ids, mask, strict=True) if m][:-1]).strip() == RECORDS[0]["chosen"]
    with pytest.raises(ValueError, match="no chat template"):
        tokenize_pair(RECORDS[0], tokenizer, _config(tmp_path))
