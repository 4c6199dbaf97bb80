"""Sampling N responses per context with the base model: HF transformers, vLLM, or scripted.

Resumable: each finished question is appended (and fsynced) to ``samples.jsonl.partial``; a restart
skips the ids already there whose sampling settings and prompt are unchanged, so a crash loses at
most the batch in flight. When every question is done the file is rewritten as ``samples.jsonl``
(atomically) and the partial file removed. A progress bar (tqdm, with ETA) counts questions.
"""

from __future__ import annotations

import contextlib
import dataclasses
import hashlib
import itertools
import json
import logging
import os
import pathlib
import random
from collections.abc import Callable, Sequence
from typing import Any, Protocol

from megatron_solopo.data.kv_cache import (SharedPrefix, SharedPrompts, cache_kwarg, full_attention_only, last_logits,
                                           prefill_each, reserved_cache, row_mask, select_rows,
                                           shared_prompt_decoding)
from megatron_solopo.data.records import QAItem, atomic_write
from megatron_solopo.data.synthetic import scripted_responses
from megatron_solopo.data.tokenization import prompt_token_ids
from megatron_solopo.model.hf.loading import check_hf_model
from megatron_solopo.parallel.device import setting_device

__all__ = ["SamplingRequest", "SamplingSettings", "SamplingStats", "ResponseBackend", "HFBackend", "VLLMBackend",
           "ScriptedBackend", "make_backend", "vllm_available", "sample_responses"]

logger = logging.getLogger(__name__)


@dataclasses.dataclass(frozen=True)
class SamplingRequest:
    """One question to sample for: its id, the user prompt, and the item (for the scripted backend)."""

    id: str
    prompt: str
    item: QAItem | None = None


@dataclasses.dataclass(frozen=True)
class SamplingSettings:
    """What changes the samples; hashed so a resumed run reuses only matching samples."""

    num_responses: int
    temperature: float
    top_p: float
    max_new_tokens: int
    seed: int
    system_prompt: str | None
    use_chat_template: bool
    model_id: str
    """What sampled (model directory or backend name), recorded and hashed."""
    examples: tuple[tuple[str, str], ...] = ()
    """Worked-example turns before each prompt (data.contexts.config_prompt_examples)."""

    def key(self, prompt: str) -> str:
        blob = json.dumps([dataclasses.asdict(self), prompt], sort_keys=True, ensure_ascii=False)
        return hashlib.sha256(blob.encode()).hexdigest()[:20]


@dataclasses.dataclass
class SamplingStats:
    """What one `sample_responses` call sampled (questions already cached are not counted) and the
    wall seconds of its backend calls. Prompt tokens count each prompt once (it is prefilled once);
    generated tokens are the responses re-tokenized (the decoded text, stripped; EOS not counted)."""

    questions: int = 0
    prompt_tokens: int = 0
    generated_tokens: int = 0
    seconds: float = 0.0

    def add(self, tokenizer: Any, requests: Sequence[SamplingRequest], outputs: Sequence[Sequence[str]],
            settings: SamplingSettings, seconds: float) -> None:
        """Counts one backend call: its questions, their prompt and response tokens, its seconds."""
        self.questions += len(requests)
        self.seconds += seconds
        for request, responses in zip(requests, outputs, strict=True):
            self.prompt_tokens += len(prompt_token_ids(tokenizer, request.prompt, settings.system_prompt,
                                                       settings.use_chat_template, settings.examples))
            self.generated_tokens += sum(len(tokenizer(r, add_special_tokens=False)["input_ids"]) for r in responses)

    def as_dict(self) -> dict[str, float]:
        seconds = max(self.seconds, 1e-9)
        return {"sampled_questions_now": self.questions, "prompt_tokens": self.prompt_tokens,
                "generated_tokens": self.generated_tokens, "sampling_backend_s": round(self.seconds, 2),
                "prompt_tokens_per_s": round(self.prompt_tokens / seconds, 1) if self.questions else 0.0,
                "generated_tokens_per_s": round(self.generated_tokens / seconds, 2) if self.questions else 0.0}


