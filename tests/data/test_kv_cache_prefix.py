"""The shared prefix (data.kv_cache.SharedPrefix): prompts that start alike prefill their common tokens once.

Prefilling the rest of each prompt against the prefix's keys/values gives the logits and caches of prefilling
each prompt whole (up to summation order), greedy eval outputs and seeded samples stay the same, the prefix
is prefilled once for many calls and only shrinks, and it is not used when too short."""

import pytest
import torch

from megatron_solopo.data.kv_cache import SharedPrefix, _layer_kv, _num_layers, cache_kwarg, prefill_each
from megatron_solopo.data.sampling import HFBackend
from megatron_solopo.eval.generation import HFGenerator

PREAMBLE = "Answer the question using the documents below. " * 12
QUESTIONS = ["Who wrote The Lantern of Orsel?", "Where was Maren Kol born?", "hi",
             "In what year was the organization that employs the author of The Tide of Brask founded?"]


@pytest.fixture(scope="module")
def model(tiny_hf_dir):
    from transformers import AutoModelForCausalLM

    return AutoModelForCausalLM.from_pretrained(tiny_hf_dir, dtype=torch.float32).eval()


@pytest.fixture(scope="module")
def prompts(tiny_tokenizer):
    ids = [tiny_tokenizer(PREAMBLE + q)["input_ids"] for q in QUESTIONS]
    preamble = len(tiny_tokenizer(PREAMBLE)["input_ids"])
    assert preamble >= 64 and len(set(map(len, ids))) == len(ids)  # long enough to share, unequal lengths
    return ids


def _cache_tensors(cache):
    return [t for layer in range(_num_layers(cache)) for t in _layer_kv(cache, layer)]


def test_prefill_with_the_shared_prefix_equals_whole_prompts(model, prompts):
    kwarg = cache_kwarg(model)
    prefix = SharedPrefix()
    with torch.no_grad():
        whole_logits, whole_cache, whole_mask = prefill_each(model, prompts, 3, kwarg)
        logits, cache, mask = prefill_each(model, prompts, 3, kwarg, prefix)
    shortest = min(map(len, prompts))
    common = next((k for k in range(shortest) if len({p[k] for p in prompts}) > 1), shortest)
    assert len(prefix.tokens) == min(common, shortest - 1) >= 64
    assert prefix.prefilled_tokens == len(prefix.tokens)
    torch.testing.assert_close(logits, whole_logits, atol=1e-5, rtol=1e-5)
    assert torch.equal(mask, whole_mask)
    for got, want in zip(_cache_tensors(cache), _cache_tensors(whole_cache), strict=True):
        torch.testing.assert_close(got, want, atol=1e-5, rtol=1e-5)
    assert not torch.equal(logits[0], logits[1])  # the prompts' own tokens matter


def test_the_prefix_is_prefilled_once_and_only_shrinks(model, prompts, tiny_tokenizer):
    kwarg = cache_kwarg(model)
    prefix = SharedPrefix(min_tokens=8)
    with torch.no_grad():
        first = prefix.prepare(model, prompts[:2], kwarg)  # two prompts may share more than all of them
        kept = list(prefix.tokens)
        assert prefix.prepare(model, prompts[:2], kwarg) == first and prefix.prefilled_tokens == first
        shorter = prefix.prepare(model, prompts, kwarg)
        assert shorter <= first and prefix.tokens == kept[:shorter] and prefix.prefilled_tokens == first
        sliced = _cache_tensors(prefix.fresh_cache())
        fresh = SharedPrefix(min_tokens=8)
        fresh.prepare(model, [prefix.tokens + [1], prefix.tokens + [2]], kwarg)
        assert fresh.tokens == prefix.tokens
        for got, want in zip(sliced, _cache_tensors(fresh.fresh_cache()), strict=True):
            torch.testing.assert_close(got, want, atol=1e-5, rtol=1e-5)  # a causal prefix's K/V do not see ahead
        # prompts that do not start with it: a new prefix of their own
        others = [tiny_tokenizer("Other words entirely " * 4 + q)["input_ids"] for q in QUESTIONS]
        assert 8 <= prefix.prepare(model, others, kwarg) < len(others[0]) and prefix.tokens == others[0][:len(prefix.tokens)]


def test_every_prompt_keeps_a_token_and_short_prefixes_are_not_shared(model, prompts):
    kwarg = cache_kwarg(model)
    prefix = SharedPrefix()
    with torch.no_grad():
        # one prompt is the others' prefix: it still prefills its last token (its next-token logits)
        assert prefix.prepare(model, [prompts[0][:80], prompts[0]], kwarg) == 79
        assert SharedPrefix().prepare(model, [prompts[0][:40], prompts[0]], kwarg) == 0  # under min_tokens
        whole, _, _ = prefill_each(model, [prompts[0][:80]], 1, kwarg)
        shared, _, _ = prefill_each(model, [prompts[0][:80]], 1, kwarg, prefix)
    torch.testing.assert_close(shared, whole, atol=1e-5, rtol=1e-5)


def test_greedy_eval_outputs_are_the_same_with_the_shared_prefix(model, prompts, tiny_tokenizer):
    eos, pad = [tiny_tokenizer.eos_token_id], tiny_tokenizer.pad_token_id
    shared = HFGenerator(model, eos, pad, 10, 3)
    whole = HFGenerator(model, eos, pad, 10, 3, share_prefix=False)
    padded = HFGenerator(model, eos, pad, 10, 3, prefill="padded")
    outputs = shared.generate(prompts)
    assert outputs == whole.generate(prompts) == padded.generate(prompts)
    assert shared.shared_prefix_tokens >= 64 and whole.shared_prefix_tokens == 0 and not padded.share_prefix
    assert len({tuple(o) for o in outputs}) == len(prompts) and all(len(o) == 10 for o in outputs)


def test_seeded_samples_are_the_same_with_the_shared_prefix(tiny_hf_dir, prompts):
    draws = {}
    for share in (True, False):
        backend = HFBackend(tiny_hf_dir, device="cpu", dtype="fp32", batch_size=6, share_prefix=share)
        generator = torch.Generator().manual_seed(3)
        draws[share] = [backend.sample_token_ids(prompts[i:i + 2], 3, 1.0, 1.0, 8, generator) for i in (0, 2)]
        if share:  # two calls, one prefill of the prefix (the second call shortens it by slicing)
            assert len(backend.prefix.tokens) >= 64
            assert len(backend.prefix.tokens) <= backend.prefix.prefilled_tokens < 2 * len(backend.prefix.tokens)
        else:
            assert backend.prefix is None
    assert draws[True] == draws[False]
    assert len({tuple(r) for call in draws[True] for rows in call for r in rows}) > 1
