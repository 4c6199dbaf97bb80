"""HF generation paths: unpadded per-prompt prefill + batched decoding (hf-unpadded-prefill) gives the
token ids of transformers `generate` on the left-padded batch (hf-generate) and of an uncached unpadded
argmax loop, also when rows stop early; the in-place KV cache behaves like transformers' DynamicLayer;
and, with the real default model, both paths agree on real eval prompts."""

import pytest
import torch

from megatron_solopo.data.kv_cache import reserved_cache
from megatron_solopo.eval.generation import HFGenerator

PROMPT_TEXTS = ["Who wrote The Lantern of Orsel?", "Document [1] (Title: Maren Kol) Maren Kol was born in Port Dria.",
                "hi", "In what year was the organization that employs the author of The Tide of Brask founded?",
                "Document [2] (Title: Port Dria) The mayor of Port Dria is Ilse Varga. Port Dria has a harbour."]


@pytest.fixture(scope="module")
def tiny_model(tiny_hf_dir):
    from transformers import AutoModelForCausalLM

    return AutoModelForCausalLM.from_pretrained(tiny_hf_dir, dtype=torch.float32).eval()


def _uncached_argmax(model, prompt, max_new_tokens, eos_ids):
    tokens, out = list(prompt), []
    with torch.no_grad():
        for _ in range(max_new_tokens):
            token = int(model(torch.tensor([tokens])).logits[0, -1].argmax())
            if token in eos_ids:
                break
            out.append(token)
            tokens.append(token)
    return out


@pytest.mark.parametrize("batch_size", [1, 2, 5])
def test_unpadded_prefill_equals_padded_generate_and_reference(tiny_model, tiny_tokenizer, batch_size):
    prompts = [tiny_tokenizer(t)["input_ids"] for t in PROMPT_TEXTS]
    eos, pad = [tiny_tokenizer.eos_token_id], tiny_tokenizer.pad_token_id
    fast = HFGenerator(tiny_model, eos, pad, 12, batch_size)
    old = HFGenerator(tiny_model, eos, pad, 12, batch_size, prefill="padded")
    assert (fast.path, old.path) == ("hf-unpadded-prefill", "hf-generate")
    new_ids, old_ids = fast.generate(prompts), old.generate(prompts)
    assert new_ids == old_ids == [_uncached_argmax(tiny_model, p, 12, eos) for p in prompts]
    assert len({tuple(o) for o in new_ids}) == len(prompts)  # not a degenerate model
    assert fast.stats.prompt_tokens == sum(map(len, prompts))


def test_rows_that_stop_early_leave_the_batch_without_changing_the_others(tiny_model, tiny_tokenizer):
    prompts = [tiny_tokenizer(t)["input_ids"] for t in PROMPT_TEXTS]
    pad = tiny_tokenizer.pad_token_id
    free = HFGenerator(tiny_model, [tiny_tokenizer.eos_token_id], pad, 12, 5).generate(prompts)
    # make the 3rd token of prompt 0 and the 6th of prompt 3 'EOS': those rows stop early, the others go on
    eos = [free[0][2], free[3][5]]
    fast = HFGenerator(tiny_model, eos, pad, 12, 5).generate(prompts)
    old = HFGenerator(tiny_model, eos, pad, 12, 5, prefill="padded").generate(prompts)
    assert fast == old == [_uncached_argmax(tiny_model, p, 12, eos) for p in prompts]
    assert len(fast[0]) <= 2 and len(fast[3]) <= 5 and any(len(o) == 12 for o in fast)
    assert HFGenerator(tiny_model, eos, pad, 1, 5).generate(prompts) == [o[:1] for o in old]


def test_reserved_cache_matches_dynamic_cache():
    from transformers import DynamicCache

    generator = torch.Generator().manual_seed(0)
    reserved, plain = reserved_cache(2, reserve=3), DynamicCache()
    batch = 3
    for step, length in enumerate([5, 1, 1, 1, 1, 2]):  # the 5th append outgrows the reserve: reallocation
        for layer in range(2):
            k = torch.randn(batch, 2, length, 4, generator=generator)
            v = torch.randn(batch, 2, length, 4, generator=generator)
            got, want = reserved.update(k, v, layer), plain.update(k, v, layer)
            assert torch.equal(got[0], want[0]) and torch.equal(got[1], want[1])
        if step == 2:
            index = torch.tensor([0, 2])
            reserved.batch_select_indices(index)
            plain.batch_select_indices(index)
            batch = 2
        assert reserved.get_seq_length() == plain.get_seq_length()


def test_sliding_window_models_use_generate(tiny_hf_dir):
    from transformers import AutoConfig, AutoModelForCausalLM

    config = AutoConfig.from_pretrained(tiny_hf_dir)
    model = AutoModelForCausalLM.from_config(config)
    assert HFGenerator(model, [1], 0, 4, 2).path == "hf-unpadded-prefill"
    model.config.layer_types = ["sliding_attention"] * config.num_hidden_layers
    assert HFGenerator(model, [1], 0, 4, 2).path == "hf-generate"
    with pytest.raises(ValueError, match="prefill='chunked' is not one of"):
        HFGenerator(model, [1], 0, 4, 2, prefill="chunked")


@pytest.mark.slow
@pytest.mark.real_model
def test_real_model_greedy_outputs_equal_on_eval_prompts(real_model_dirs):
    from transformers import AutoModelForCausalLM

    from megatron_solopo.data.tokenization import load_tokenizer, prompt_token_ids
    from megatron_solopo.eval.config import EvalConfig
    from megatron_solopo.eval.suites import build_suites

    hf_dir = str(real_model_dirs[0])
    tokenizer = load_tokenizer(hf_dir)
    config = EvalConfig(suites=["multihop", "short"], num_samples=2, context_lengths=[512], depths=[0.0, 1.0])
    prompts = [prompt_token_ids(tokenizer, i.prompt, None, True) for i in build_suites(config, tokenizer).items]
    model = AutoModelForCausalLM.from_pretrained(hf_dir, dtype=torch.float32).eval()
    eos, pad = [tokenizer.eos_token_id], tokenizer.pad_token_id
    new = HFGenerator(model, eos, pad, 24, 3).generate(prompts)
    old = HFGenerator(model, eos, pad, 24, 3, prefill="padded").generate(prompts)
    assert new == old
    assert sum(map(len, new)) > 24 * len(prompts) // 2  # real answers, not empty strings
