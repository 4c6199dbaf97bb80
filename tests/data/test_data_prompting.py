"""Prompts a small model follows (worked examples before the question) and answer scoring that does not
reward copied passages: data.num_prompt_examples, data.max_answer_words."""

import pytest

from megatron_solopo.data.config import DataConfig
from megatron_solopo.data.contexts import WORKED_EXAMPLES, ContextTemplates, config_prompt_examples, prompt_examples
from megatron_solopo.data.pairs import PairChoice, select_pair
from megatron_solopo.data.sampling import SamplingSettings
from megatron_solopo.data.scoring import extract_final_answer, score_response
from megatron_solopo.data.tokenization import prompt_token_ids
from megatron_solopo.eval.metrics import score_prediction

COPIED = ("The mayor of the capital of Siarpuistan is Liv Stiajei, and the official language of "
          "Siarpuistan is Jathnuese.")


def test_worked_examples_use_the_prompt_templates_and_end_in_an_answer_line():
    templates = ContextTemplates(prompt="Docs:\n{documents}\nQ: {question}")
    examples = prompt_examples(2, templates)
    assert len(examples) == 2 and prompt_examples(0, templates) == ()
    for (user, assistant), example in zip(examples, WORKED_EXAMPLES):
        assert user.startswith("Docs:\n") and user.endswith(f"Q: {example.question}")
        assert all(doc.text in user for doc in example.documents)
        # the examples answer the way responses are scored: a short final answer on an "Answer:" line
        final = extract_final_answer(assistant)
        assert final and score_response(assistant, [final], max_answer_words=12).sub_em == 1.0
    with pytest.raises(ValueError, match="num_examples"):
        prompt_examples(len(WORKED_EXAMPLES) + 1, templates)


def test_examples_come_before_the_question_as_earlier_turns(data_tokenizer):
    config = DataConfig(num_prompt_examples=1)
    (user, assistant), = config_prompt_examples(config)
    ids = prompt_token_ids(data_tokenizer, "REAL QUESTION", "Be brief.", True, config_prompt_examples(config))
    text = data_tokenizer.decode(ids)
    order = [text.index(part) for part in ("Be brief.", user.split("\n")[0], "Answer: Orin Talvek", "REAL QUESTION")]
    assert order == sorted(order)
    assert text.rstrip().endswith("assistant")  # the generation prompt follows the real question
    bare = prompt_token_ids(data_tokenizer, "REAL QUESTION", "Be brief.", True)
    assert len(ids) > len(bare) and "Orin Talvek" not in data_tokenizer.decode(bare)
    plain = data_tokenizer.decode(prompt_token_ids(data_tokenizer, "REAL QUESTION", None, False,
                                                   config_prompt_examples(config)))
    assert plain.index("Answer: Orin Talvek") < plain.index("REAL QUESTION")


def test_the_examples_are_part_of_what_a_resumed_sampling_run_must_match():
    common = dict(num_responses=4, temperature=0.85, top_p=1.0, max_new_tokens=32, seed=0, system_prompt=None,
                  use_chat_template=True, model_id="m")
    with_example = SamplingSettings(**common, examples=config_prompt_examples(DataConfig(num_prompt_examples=1)))
    without = SamplingSettings(**common, examples=())
    assert with_example.key("q") != without.key("q")


def test_a_copied_passage_after_answer_is_not_a_correct_answer():
    golds = ["Liv Stiajei"]
    assert score_response(f"Answer: {COPIED}", golds).sub_em == 1.0  # no limit: the copy would count
    copied = score_response(f"Answer: {COPIED}", golds, max_answer_words=12)
    assert (copied.sub_em, copied.f1, copied.overlong, copied.no_answer) == (0.0, 0.0, True, False)
    assert score_response("So it is her.\nAnswer: Liv Stiajei", golds, max_answer_words=12).sub_em == 1.0
    assert score_prediction(f"Answer: {COPIED}", golds, "final_answer", r"answer\s*[:]\s*(.+)", 12)["sub_em"] == 0.0
    # whole_response scoring is explicitly the whole text: no limit
    assert score_prediction(COPIED, golds, "whole_response", r"answer\s*[:]\s*(.+)", 12)["sub_em"] == 1.0


def test_pairs_never_choose_a_copied_passage():
    import random

    responses = [f"Answer: {COPIED}", "Answer: Jathnuese", "It is Liv.\nAnswer: Liv Stiajei"]
    for seed in range(5):
        choice = select_pair(responses, ["Liv Stiajei"], random.Random(seed), max_answer_words=12)
        assert isinstance(choice, PairChoice) and choice.chosen == responses[2]
        assert choice.num_correct == 1


@pytest.mark.parametrize("bad, match", [({"num_prompt_examples": 3}, "num_prompt_examples"),
                                        ({"num_prompt_examples": -1}, "num_prompt_examples"),
                                        ({"max_answer_words": 0}, "max_answer_words")])
def test_bad_prompting_settings_name_the_key(bad, match):
    with pytest.raises(ValueError, match=match):
        DataConfig(**bad)
