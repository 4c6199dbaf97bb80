"""Sampling (HF generate on a tiny random Llama, resume after a crash) and the whole build-data pipeline."""

import json

import pytest

from megatron_solopo.data import sampling
from megatron_solopo.data.config import DataConfig
from megatron_solopo.data.pipeline import build_data
from megatron_solopo.data.records import read_pair_records
from megatron_solopo.data.sampling import (HFBackend, SamplingRequest, SamplingSettings, SamplingStats, ScriptedBackend,
                                           sample_responses)
from megatron_solopo.data.scoring import score_response
from megatron_solopo.data.tokenization import load_tokenized_pairs


def _settings(n=3, seed=0, model_id="tiny"):
    return SamplingSettings(num_responses=n, temperature=1.0, top_p=1.0, max_new_tokens=6, seed=seed,
                            system_prompt=None, use_chat_template=True, model_id=model_id)


REQUESTS = [SamplingRequest(f"q{i}", f"Question number {i}: who wrote the book?") for i in range(3)]


@pytest.fixture(scope="module")
def hf_backend(tiny_model_dir):
    return HFBackend(tiny_model_dir, device="cpu", dtype="fp32", batch_size=4)


def test_hf_backend_batches_and_rounds(hf_backend):
    settings = _settings(n=3)
    out = hf_backend.generate(REQUESTS, settings, seed=1)
    assert [len(r) for r in out] == [3, 3, 3] and all(isinstance(t, str) for r in out for t in r)
    assert out == hf_backend.generate(REQUESTS, settings, seed=1)  # seeded: reproducible
    assert hf_backend.requests_per_call(settings) == 1  # 4 sequences per call / 3 responses
    # more responses than the batch holds: several rounds per prompt
    assert [len(r) for r in hf_backend.generate(REQUESTS[:1], _settings(n=5), seed=2)] == [5]


def test_shared_prefix_sampling_matches_generate(hf_backend):
    """Greedy decoding through the prefill-once path gives generate()'s tokens, for left-padded prompts."""
    import torch

    prompts = [hf_backend.tokenizer(f"prompt {'word ' * k}end", add_special_tokens=False)["input_ids"]
               for k in (1, 7, 3)]
    ours = hf_backend.sample_token_ids(prompts, 2, 1.0, 1.0, 8, None, greedy=True)
    input_ids, mask = hf_backend._left_pad(prompts)
    reference = hf_backend.model.generate(input_ids=input_ids, attention_mask=mask, do_sample=False, max_new_tokens=8,
                                          pad_token_id=hf_backend.pad_id,
                                          eos_token_id=hf_backend.tokenizer.eos_token_id)
    eos = hf_backend.tokenizer.eos_token_id
    for p, row in enumerate(reference[:, input_ids.shape[1]:].tolist()):
        expected = row[: row.index(eos)] if eos in row else row
        assert ours[p] == [expected, expected]  # both copies of the prompt, same greedy continuation
    assert len(set(map(len, prompts))) == 3 and torch.is_tensor(reference)


def test_in_place_decoding_matches_the_padded_path_when_rows_stop_early(varied_model_dir, monkeypatch):
    """The in-place path (unpadded prefill, finished rows dropped), with each prompt's cache shared by its
    responses or repeated per response, gives the padded path's tokens, row for row, also when some
    responses stop early; sampling restricted to the top token is greedy decoding through the same
    bookkeeping (a model whose greedy tokens vary); seeded sampling draws the same tokens either way."""
    import types

    import torch

    hf_backend = HFBackend(varied_model_dir, device="cpu", dtype="fp32", batch_size=9)

    texts = ["Who wrote The Lantern of Orsel?", "Document [1] (Title: Maren Kol) Maren Kol was born in Port Dria.",
             "In what year was the organization that employs the author of The Tide of Brask founded?"]
    prompts = [hf_backend.tokenizer(t, add_special_tokens=False)["input_ids"] for t in texts]
    assert hf_backend._cache_kwarg is not None
    free = hf_backend.sample_token_ids(prompts, 3, 1.0, 1.0, 10, None, greedy=True)
    # an 'EOS' that prompt 0 emits after >= 1 token and some other row never emits: rows stop at different steps
    eos = next(t for i, t in enumerate(free[0][0]) if i and t not in free[0][0][:i]
               and any(t not in row for rows in free[1:] for row in rows))
    monkeypatch.setattr(hf_backend, "tokenizer", types.SimpleNamespace(eos_token_id=eos))
    expected = [[row[: row.index(eos)] if eos in row else row for row in rows] for rows in free]
    assert hf_backend.share_prompt_cache  # the default: one copy of each prompt's cache for its 3 responses
    monkeypatch.setattr(sampling, "SHARED_PROMPT_MIN_TOKENS", 1)  # these prompts are short
    in_place = hf_backend.sample_token_ids(prompts, 3, 1.0, 1.0, 10, None, greedy=True)
    nucleus_of_one = hf_backend.sample_token_ids(prompts, 3, 1.0, 1e-6, 10, torch.Generator().manual_seed(0))
    sampled_shared = hf_backend.sample_token_ids(prompts, 3, 1.0, 1.0, 10, torch.Generator().manual_seed(1))
    monkeypatch.setattr(hf_backend, "share_prompt_cache", False)  # the prompt rows repeated per response
    repeated = hf_backend.sample_token_ids(prompts, 3, 1.0, 1.0, 10, None, greedy=True)
    sampled_repeated = hf_backend.sample_token_ids(prompts, 3, 1.0, 1.0, 10, torch.Generator().manual_seed(1))
    monkeypatch.setattr(hf_backend, "_cache_kwarg", None)
    padded = hf_backend.sample_token_ids(prompts, 3, 1.0, 1.0, 10, None, greedy=True)
    assert in_place == repeated == padded == nucleus_of_one == expected
    assert sampled_shared == sampled_repeated and sampled_shared != in_place  # same draws, not greedy
    assert 1 <= len(expected[0][0]) < 10 and any(len(r) == 10 for rows in expected for r in rows)