class ResponseBackend(Protocol):
    """Generates `settings.num_responses` responses for each request, in request order."""

    def generate(self, requests: Sequence[SamplingRequest], settings: SamplingSettings, seed: int) -> list[list[str]]:
        ...

    def requests_per_call(self, settings: SamplingSettings) -> int:
        ...


# ------------------------------------------------------------------------------------------ HF
def left_pad(ids: Sequence[Sequence[int]], pad_id: int) -> tuple[Any, Any]:
    """[n, width] input ids and attention mask, each prompt right-aligned (left padding), so that
    tokens generated for every prompt line up in the same columns."""
    import torch

    width = max(len(x) for x in ids)
    input_ids = torch.full((len(ids), width), pad_id, dtype=torch.long)
    mask = torch.zeros((len(ids), width), dtype=torch.long)
    for row, seq in enumerate(ids):
        input_ids[row, width - len(seq):] = torch.tensor(list(seq), dtype=torch.long)
        mask[row, width - len(seq):] = 1
    return input_ids, mask


def _torch_dtype(name: str, device: str) -> Any:
    import torch

    if name == "auto":
        return torch.bfloat16 if device.startswith("cuda") else torch.float32
    return {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}[name]


SHARED_PROMPT_MIN_TOKENS = 512
"""Shorter prompts keep one cache copy per response: the shared-prompt attention's extra softmax join costs
more than the copies save there. Measured on the 2-core CPU, 8 responses, 48 new tokens (default model,
benchmarks/sampling_prompt_cache_bench.py): ~1050-token prompts 1.15x faster shared, ~190-token prompts
0.93x."""


