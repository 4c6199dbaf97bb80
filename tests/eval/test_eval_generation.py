"""Greedy generation: the forced-prefix loop on a hand-made model, HF batched vs an uncached argmax loop,
Megatron static-KV vs recompute, and HF vs Megatron on a tiny model converted by the conversion code."""

import pytest
import torch

from megatron_solopo.eval.generation import (
    HFGenerator,
    MegatronGenerator,
    batched_greedy,
    forced_prefix_greedy,
    static_kv_matches_recompute,
    truncate_at_eos,
)

VOCAB = 10
EOS = 9


def _counting_next_logits(tokens, start, end):
    """A 'model' whose argmax is (last seen token + 1) % VOCAB: outputs are derivable by hand."""
    last = tokens[:, end - 1]
    return torch.nn.functional.one_hot((last + 1) % VOCAB, VOCAB).float()


def test_forced_prefix_greedy_hand_derived():
    prompts = [[1, 2], [5, 6, 7, 8], [3]]
    out = forced_prefix_greedy(_counting_next_logits, prompts, max_new_tokens=4, eos_ids=[EOS], pad_id=0)
    # [1,2] -> 3,4,5,6 ; [5,6,7,8] -> 9 (EOS: stops) ; [3] -> 4,5,6,7
    # the longer prompt keeps its own tokens 6,7,8 although the 'model' predicts from position 1 on
    assert out == [[3, 4, 5, 6], [9], [4, 5, 6, 7]]


def test_batched_greedy_restores_order_and_cuts_at_eos():
    seen_batches = []

    def generate_batch(batch):
        seen_batches.append([len(p) for p in batch])
        return [[p[0], EOS, 7] for p in batch]  # EOS in the middle: everything from it is dropped

    prompts = [[4], [1, 1, 1], [2, 2], [3, 3, 3, 3]]
    out = batched_greedy(generate_batch, prompts, batch_size=2, eos_ids=[EOS])
    assert out == [[4], [1], [2], [3]]
    assert seen_batches == [[4, 3], [2, 1]]  # longest first
    assert truncate_at_eos([5, 6, 9, 1], [9, 6]) == [5]


# ------------------------------------------------------------------------------------------ HF
def _prompts(tokenizer):
    texts = ["Who wrote The Lantern of Orsel?", "Document [1] (Title: Maren Kol) Maren Kol was born in Port Dria.",
             "hi", "In what year was the organization that employs the author of The Tide of Brask founded?"]
    return [tokenizer(t)["input_ids"] for t in texts]


def _uncached_argmax(model, prompt, max_new_tokens, eos):
    """Reference decoding: the whole sequence through the model each step, no cache, no padding."""
    tokens = list(prompt)
    out = []
    with torch.no_grad():
        for _ in range(max_new_tokens):
            logits = model(torch.tensor([tokens])).logits[0, -1]
            token = int(logits.argmax())
            if token == eos:
                break
            out.append(token)
            tokens.append(token)
    return out


@pytest.fixture(scope="module")
def hf_generator(tiny_hf_dir, tiny_tokenizer):
    return HFGenerator.from_pretrained(tiny_hf_dir, [tiny_tokenizer.eos_token_id], tiny_tokenizer.pad_token_id,
                                       max_new_tokens=10, batch_size=4, device=torch.device("cpu"),
                                       dtype=torch.float32)


def test_hf_batched_left_padding_equals_uncached_loop(hf_generator, tiny_tokenizer):
    prompts = _prompts(tiny_tokenizer)
    batched = hf_generator.generate(prompts)
    expected = [_uncached_argmax(hf_generator.model, p, 10, tiny_tokenizer.eos_token_id) for p in prompts]
    assert batched == expected
    assert len({tuple(o) for o in batched}) == len(prompts)  # the model is not degenerate
    assert hf_generator.stats.num_prompts == 4 and hf_generator.stats.generated_tokens == sum(map(len, batched))


# ------------------------------------------------------------------------------------------ Megatron
@pytest.fixture(scope="module")
def megatron_model(tiny_hf_dir):
    from megatron_solopo.convert import load_hf_into_mcore
    from megatron_solopo.parallel.config import ParallelConfig
    from megatron_solopo.parallel.distributed import destroy_parallel

    model = load_hf_into_mcore(tiny_hf_dir, ParallelConfig())
    yield model
    destroy_parallel()  # leave no process group behind for other test modules


def test_megatron_static_kv_recompute_and_hf_agree(megatron_model, hf_generator, tiny_tokenizer):
    prompts = _prompts(tiny_tokenizer)
    eos, pad, vocab = [tiny_tokenizer.eos_token_id], tiny_tokenizer.pad_token_id, len(tiny_tokenizer)
    cached = MegatronGenerator(megatron_model, eos, pad, 10, 3, vocab, decode="static_kv")
    recomputed = MegatronGenerator(megatron_model, eos, pad, 10, 3, vocab, decode="recompute")
    assert (cached.path, recomputed.path) == ("static-kv-loop", "recompute-loop")
    auto = MegatronGenerator(megatron_model, eos, pad, 10, 3, vocab, decode="auto")
    assert auto.path == "static-kv-loop"  # the probe accepts the cache of this model's attention
    a, b = cached.generate(prompts), recomputed.generate(prompts)
    one_by_one = [MegatronGenerator(megatron_model, eos, pad, 10, 1, vocab, decode="recompute").generate([p])[0]
                  for p in prompts]
    assert a == b == one_by_one
    assert a == hf_generator.generate(prompts)  # same tokens as HF transformers on the converted weights


class _CacheIgnoringModel(torch.nn.Module):
    """Attends only to the tokens it is given: right without a cache, wrong when decoding with one."""

    def __init__(self):
        super().__init__()
        self.embed = torch.nn.Embedding(VOCAB, VOCAB)

    def forward(self, tokens, position_ids, attention_mask, inference_context=None):
        return self.embed(tokens).cumsum(dim=1)  # [b, s, V]: depends on the whole given prefix


def test_probe_rejects_a_cache_that_changes_logits():
    model = _CacheIgnoringModel()
    assert not static_kv_matches_recompute(model, VOCAB, torch.device("cpu"), 1e-3)
    assert MegatronGenerator(model, [EOS], 0, 3, 2, VOCAB, decode="auto").path == "recompute-loop"
    with pytest.raises(ValueError, match="does not reproduce full recomputation"):
        MegatronGenerator(model, [EOS], 0, 3, 2, VOCAB, decode="static_kv")
    with pytest.raises(ValueError, match="needs CUDA"):
        MegatronGenerator(model, [EOS], 0, 3, 2, VOCAB, decode="engine")