def test_calls_decoded_together_draw_what_they_draw_alone(varied_model_dir, monkeypatch, tmp_path):
    """Several generate calls in one batch (HFBackend.calls_per_batch): each call samples from its own seeded
    generator over its own rows, dropping its finished rows as it would alone, so its tokens are those of
    the call decoded alone, on the in-place path (prompt cache shared or repeated) and the padded one, with
    rows stopping early; sample_responses writes the same samples for any calls_per_batch."""
    import types

    import torch

    backend = HFBackend(varied_model_dir, device="cpu", dtype="fp32", batch_size=4)
    texts = ["Who wrote The Lantern of Orsel?", "Document [1] (Title: Maren Kol) Maren Kol was born in Port Dria.",
             "In what year was the organization that employs the author of The Tide of Brask founded?", "hi"]
    prompts = [backend.tokenizer(t, add_special_tokens=False)["input_ids"] for t in texts]
    calls = [prompts[:2], prompts[2:3], prompts[3:]]
    free = [row for c, call in enumerate(calls)
            for rows in backend.sample_token_ids(call, 3, 1.0, 1.0, 10, torch.Generator().manual_seed(10 + c))
            for row in rows]
    # an 'EOS' that some rows draw after >= 1 token and others never do: rows stop at different steps
    eos = next(t for row in free for t in row[1:] if any(t not in other for other in free))
    monkeypatch.setattr(backend, "tokenizer", types.SimpleNamespace(eos_token_id=eos))

    def alone_and_together():
        alone = [backend.sample_token_ids(call, 3, 1.0, 1.0, 10, torch.Generator().manual_seed(10 + c))
                 for c, call in enumerate(calls)]
        together = backend.sample_call_token_ids(calls, 3, 1.0, 1.0, 10,
                                                 [torch.Generator().manual_seed(10 + c) for c in range(3)])
        return alone, together

    monkeypatch.setattr(sampling, "SHARED_PROMPT_MIN_TOKENS", 1)  # the shared prompt cache
    results = [alone_and_together()]
    monkeypatch.setattr(backend, "share_prompt_cache", False)  # the prompt rows repeated per response
    results.append(alone_and_together())
    monkeypatch.setattr(backend, "_cache_kwarg", None)  # the padded path
    results.append(alone_and_together())
    for alone, together in results:
        assert together == alone
    lengths = [len(r) for call in results[0][0] for rows in call for r in rows]
    assert min(lengths) < 10 and max(lengths) == 10  # rows stopped at different steps
    assert results[0][0][0] != results[0][0][1][:2]  # the calls' draws differ

    monkeypatch.undo()
    settings = _settings(n=2)
    requests = [SamplingRequest(f"q{i}", f"Question number {i}: who wrote the book?") for i in range(5)]
    outputs = {}
    for calls_per_batch in (1, 3):
        monkeypatch.setattr(backend, "calls_per_batch", calls_per_batch)
        calls_seen = []
        outputs[calls_per_batch] = sample_responses(requests, backend, settings, tmp_path / f"s{calls_per_batch}.jsonl",
                                                    progress=False, on_call=calls_seen.append)
        assert calls_seen == [2, 2, 1]  # requests_per_call = 4 // 2, whatever the batching
    assert outputs[1] == outputs[3]
    assert (tmp_path / "s1.jsonl").read_bytes() == (tmp_path / "s3.jsonl").read_bytes()
    with pytest.raises(ValueError, match="sampling_calls_per_batch must be >= 1"):
        HFBackend(varied_model_dir, device="cpu", dtype="fp32", calls_per_batch=0)