class HFBackend:
    """Batched sampling with a Hugging Face causal LM, on CPU or GPU.

    Each prompt is prefilled once, alone and unpadded (data.kv_cache), and its KV cache serves all its
    responses (one shared copy for prompts of >= SHARED_PROMPT_MIN_TOKENS, else one copy each), instead of
    `generate(num_return_sequences=n)`, which prefills every copy: with
    n = 32 responses on ~1K-token prompts the prefill is most of the work. Decoding appends to the
    cache in place (transformers' DynamicLayer copies the whole cache every step: ~55% of a CPU
    step at 2K tokens x 8 responses). Models with sliding-window or hybrid layers take a left-padded
    path with transformers' own cache. Sampling is plain temperature + top-p (the paper's setting),
    independent of the model's generation_config.
    """

    def __init__(self, model_dir: str, device: str = "auto", dtype: str = "auto", batch_size: int = 32,
                 tokenizer: Any = None, share_prompt_cache: bool = True, share_prefix: bool = True,
                 calls_per_batch: int = 1) -> None:
        import inspect

        import transformers



        device = str(setting_device(device, "data.sampling_device"))
        self.device = device
        self.batch_size = batch_size
        if calls_per_batch < 1:
            raise ValueError(f"data.sampling_calls_per_batch must be >= 1, got {calls_per_batch}")
        self.calls_per_batch = calls_per_batch
        """Generate calls decoded together (`generate_calls`); each draws from its own seeded generator."""
        self.tokenizer = tokenizer or transformers.AutoTokenizer.from_pretrained(model_dir)
        check_hf_model(model_dir)  # tensors and config.json agree, from the headers: a one-line error otherwise
        self.model = transformers.AutoModelForCausalLM.from_pretrained(
            model_dir, dtype=_torch_dtype(dtype, device)).to(device).eval()
        if self.tokenizer.eos_token_id is None:
            raise ValueError(f"tokenizer of {model_dir} has no eos_token: sampling could not stop")
        pad = self.tokenizer.pad_token_id
        self.pad_id = pad if pad is not None else self.tokenizer.eos_token_id
        params = inspect.signature(self.model.forward).parameters
        # only the last position's logits are needed: a [prompts, length, vocab] tensor can be GBs
        self._last_logits_kw = next(({k: 1} for k in ("logits_to_keep", "num_logits_to_keep") if k in params), {})
        kwarg = cache_kwarg(self.model)
        self._cache_kwarg = kwarg if kwarg is not None and full_attention_only(self.model.config) else None
        """Forward argument for the cache when the in-place decoding path applies (else None: padded path)."""
        self.share_prompt_cache = share_prompt_cache
        """In-place path, several responses: one copy of a prompt's keys/values for all its responses (False:
        one copy per response, the earlier scheme; same tokens up to floating-point summation order)."""
        self.prefix = SharedPrefix() if share_prefix and self._cache_kwarg is not None else None
        """In-place path: the tokens the prompts sampled so far all start with (chat template, system prompt,
        worked example, instruction), prefilled once for all calls (`kv_cache.SharedPrefix`; None: off)."""

    def requests_per_call(self, settings: SamplingSettings) -> int:
        return max(1, self.batch_size // settings.num_responses)

    def _left_pad(self, ids: list[list[int]]) -> tuple[Any, Any]:
        input_ids, mask = left_pad(ids, self.pad_id)
        return input_ids.to(self.device), mask.to(self.device)

    def sample_token_ids(self, prompts: list[list[int]], num_responses: int, temperature: float, top_p: float,
                         max_new_tokens: int, generator: Any, greedy: bool = False) -> list[list[list[int]]]:
        """Token ids of `num_responses` continuations per prompt (EOS excluded), [prompt][response][token]."""
        return self.sample_call_token_ids([prompts], num_responses, temperature, top_p, max_new_tokens, [generator],
                                          greedy)[0]

    def sample_call_token_ids(self, calls: list[list[list[int]]], num_responses: int, temperature: float,
                              top_p: float, max_new_tokens: int, generators: list[Any],
                              greedy: bool = False) -> list[list[list[list[int]]]]:
        """`sample_token_ids` for several calls' prompts decoded in one batch, [call][prompt][response][token].
        Call c draws its tokens from generators[c] over its own rows, dropping its finished rows when it
        would alone (`_CallDraws`): its tokens are those of sampling it alone, up to floating-point summation
        order in the batched matmuls."""
        import torch

        prompts = [prompt for call in calls for prompt in call]
        call_of_row = [c for c, call in enumerate(calls) for _ in range(len(call) * num_responses)]
        draws = _CallDraws(call_of_row, generators, lambda logits, generator: self._next_tokens(
            logits, temperature, top_p, generator, greedy))
        with torch.no_grad():
            if self._cache_kwarg is None:
                rows = self._decode_padded(prompts, num_responses, max_new_tokens, draws)
            else:
                rows = self._decode_in_place(prompts, num_responses, max_new_tokens, draws)
        by_prompt = [rows[p * num_responses:(p + 1) * num_responses] for p in range(len(prompts))]
        bounds = [0, *itertools.accumulate(len(call) for call in calls)]
        return [by_prompt[start:end] for start, end in zip(bounds, bounds[1:])]

    def _next_tokens(self, logits: Any, temperature: float, top_p: float, generator: Any, greedy: bool) -> Any:
        return logits.argmax(-1) if greedy else _sample(logits, temperature, top_p, generator)

    def _decode_in_place(self, prompts: list[list[int]], num_responses: int, max_new_tokens: int,
                         draws: _CallDraws) -> list[list[int]]:
        """Prompts prefilled one by one (data.kv_cache), then decoded with in-place cache appends; finished
        rows leave the batch (`_CallDraws.rows_to_keep`: dropping rows copies the cache, about the cost of
        one step). Rows are prompt-major. With `share_prompt_cache` and several responses per prompt,
        each prompt's keys/values are kept once for all its responses (`kv_cache.SharedPrompts`: a decoding
        step reads them once per prompt, not once per response); otherwise the prompt rows are repeated."""
        import torch

        eos = self.tokenizer.eos_token_id
        share = self.share_prompt_cache and num_responses > 1 and max(map(len, prompts)) >= SHARED_PROMPT_MIN_TOKENS
        logits, cache, mask = prefill_each(self.model, prompts, 0 if share else max_new_tokens, self._cache_kwarg,
                                           self.prefix)
        repeat = torch.arange(len(prompts), device=self.device).repeat_interleave(num_responses)
        logits = logits[repeat]
        if share:
            shared = SharedPrompts.from_cache(cache, mask, num_responses)
            cache = reserved_cache(len(shared.keys), max_new_tokens)  # each row's own generated tokens only
        else:
            shared = None
            cache.batch_select_indices(repeat)  # [P, ...] -> [P * n, ...]
            mask = mask[repeat]
        positions = torch.tensor([len(p) for p in prompts], device=self.device)[repeat]  # of the next fed token
        generated: list[list[int]] = [[] for _ in range(len(repeat))]
        present = list(range(len(repeat)))  # output row of each cache row
        done = [False] * len(repeat)
        decoding = shared_prompt_decoding(self.model, shared) if share else contextlib.nullcontext()
        with decoding:
            for step in range(max_new_tokens):
                tokens = draws.draw(logits, present)
                for row, token in zip(present, tokens):
                    if not done[row]:
                        done[row] = token == eos
                        if not done[row]:
                            generated[row].append(token)
                if step == max_new_tokens - 1 or all(done[row] for row in present):
                    break
                keep = draws.rows_to_keep(present, done)
                if len(keep) < len(present):
                    if share:
                        if cache.get_seq_length() > 0:  # nothing generated is cached before the first step
                            cache.batch_select_indices(torch.tensor(keep, dtype=torch.long, device=self.device))
                        shared.keep_rows(keep)
                    else:
                        mask = select_rows(cache, mask, keep, len(present))
                    positions = positions[torch.tensor(keep, device=self.device)]
                    tokens = [tokens[i] for i in keep]
                    present = [present[i] for i in keep]
                fed = torch.tensor(tokens, device=self.device)[:, None]
                fed = torch.where(torch.tensor([done[r] for r in present], device=self.device)[:, None], self.pad_id,
                                  fed)
                if share:
                    step_mask = row_mask(len(present), self.device)
                else:
                    mask = step_mask = torch.cat([mask, mask.new_ones(len(present), 1)], dim=1)
                logits = last_logits(self.model, fed, cache, self._cache_kwarg, attention_mask=step_mask,
                                     position_ids=(positions + step)[:, None])
        return generated

    def _decode_padded(self, prompts: list[list[int]], num_responses: int, max_new_tokens: int,
                       draws: _CallDraws) -> list[list[int]]:
        """Left-padded prefill with a mask and transformers' own cache: for models without
        `logits_to_keep` or with sliding-window/hybrid layers. Rows are prompt-major and stay in the batch."""
        import torch

        input_ids, mask = self._left_pad(prompts)  # [P, L]
        position_ids = (mask.cumsum(-1) - 1).clamp(min=0)
        eos = self.tokenizer.eos_token_id
        out = self.model(input_ids=input_ids, attention_mask=mask, position_ids=position_ids, use_cache=True,
                         **self._last_logits_kw)
        cache = out.past_key_values
        cache.batch_repeat_interleave(num_responses)  # [P, ...] -> [P * n, ...], prompt-major
        logits = out.logits[:, -1, :].float().repeat_interleave(num_responses, dim=0)  # [P * n, V]
        mask = mask.repeat_interleave(num_responses, dim=0)
        next_pos = position_ids[:, -1:].repeat_interleave(num_responses, dim=0) + 1  # [P * n, 1]
        rows = list(range(logits.shape[0]))
        finished = [False] * len(rows)
        steps = []
        for _ in range(max_new_tokens):
            token = [self.pad_id if done else t for t, done in zip(draws.draw(logits, rows, finished), finished)]
            steps.append(token)
            finished = [done or t == eos for t, done in zip(token, finished)]
            if all(finished):
                break
            mask = torch.cat([mask, torch.ones_like(mask[:, :1])], dim=1)
            fed = torch.tensor(token, device=logits.device)[:, None]
            out = self.model(input_ids=fed, attention_mask=mask, position_ids=next_pos, past_key_values=cache,
                             use_cache=True)
            cache, logits = out.past_key_values, out.logits[:, -1, :].float()
            next_pos = next_pos + 1
        tokens = [list(column) for column in zip(*steps)]  # [P * n, steps]
        return [seq[: seq.index(eos)] if eos in seq else seq for seq in tokens]

    def generate(self, requests: Sequence[SamplingRequest], settings: SamplingSettings, seed: int) -> list[list[str]]:
        return self.generate_calls([requests], settings, [seed])[0]

    def generate_calls(self, calls: Sequence[Sequence[SamplingRequest]], settings: SamplingSettings,
                       seeds: Sequence[int]) -> list[list[list[str]]]:
        """`generate` for several calls at once, decoded in one batch ([call][request][response]); call c's
        responses come from its own generator seeded with seeds[c], as if it were generated alone."""
        import torch

        prompts = [[prompt_token_ids(self.tokenizer, r.prompt, settings.system_prompt, settings.use_chat_template,
                                     settings.examples) for r in call] for call in calls]
        generators = []
        for seed in seeds:
            generator = torch.Generator(device=self.device)
            generator.manual_seed(seed)
            generators.append(generator)
        out: list[list[list[str]]] = [[[] for _ in call] for call in calls]
        # more responses than fit in one batch: several rounds per prompt
        per_round = min(settings.num_responses, self.batch_size)
        while len(out[0][0]) < settings.num_responses:
            n = min(per_round, settings.num_responses - len(out[0][0]))
            ids = self.sample_call_token_ids(prompts, n, settings.temperature, settings.top_p,
                                             settings.max_new_tokens, generators)
            for call_out, call_ids in zip(out, ids, strict=True):
                for responses, prompt_ids in zip(call_out, call_ids, strict=True):
                    responses.extend(t.strip() for t in self.tokenizer.batch_decode(prompt_ids,
                                                                                     skip_special_tokens=True))
        return out


class _CallDraws:
    """Which generate call each decoding row belongs to, and how each call draws its tokens: from its own
    generator, over its own rows in the batch, dropping its finished rows when it would alone. So a call's
    samples do not depend on the other calls decoded beside it (`HFBackend.calls_per_batch`)."""

    def __init__(self, call_of_row: list[int], generators: list[Any], next_tokens: Callable[[Any, Any], Any]) -> None:
        self.call_of_row = call_of_row
        self.generators = generators
        self.next_tokens = next_tokens
        """(logits [rows, V], generator) -> token ids [rows]: greedy or sampled (HFBackend._next_tokens)."""

    def _rows_by_call(self, present: list[int]) -> list[list[int]]:
        """Per call, the indices into `present` of its rows."""
        index: list[list[int]] = [[] for _ in self.generators]
        for i, row in enumerate(present):
            index[self.call_of_row[row]].append(i)
        return index

    def draw(self, logits: Any, present: list[int], finished: list[bool] | None = None) -> list[int]:
        """The next token of every row in `present` (logits row i is present[i]); a call whose rows are all
        `finished` draws nothing (its rows get 0)."""
        tokens = [0] * len(present)
        for index, generator in zip(self._rows_by_call(present), self.generators, strict=True):
            if index and not (finished is not None and all(finished[present[i]] for i in index)):
                for i, token in zip(index, self.next_tokens(logits[index], generator).tolist(), strict=True):
                    tokens[i] = token
        return tokens

    def rows_to_keep(self, present: list[int], done: list[bool]) -> list[int]:
        """Indices into `present` of the rows that stay: a call drops its finished rows once they are a
        quarter of its rows in the batch (all of them when it is finished)."""
        keep = []
        for index in self._rows_by_call(present):
            finished = sum(done[present[i]] for i in index)
            keep += [i for i in index if not done[present[i]]] if finished * 4 >= len(index) else index
        return sorted(keep)


def _sample(logits: Any, temperature: float, top_p: float, generator: Any) -> Any:
    """One token per row from softmax(logits / temperature), restricted to the top-p nucleus."""
    import torch

    probs = torch.softmax(logits / temperature, dim=-1)  # [B, V]
    if top_p < 1.0:
        sorted_probs, order = probs.sort(dim=-1, descending=True)
        # drop a token when the tokens ranked above it already hold top_p of the mass (the top one stays):
        # the smallest set whose mass reaches top_p, as in transformers' TopPLogitsWarper
        drop = sorted_probs.cumsum(-1) - sorted_probs >= top_p
        sorted_probs = sorted_probs.masked_fill(drop, 0.0)
        probs = torch.zeros_like(probs).scatter(-1, order, sorted_probs)
    return torch.multinomial(probs, 1, generator=generator).squeeze(-1)


# ------------------------------------------------------------------------------------------ vLLM
def vllm_available() -> bool:
    """vLLM importable and a CUDA device present."""
    try:
        import torch
        import vllm  # noqa: F401
    except ImportError:
        return False
    return torch.cuda.is_available()


class VLLMBackend:
    """Sampling with vLLM (GPU): n responses per prompt in one request, prompts as token ids."""

    def __init__(self, model_dir: str, dtype: str = "auto", tokenizer: Any = None, batch_size: int = 32) -> None:
        import transformers
        import vllm

        self.tokenizer = tokenizer or transformers.AutoTokenizer.from_pretrained(model_dir)
        vllm_dtype = {"auto": "auto", "fp32": "float32", "bf16": "bfloat16", "fp16": "float16"}[dtype]
        self.llm = vllm.LLM(model=model_dir, dtype=vllm_dtype)
        self.batch_size = batch_size
        self._vllm = vllm

    def requests_per_call(self, settings: SamplingSettings) -> int:
        # vLLM schedules its own batches; bigger calls only mean coarser resume points
        return max(1, self.batch_size // settings.num_responses) * 8

    def generate(self, requests: Sequence[SamplingRequest], settings: SamplingSettings, seed: int) -> list[list[str]]:
        params = self._vllm.SamplingParams(n=settings.num_responses, temperature=settings.temperature,
                                           top_p=settings.top_p, max_tokens=settings.max_new_tokens, seed=seed)
        prompts = [{"prompt_token_ids": prompt_token_ids(self.tokenizer, r.prompt, settings.system_prompt,
                                                         settings.use_chat_template, settings.examples)}
                   for r in requests]
        outputs = self.llm.generate(prompts, params, use_tqdm=False)
        return [[o.text.strip() for o in out.outputs] for out in outputs]


# ------------------------------------------------------------------------------------------ scripted
class ScriptedBackend:
    """Responses written from synthetic items' bridge facts (demos and tests, not training data)."""

    def requests_per_call(self, settings: SamplingSettings) -> int:
        return 64

    def generate(self, requests: Sequence[SamplingRequest], settings: SamplingSettings, seed: int) -> list[list[str]]:
        out = []
        for r in requests:
            if r.item is None:
                raise ValueError(f"scripted sampling needs the QA item of request {r.id!r}")
            # seeded per question, not per call: the responses do not depend on how questions are batched
            out.append(scripted_responses(r.item, settings.num_responses, random.Random(f"{settings.seed}:{r.id}")))
        return out


def make_backend(name: str, model_dir: str | None, device: str = "auto", dtype: str = "auto", batch_size: int = 32,
                 tokenizer: Any = None, calls_per_batch: int = 1) -> ResponseBackend:
    """Backend by name; 'auto' = vllm when importable with CUDA, else hf. calls_per_batch: hf only."""
    if name == "auto":
        name = "vllm" if vllm_available() else "hf"
    if name == "scripted":
        return ScriptedBackend()
    if model_dir is None:
        raise ValueError(f"sampling backend {name} needs a model directory (data.sampling_model)")
    if name == "hf":
        return HFBackend(model_dir, device, dtype, batch_size, tokenizer, calls_per_batch=calls_per_batch)
    if name == "vllm":
        try:
            import vllm  # noqa: F401
        except ImportError:
            raise ValueError("data.sampling_backend=vllm but vllm is not installed: pip install vllm, or use "
                             "data.sampling_backend=hf") from None
        return VLLMBackend(model_dir, dtype, tokenizer, batch_size)
    raise ValueError(f"unknown sampling backend {name!r}")


# ------------------------------------------------------------------------------------------ driver
def _read_partial(path: pathlib.Path) -> list[dict[str, Any]]:
    """Lines of a samples file; a torn last line (crash mid-write) is dropped and the file repaired."""
    if not path.is_file():
        return []
    lines = path.read_text(encoding="utf-8").splitlines(keepends=True)
    rows = []
    for lineno, line in enumerate(lines, start=1):
        if not line.strip():
            continue
        try:
            rows.append(json.loads(line))
        except json.JSONDecodeError:
            if lineno == len(lines):
                logger.warning("%s: dropping a torn last line (interrupted write); it will be resampled", path)
                path.write_text("".join(lines[:-1]), encoding="utf-8")
                break
            raise ValueError(f"{path}:{lineno}: malformed JSON in the middle of a samples file; delete the file "
                             "to resample from scratch") from None
    return rows


def _call_seed(seed: int, ids: Sequence[str]) -> int:
    return int.from_bytes(hashlib.sha256(f"{seed}:{ids[0]}:{len(ids)}".encode()).digest()[:4], "little")


def sample_responses(requests: Sequence[SamplingRequest], backend: ResponseBackend, settings: SamplingSettings,
                     samples_path: str | os.PathLike, progress: bool = True,
                     on_call: Callable[[int], None] | None = None, stats: SamplingStats | None = None,
                     tokenizer: Any = None) -> dict[str, list[str]]:
    """Responses per request id, sampling only what `samples_path` (or its .partial) does not hold yet.

    Returns {id: [response, ...]} for every request. Questions go to the backend in calls of
    `backend.requests_per_call(settings)`, each seeded from its questions; a backend with `calls_per_batch`
    > 1 (HFBackend) gets that many calls at once (`generate_calls`; the samples stay those of one call at a
    time). `on_call(n)` is called after each call with the number of questions it sampled (tests count
    calls with it). With `stats` (and the
    `tokenizer` that renders the prompts) the questions sampled now, their tokens and the backend's
    seconds are added to it.
    """
    import time

    if stats is not None and tokenizer is None:
        raise ValueError("sample_responses(stats=...) needs the tokenizer to count prompt and response tokens")
    from tqdm.auto import tqdm

    final = pathlib.Path(samples_path)
    partial = final.with_name(final.name + ".partial")
    keys = {r.id: settings.key(r.prompt) for r in requests}
    done: dict[str, list[str]] = {}
    for row in _read_partial(final) + _read_partial(partial):
        if keys.get(row.get("id")) == row.get("key") and len(row.get("responses", [])) == settings.num_responses:
            done[row["id"]] = row["responses"]
    pending = [r for r in requests if r.id not in done]
    if pending:
        logger.info("sampling %d questions (%d already done) x %d responses", len(pending), len(done),
                    settings.num_responses)
        partial.parent.mkdir(parents=True, exist_ok=True)
        per_call = backend.requests_per_call(settings)
        chunks = [pending[start:start + per_call] for start in range(0, len(pending), per_call)]
        calls_per_batch = getattr(backend, "calls_per_batch", 1)  # HFBackend: calls decoded together
        with open(partial, "a", encoding="utf-8") as sink, tqdm(
                total=len(requests), initial=len(done), unit="q", desc="sampling", disable=not progress) as bar:
            for first in range(0, len(chunks), calls_per_batch):
                calls = chunks[first:first + calls_per_batch]
                seeds = [_call_seed(settings.seed, [r.id for r in chunk]) for chunk in calls]
                began = time.perf_counter()
                outputs = (backend.generate_calls(calls, settings, seeds) if len(calls) > 1
                           else [backend.generate(calls[0], settings, seeds[0])])
                if stats is not None:
                    stats.add(tokenizer, [r for chunk in calls for r in chunk], [o for out in outputs for o in out],
                              settings, time.perf_counter() - began)
                for chunk, chunk_outputs in zip(calls, outputs, strict=True):
                    for request, responses in zip(chunk, chunk_outputs, strict=True):
                        done[request.id] = responses
                        sink.write(json.dumps({"id": request.id, "key": keys[request.id], "responses": responses},
                                              ensure_ascii=False) + "\n")
                    sink.flush()
                    os.fsync(sink.fileno())
                    bar.update(len(chunk))
                    if on_call is not None:
                        on_call(len(chunk))
    with atomic_write(final) as f:
        for r in requests:
            f.write(json.dumps({"id": r.id, "key": keys[r.id], "responses": done[r.id]}, ensure_ascii=False) + "\n")
    partial.unlink(missing_ok=True)
    return {r.id: done[r.id] for r in requests}
