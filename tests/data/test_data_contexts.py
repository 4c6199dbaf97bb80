"""Short/long contexts: evidence intact, long length within 5% of target, depth placement, skips."""

import random

import pytest

from megatron_solopo.data.contexts import (ContextSkip, ContextTemplates, TokenCounter, build_long_context,
                                           build_short_context, long_context_at_depth)
from megatron_solopo.data.records import Document, QAItem


def _count(tokenizer, text):
    # counted directly with the tokenizer, not through the module's cached counter
    return len(tokenizer(text, add_special_tokens=False)["input_ids"])


@pytest.fixture(scope="module")
def pool(synthetic_items):
    return [d for item in synthetic_items for d in item.distractor_docs]


def _rendered(index, doc):
    return ContextTemplates().document.format(index=index, title=doc.title, text=doc.text)


def test_short_context_holds_exactly_the_evidence(data_tokenizer, synthetic_items):
    counter = TokenCounter(data_tokenizer)
    for item in synthetic_items[:10]:
        text, num_tokens = build_short_context(item, counter, 4096, random.Random(0))
        assert num_tokens == _count(data_tokenizer, text)
        assert item.question in text
        for doc in item.supporting_docs:
            assert doc.text in text
        for doc in item.distractor_docs:
            assert doc.text not in text
        assert text.count("Document [") == len(item.supporting_docs)


@pytest.mark.parametrize("target", [600, 1000, 2500, 6000])
def test_long_context_reaches_target_and_keeps_evidence_intact(data_tokenizer, synthetic_items, pool, target):
    counter = TokenCounter(data_tokenizer)
    for item in synthetic_items[:6]:
        long = build_long_context(item, counter, target, random.Random(1), pool=pool)
        true_len = _count(data_tokenizer, long.text)
        assert long.num_tokens == true_len
        assert abs(true_len - target) <= 0.05 * target, (item.id, true_len, target)
        # every supporting document rendered whole at its reported position
        in_order = _evidence_in_order(long, item)
        rendered = {_rendered(p + 1, d) for p, d in zip(long.evidence_positions, in_order, strict=True)}
        assert all(r in long.text for r in rendered)
        assert sorted(d.text for d in _evidence_in_order(long, item)) == sorted(d.text for d in item.supporting_docs)
        assert long.text.count("Document [") == long.num_documents
        assert item.question in long.text


def _evidence_in_order(long, item):
    """The supporting docs sorted by where their text occurs in the long context."""
    return sorted(item.supporting_docs, key=lambda d: long.text.index(d.text))


def test_long_context_uses_own_distractors_before_the_pool(data_tokenizer, synthetic_items, pool):
    item = synthetic_items[0]
    long = build_long_context(item, TokenCounter(data_tokenizer), 4000, random.Random(2), pool=pool)
    assert all(d.text in long.text for d in item.distractor_docs)  # 4000 tokens need more than its own
    assert long.num_documents > len(item.supporting_docs) + len(item.distractor_docs)


def test_depth_places_the_evidence_block(data_tokenizer, synthetic_items, pool):
    item = synthetic_items[3]
    k = len(item.supporting_docs)
    at = {d: long_context_at_depth(item, data_tokenizer, 3000, d, seed=5, pool=pool) for d in (0.0, 0.25, 0.5, 1.0)}
    assert at[0.0].evidence_positions == list(range(k))
    assert at[1.0].evidence_positions == list(range(at[1.0].num_documents - k, at[1.0].num_documents))
    assert at[0.0].evidence_depths[0] == 0.0
    for depth, long in at.items():
        positions = long.evidence_positions
        assert positions == list(range(positions[0], positions[0] + k))  # contiguous block
        # the block starts after `depth` of the distractor tokens: as a share of all document tokens
        # that is depth * (1 - evidence share)
        evidence_tokens = sum(_count(data_tokenizer, d.text) for d in item.supporting_docs)
        evidence_share = evidence_tokens / long.num_tokens
        assert abs(long.evidence_depths[0] - depth * (1 - evidence_share)) < 0.05, (depth, long.evidence_depths)
        assert abs(long.num_tokens - 3000) <= 150
    assert at[0.25].evidence_depths[0] < at[0.5].evidence_depths[0] < at[1.0].evidence_depths[0]


def test_random_positions_vary_with_seed(data_tokenizer, synthetic_items, pool):
    item = synthetic_items[1]
    counter = TokenCounter(data_tokenizer)
    layouts = {tuple(build_long_context(item, counter, 2000, random.Random(s), pool=pool).evidence_positions)
               for s in range(8)}
    assert len(layouts) > 3
    same = [build_long_context(item, counter, 2000, random.Random(4), pool=pool).text for _ in range(2)]
    assert same[0] == same[1]


def _item(evidence_words, distractors=()):
    return QAItem("x", "What is it?", ["it"], [Document("E", " ".join(["evidence"] * evidence_words))],
                  [Document(f"D{i}", t) for i, t in enumerate(distractors)])


def test_skips_with_reasons(data_tokenizer):
    counter = TokenCounter(data_tokenizer)
    with pytest.raises(ContextSkip) as err:
        build_short_context(_item(400), counter, 100, random.Random(0))
    assert err.value.reason == "short_context_over_budget"
    with pytest.raises(ContextSkip) as err:
        build_long_context(_item(400), counter, 200, random.Random(0))
    assert err.value.reason == "evidence_over_long_target"
    with pytest.raises(ContextSkip) as err:
        build_long_context(_item(5, ["a short distractor"] * 3), counter, 2000, random.Random(0))
    assert err.value.reason == "not_enough_distractors"


def test_long_context_cuts_only_a_distractor(data_tokenizer):
    """One huge distractor: it is cut to fit; the evidence stays whole."""
    big = " ".join(f"word{i}" for i in range(3000))
    item = _item(20, [big])
    long = build_long_context(item, TokenCounter(data_tokenizer), 500, random.Random(0))
    assert long.truncated_distractor
    assert item.supporting_docs[0].text in long.text
    assert big not in long.text and "word0 word1" in long.text
    assert abs(_count(data_tokenizer, long.text) - 500) <= 25


def test_token_counter_accepts_a_callable():
    counter = TokenCounter(lambda text: len(text.split()))
    assert counter("a b c") == 3