def test_top_p_keeps_the_smallest_nucleus():
    import torch

    from megatron_solopo.data.sampling import _sample

    logits = torch.log(torch.tensor([[0.5, 0.3, 0.2]])).repeat(4000, 1)
    generator = torch.Generator().manual_seed(0)
    counts = torch.bincount(_sample(logits, 1.0, 0.6, generator), minlength=3).tolist()
    assert counts[2] == 0 and abs(counts[0] / 4000 - 0.5 / 0.8) < 0.03
    counts = torch.bincount(_sample(logits, 1.0, 0.5, generator), minlength=3).tolist()
    assert counts == [4000, 0, 0]  # 0.5 alone reaches top_p = 0.5
    counts = torch.bincount(_sample(logits, 1.0, 1.0, generator), minlength=3).tolist()
    assert abs(counts[2] / 4000 - 0.2) < 0.03


def test_sampling_resumes_after_a_crash(hf_backend, tmp_path):
    path = tmp_path / "samples.jsonl"
    calls = []
    settings = _settings()
    sample_responses(REQUESTS[:2], hf_backend, settings, path, progress=False, on_call=calls.append)
    assert calls == [1, 1]
    # simulate a crash after q0 was written and while q1 was being written
    lines = path.read_text(encoding="utf-8").splitlines()
    path.unlink()
    partial = tmp_path / "samples.jsonl.partial"
    partial.write_text(lines[0] + "\n" + lines[1][: len(lines[1]) // 2], encoding="utf-8")
    calls.clear()
    out = sample_responses(REQUESTS, hf_backend, settings, path, progress=False, on_call=calls.append)
    assert calls == [1, 1]  # q1 (torn) and q2 resampled, q0 reused
    assert out["q0"] == json.loads(lines[0])["responses"]
    assert not partial.exists()
    rows = [json.loads(line) for line in path.read_text(encoding="utf-8").splitlines()]
    assert [r["id"] for r in rows] == ["q0", "q1", "q2"]
    # everything present: nothing sampled; changed settings: everything resampled
    calls.clear()
    assert sample_responses(REQUESTS, hf_backend, settings, path, progress=False, on_call=calls.append) == out
    assert calls == []
    sample_responses(REQUESTS, hf_backend, _settings(model_id="other"), path, progress=False, on_call=calls.append)
    assert calls == [1, 1, 1]


def test_sampling_stats_count_only_what_this_call_sampled(data_tokenizer, synthetic_items, tmp_path):
    from megatron_solopo.data.tokenization import prompt_token_ids

    requests = [SamplingRequest(item.id, f"Q: {item.question}", item) for item in synthetic_items[:3]]
    settings = SamplingSettings(num_responses=4, temperature=1.0, top_p=1.0, max_new_tokens=6, seed=0,
                                system_prompt=None, use_chat_template=False, model_id="scripted")
    path, backend = tmp_path / "samples.jsonl", ScriptedBackend()
    prompt_lengths = [len(prompt_token_ids(data_tokenizer, r.prompt, None, False)) for r in requests]

    def response_tokens(out, ids):
        return sum(len(data_tokenizer(t, add_special_tokens=False)["input_ids"]) for i in ids for t in out[i])

    first = SamplingStats()
    out = sample_responses(requests[:2], backend, settings, path, progress=False, stats=first, tokenizer=data_tokenizer)
    assert (first.questions, first.prompt_tokens) == (2, sum(prompt_lengths[:2]))
    assert first.generated_tokens == response_tokens(out, [r.id for r in requests[:2]]) > 0
    second = SamplingStats()  # two of three already in samples.jsonl: only the third is counted
    out = sample_responses(requests, backend, settings, path, progress=False, stats=second, tokenizer=data_tokenizer)
    assert (second.questions, second.prompt_tokens) == (1, prompt_lengths[2])
    assert second.generated_tokens == response_tokens(out, [requests[2].id])
    third = SamplingStats()
    sample_responses(requests, backend, settings, path, progress=False, stats=third, tokenizer=data_tokenizer)
    assert third.as_dict()["sampled_questions_now"] == 0 and third.as_dict()["prompt_tokens_per_s"] == 0.0
    with pytest.raises(ValueError, match="needs the tokenizer"):
        sample_responses(requests, backend, settings, path, progress=False, stats=SamplingStats())


def _pipeline_config(tmp_path, **changes):
    base = dict(source="synthetic", synthetic_num_items=24, long_target_tokens=[800, 1200], num_responses=6,
                sampling_backend="scripted", output_dir=str(tmp_path / "out"), cache_dir=str(tmp_path / "cache"))
    return DataConfig(**{**base, **changes})


def test_build_data_end_to_end_scripted(data_tokenizer, tmp_path):
    config = _pipeline_config(tmp_path)
    summary = build_data(config, data_tokenizer, ScriptedBackend(), "scripted", progress=False)
    counts = summary["counts"]
    records = read_pair_records(config.resolved_pairs_path)  # validates every record
    assert counts["pairs_written"] == len(records) > 0
    assert counts["items_read"] == 24
    assert counts["pairs_written"] + sum(counts["pairs_dropped"].values()) == counts["sampled_questions"]
    for record in records:
        assert score_response(record["chosen"], record["answers"]).sub_em == 1.0
        assert score_response(record["rejected"], record["answers"]).sub_em == 0.0
        assert record["meta"]["long_target_tokens"] in (800, 1200)
        assert abs(record["meta"]["long_tokens"] - record["meta"]["long_target_tokens"]) <= 0.05 * 1200
        assert record["meta"]["short_tokens"] < record["meta"]["long_tokens"]
    for name in ("summary.json", "summary.png", "samples.jsonl"):
        assert (tmp_path / "out" / name).stat().st_size > 0
    assert json.loads((tmp_path / "out" / "summary.json").read_text())["counts"] == counts
    assert (tmp_path / "out" / "summary.png").read_bytes()[:4] == b"\x89PNG"
    # same config -> identical pairs (sampling is reused from samples.jsonl, contexts are seeded)
    first = (tmp_path / "out" / "pairs.jsonl").read_text()
    build_data(config, data_tokenizer, ScriptedBackend(), "scripted", progress=False)
    assert (tmp_path / "out" / "pairs.jsonl").read_text() == first
    dataset = load_tokenized_pairs(config.resolved_pairs_path, data_tokenizer, config)
    assert len(dataset) == len(records)


def test_build_data_counts_context_skips(data_tokenizer, tmp_path):
    config = _pipeline_config(tmp_path, short_max_tokens=380, synthetic_num_items=12)
    summary = build_data(config, data_tokenizer, ScriptedBackend(), "scripted", progress=False)
    skipped = summary["counts"]["context_skipped"]
    assert skipped.get("short_context_over_budget", 0) > 0
    assert summary["counts"]["sampled_questions"] == 12 - sum(skipped.values())


def test_build_data_with_hf_sampling(data_tokenizer, hf_backend, tmp_path):
    """The tiny random model almost never answers correctly: every question is dropped as no_correct."""
    config = _pipeline_config(tmp_path, synthetic_num_items=2, num_responses=2, sampling_backend="hf",
                              max_new_tokens=4, long_target_tokens=[600])
    with pytest.raises(ValueError, match=r"no preference pair: every question was dropped \(\{'no_correct': 2\}\)"):
        build_data(config, data_tokenizer, hf_backend, "tiny", progress=False)
    rows = (tmp_path / "out" / "samples.jsonl").read_text().splitlines()
    assert len(rows) == 2  # the samples survive for inspection and reuse


def test_build_data_command(tiny_model_dir, tmp_path, capsys):
    config_module = pytest.importorskip("megatron_solopo.config")
    try:
        config_module.experiment_config_class()
    except ImportError as err:
        pytest.skip(f"experiment config incomplete: {err}")
    import argparse

    from megatron_solopo.commands import data as commands

    yaml_path = tmp_path / "data.yaml"
    yaml_path.write_text(
        "data:\n  source: synthetic\n  synthetic_num_items: 10\n  num_responses: 4\n  sampling_backend: scripted\n"
        f"  sampling_model: {tiny_model_dir}\n  long_target_tokens: [700]\n"
        f"  output_dir: {tmp_path / 'out'}\n  cache_dir: {tmp_path / 'cache'}\n", encoding="utf-8")
    parser = argparse.ArgumentParser()
    commands.add_arguments(parser)
    args = parser.parse_args(["--config", str(yaml_path), "--no-progress", "data.synthetic_num_items=12"])
    assert commands.run(args) == 0
    out = capsys.readouterr().out
    assert "pairs:" in out and "from 12 questions" in out
    assert list((tmp_path / "cache").glob("tokenized-*/data.arrow"))
    from megatron_solopo.cli import main

    assert main(["build-data", "--config", str(yaml_path), "data.pair_strategy=best"]) == 2
    assert "pair_strategy" in capsys.readouterr().err
