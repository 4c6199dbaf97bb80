"""Greedy batched generation for evaluation, with a Hugging Face model or a Megatron-Core GPTModel.

Three ways to decode, all greedy (argmax) and all returning the generated token ids per prompt:

* `HFGenerator`: a transformers model with its KV cache (CPU or CUDA). By default each prompt is
  prefilled alone (no padding, no mask: SDPA's causal kernel) and the batch is decoded together from
  the stacked caches (``hf-unpadded-prefill``); ``prefill="padded"`` is transformers ``generate`` on the
  left-padded batch with an attention mask (``hf-generate``).
* `MegatronGenerator` with ``decode="engine"`` (CUDA only): Megatron-Core's static inference engine
  (``StaticInferenceEngine(legacy=True)`` + ``TextGenerationController`` + ``GPTInferenceWrapper``).
* `MegatronGenerator` with ``decode="static_kv"`` or ``"recompute"``: our loop over the GPTModel,
  using the scheme of Megatron's static-batch controller: prefill all prompts up to the shortest
  prompt's length, then one position per step for the whole batch; a sequence still inside its
  prompt keeps its prompt token instead of the argmax. No padding mask is needed, so any core
  attention works. ``static_kv`` feeds one token per step and keeps keys/values in Megatron's
  ``StaticInferenceContext`` (verified to work on CPU through the shim with the local and SDPA
  attention); ``recompute`` runs the whole prefix every step (O(n^2) work, no cache; the fallback
  when a core attention cannot decode against a cache).

``decode="auto"`` picks engine on CUDA (falling back to the loop if the engine fails), otherwise
static_kv when a probe shows cached decoding gives the recomputed logits, otherwise recompute. The
path actually used is reported in `Generator.path` and ends up in the eval report.
"""

from __future__ import annotations

import dataclasses
import logging
import time
import warnings
from collections.abc import Callable, Sequence
from typing import Any

import torch

from megatron_solopo.data.kv_cache import (SharedPrefix, cache_kwarg, full_attention_only, last_logits, prefill_each,
                                           select_rows)
from megatron_solopo.data.sampling import left_pad
from megatron_solopo.model.hf.loading import check_hf_model
from megatron_solopo.parallel.device import setting_device

__all__ = ["GenerationStats", "Generator", "HFGenerator", "MegatronGenerator", "resolve_device", "resolve_dtype",
           "batched_greedy", "forced_prefix_greedy", "truncate_at_eos"]

log = logging.getLogger(__name__)

_DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}


def resolve_device(device: str) -> torch.device:
    """'auto' -> cuda when in use (visible and not SOLOPO_DEVICE=cpu: parallel.device), else cpu; an
    explicit CUDA device without CUDA is an error."""
    return setting_device(device, "eval.device")


def resolve_dtype(dtype: str, device: torch.device) -> torch.dtype:
    """'auto' -> bf16 on CUDA, fp32 on CPU (CPU bf16 matmuls are slow and less exact)."""
    if dtype == "auto":
        return torch.bfloat16 if device.type == "cuda" else torch.float32
    return _DTYPES[dtype]


def truncate_at_eos(token_ids: Sequence[int], eos_ids: Sequence[int]) -> list[int]:
    """The tokens before the first EOS (any of `eos_ids`); EOS itself is not part of the answer."""
    eos = set(eos_ids)
    out = []
    for token in token_ids:
        if token in eos:
            break
        out.append(int(token))
    return out


@dataclasses.dataclass
class GenerationStats:
    """Counters of one generation run (for the report's timing block)."""

    num_prompts: int = 0
    prompt_tokens: int = 0
    generated_tokens: int = 0
    seconds: float = 0.0

    @property
    def generated_tokens_per_second(self) -> float:
        return self.generated_tokens / self.seconds if self.seconds > 0 else 0.0

    def as_dict(self) -> dict[str, float]:
        return {"num_prompts": self.num_prompts, "prompt_tokens": self.prompt_tokens,
                "generated_tokens": self.generated_tokens, "seconds": round(self.seconds, 3),
                "generated_tokens_per_second": round(self.generated_tokens_per_second, 3)}


BatchFn = Callable[[list[list[int]]], list[list[int]]]


def batched_greedy(generate_batch: BatchFn, prompts: Sequence[Sequence[int]], batch_size: int,
                   eos_ids: Sequence[int], stats: GenerationStats | None = None,
                   progress: Any = None) -> list[list[int]]:
    """Runs `generate_batch` over `prompts` in batches of similar length; returns outputs in input order.

    Prompts are sorted longest first (an out-of-memory error shows up in the first batch, not after
    an hour) so that a batch pads or forces few tokens. Outputs are cut at the first EOS.
    `progress` is an optional tqdm-like object updated per prompt.
    """
    if batch_size < 1:
        raise ValueError(f"batch_size must be >= 1, got {batch_size}")
    order = sorted(range(len(prompts)), key=lambda i: -len(prompts[i]))
    outputs: list[list[int] | None] = [None] * len(prompts)
    stats = stats if stats is not None else GenerationStats()
    for start in range(0, len(order), batch_size):
        chunk = order[start:start + batch_size]
        batch = [list(map(int, prompts[i])) for i in chunk]
        began = time.perf_counter()
        generated = generate_batch(batch)
        stats.seconds += time.perf_counter() - began
        for i, tokens in zip(chunk, generated):
            outputs[i] = truncate_at_eos(tokens, eos_ids)
            stats.generated_tokens += len(outputs[i])
            stats.prompt_tokens += len(prompts[i])
        stats.num_prompts += len(chunk)
        if progress is not None:
            progress.update(len(chunk))
            progress.set_postfix(tok_s=f"{stats.generated_tokens_per_second:.1f}")
    return [o if o is not None else [] for o in outputs]


class Generator:
    """Greedy generator interface: `generate(prompts) -> generated ids per prompt` (EOS removed)."""

    path: str = "unset"
    """Which decoding path ran: hf-unpadded-prefill | hf-generate | mcore-engine | static-kv-loop | recompute-loop."""

    def __init__(self, eos_ids: Sequence[int], max_new_tokens: int, batch_size: int) -> None:
        if not eos_ids:
            raise ValueError("generation needs at least one EOS token id (the tokenizer has no eos_token)")
        self.eos_ids = [int(e) for e in eos_ids]
        self.max_new_tokens = max_new_tokens
        self.batch_size = batch_size
        self.stats = GenerationStats()

    def generate_batch(self, prompts: list[list[int]]) -> list[list[int]]:
        raise NotImplementedError

    def generate(self, prompts: Sequence[Sequence[int]], progress: Any = None) -> list[list[int]]:
        """Generated token ids for each prompt (at most max_new_tokens, cut before EOS)."""
        if any(len(p) == 0 for p in prompts):
            raise ValueError("a prompt has no tokens; every prompt needs at least one token")
        return batched_greedy(self.generate_batch, prompts, self.batch_size, self.eos_ids, self.stats, progress)


# ----------------------------------------------------------------------------------------- HF
HF_PREFILL = ("unpadded", "padded")


class HFGenerator(Generator):
    """Greedy decoding with a transformers causal LM and its KV cache.

    ``prefill="unpadded"`` (path ``hf-unpadded-prefill``, the default): each prompt of a batch is
    prefilled alone, without padding or attention mask, so SDPA runs its causal kernel (which skips
    the upper triangle) and no FLOP is spent on pad tokens; the LM head runs on the last position
    only. The prompts' KV caches are then stacked left-padded into one batch cache and all answers
    are decoded together (one token per step for the whole batch, which amortizes reading the
    weights), with rows that finished dropped from the batch. Falls back to ``padded`` for models
    whose cache layout this does not handle (sliding-window or hybrid attention). With ``share_prefix``
    (default) the tokens that all prompts of a `generate` call start with (chat template, system prompt,
    worked example, instruction) are prefilled once and each prompt prefills only its remainder
    (`data.kv_cache.SharedPrefix`; `shared_prefix_tokens` says how many were shared).
    ``prefill="padded"`` (path ``hf-generate``): transformers ``generate`` on the left-padded batch
    with an attention mask (the masked attention kernel computes the full L x L score matrix).
    Both are greedy; docs/evaluation.md lists what was measured and how outputs were compared.
    """

    def __init__(self, model: Any, eos_ids: Sequence[int], pad_id: int | None, max_new_tokens: int,
                 batch_size: int, prefill: str = "unpadded", share_prefix: bool = True) -> None:
        super().__init__(eos_ids, max_new_tokens, batch_size)
        if prefill not in HF_PREFILL:
            raise ValueError(f"prefill={prefill!r} is not one of {', '.join(HF_PREFILL)}")
        self.model = model.eval()
        self.pad_id = int(pad_id if pad_id is not None else self.eos_ids[0])
        self.device = next(model.parameters()).device
        self._cache_kwarg = cache_kwarg(model)
        unpadded = prefill == "unpadded" and self._cache_kwarg is not None and full_attention_only(model.config)
        self.path = "hf-unpadded-prefill" if unpadded else "hf-generate"
        self.share_prefix = share_prefix and unpadded
        self._prefix: SharedPrefix | None = None
        self.shared_prefix_tokens = 0
        """Leading tokens of the last `generate` call's prompts prefilled once for all of them (0: none)."""

    @classmethod
    def from_pretrained(cls, hf_dir: str, eos_ids: Sequence[int], pad_id: int | None, max_new_tokens: int,
                        batch_size: int, device: torch.device, dtype: torch.dtype,
                        prefill: str = "unpadded") -> HFGenerator:
        from transformers import AutoModelForCausalLM


        check_hf_model(hf_dir)  # tensors and config.json agree, from the headers: a one-line error otherwise
        model = AutoModelForCausalLM.from_pretrained(hf_dir, dtype=dtype)
        return cls(model.to(device), eos_ids, pad_id, max_new_tokens, batch_size, prefill)

    def generate(self, prompts: Sequence[Sequence[int]], progress: Any = None) -> list[list[int]]:
        """As `Generator.generate`; the prompts' shared prefix (when sharing) is taken over all of them, so
        that every batch reuses the same one."""
        self._prefix, self.shared_prefix_tokens = None, 0
        if self.share_prefix and prompts and all(prompts):
            self._prefix = SharedPrefix()
            with torch.no_grad():
                self.shared_prefix_tokens = self._prefix.prepare(self.model, prompts, self._cache_kwarg)
        return super().generate(prompts, progress)

    @torch.no_grad()
    def generate_batch(self, prompts: list[list[int]]) -> list[list[int]]:
        if self.path == "hf-unpadded-prefill":
            return self._prefill_then_decode(prompts)
        return self._generate_padded(prompts)

    def _generate_padded(self, prompts: list[list[int]]) -> list[list[int]]:
        from transformers import GenerationConfig


        input_ids, attention_mask = left_pad(prompts, self.pad_id)
        config = GenerationConfig(do_sample=False, num_beams=1, max_new_tokens=self.max_new_tokens,
                                  eos_token_id=self.eos_ids, pad_token_id=self.pad_id)
        out = self.model.generate(input_ids=input_ids.to(self.device), attention_mask=attention_mask.to(self.device),
                                  generation_config=config)
        return [row[input_ids.shape[1]:].tolist() for row in out.cpu()]

    def _prefill_then_decode(self, prompts: list[list[int]]) -> list[list[int]]:
        eos = set(self.eos_ids)
        lengths = [len(p) for p in prompts]
        prefix = self._prefix if self.shared_prefix_tokens else None
        logits, cache, mask = prefill_each(self.model, prompts, self.max_new_tokens, self._cache_kwarg, prefix)
        first = logits.argmax(-1).tolist()
        generated = [[token] for token in first]
        live = [row for row, token in enumerate(first) if token not in eos and self.max_new_tokens > 1]
        if len(live) < len(prompts):
            mask = select_rows(cache, mask, live, len(prompts))
        lengths_t = torch.tensor(lengths, device=self.device)
        step = 0
        while live:
            rows = torch.tensor(live, dtype=torch.long, device=self.device)
            tokens = torch.tensor([[generated[r][-1]] for r in live], device=self.device)  # [b_live, 1]
            mask = torch.cat([mask, mask.new_ones(len(live), 1)], dim=1)
            positions = (lengths_t[rows] + step).unsqueeze(1)  # [b_live, 1]: where the fed token sits
            choice = last_logits(self.model, tokens, cache, self._cache_kwarg, attention_mask=mask,
                                 position_ids=positions).argmax(-1).tolist()
            step += 1
            still = []
            for index, (row, token) in enumerate(zip(live, choice)):
                generated[row].append(token)
                if token not in eos and len(generated[row]) < self.max_new_tokens:
                    still.append(index)
            if len(still) < len(live):
                mask = select_rows(cache, mask, still, len(live))
                live = [live[i] for i in still]
        return generated



# ------------------------------------------------------------------------------------- Megatron
# next_logits(tokens [b, total], start, end) -> logits [b, vocab] at position end-1, having seen
# tokens[:, :end]; `start` is where the previous call stopped (0 on the first call of a batch).
NextLogitsFn = Callable[[torch.Tensor, int, int], torch.Tensor]


def forced_prefix_greedy(next_logits: NextLogitsFn, prompts: Sequence[Sequence[int]], max_new_tokens: int,
                         eos_ids: Sequence[int], pad_id: int, device: torch.device | str = "cpu") -> list[list[int]]:
    """Greedy decoding of prompts of unequal lengths without attention masks (Megatron's static scheme).

    Position p of every sequence is predicted from positions < p. Decoding starts at the shortest
    prompt's length; a sequence whose prompt is longer keeps its own prompt token at p (the argmax
    is discarded), so its result equals decoding it alone. A sequence stops after max_new_tokens
    tokens or an EOS; the loop stops when all have stopped.
    Returns the generated ids per prompt (EOS included when one was produced).
    """
    lengths = [len(p) for p in prompts]
    total = max(lengths) + max_new_tokens
    tokens = torch.full((len(prompts), total), pad_id, dtype=torch.long, device=device)  # [b, total]
    for row, prompt in enumerate(prompts):
        tokens[row, :len(prompt)] = torch.tensor(prompt, dtype=torch.long)
    eos = {int(e) for e in eos_ids}
    generated: list[list[int]] = [[] for _ in prompts]
    finished = [False] * len(prompts)
    start = min(lengths)
    logits = next_logits(tokens, 0, start)
    for pos in range(start, total):
        choice = logits.argmax(dim=-1).tolist()
        for row, length in enumerate(lengths):
            if pos < length or finished[row]:
                continue  # still reading the prompt, or done (its later tokens are never read)
            tokens[row, pos] = choice[row]
            generated[row].append(choice[row])
            finished[row] = choice[row] in eos or len(generated[row]) >= max_new_tokens
        if all(finished):
            break
        logits = next_logits(tokens, pos, pos + 1)
    return generated


def _positions(batch: int, start: int, end: int, device: torch.device) -> torch.Tensor:
    return torch.arange(start, end, device=device).unsqueeze(0).expand(batch, -1)  # [b, end-start]


def recompute_next_logits(model: Any) -> NextLogitsFn:
    """Full recompute: the whole prefix tokens[:, :end] through the model at every step."""

    def next_logits(tokens: torch.Tensor, start: int, end: int) -> torch.Tensor:
        prefix = tokens[:, :end]
        logits = model(prefix, _positions(prefix.shape[0], 0, end, prefix.device), None)  # [b, end, V]
        return logits[:, -1].float()

    return next_logits


def static_kv_next_logits(model: Any, batch_size: int, max_sequence_length: int) -> NextLogitsFn:
    """Incremental decoding with Megatron's StaticInferenceContext (per-layer K/V buffers)."""
    from megatron.core.inference.contexts import StaticInferenceContext

    context = StaticInferenceContext(batch_size, max_sequence_length)

    def next_logits(tokens: torch.Tensor, start: int, end: int) -> torch.Tensor:
        if start != context.sequence_len_offset:
            raise RuntimeError(f"static KV cache holds {context.sequence_len_offset} positions but the loop asked "
                               f"to continue from {start}")
        if start > 0:
            context.enable_decode_mode()
        chunk = tokens[:, start:end]
        logits = model(chunk, _positions(chunk.shape[0], start, end, chunk.device), None,
                       inference_context=context)  # [b, end-start, V] (or only the last position)
        context.sequence_len_offset += end - start
        return logits[:, -1].float()

    return next_logits


def static_kv_matches_recompute(model: Any, vocab_size: int, device: torch.device, rel_tol: float) -> bool:
    """Probe: do prefill + cached decode steps give the logits of full recomputation?

    A core attention that cannot attend a 1-token query to a longer cached key (e.g. one that
    applies a top-left-aligned causal mask when sq != sk) fails this, and the loop then recomputes.
    """
    generator = torch.Generator().manual_seed(0)
    tokens = torch.randint(0, vocab_size, (2, 8), generator=generator).to(device)  # [b=2, 8]
    try:
        with torch.no_grad():
            full = model(tokens, _positions(2, 0, 8, device), None)[:, 4:8].float()  # logits at 4..7
            step = static_kv_next_logits(model, 2, 8)
            cached = [step(tokens, 0, 5)] + [step(tokens, p, p + 1) for p in range(5, 8)]
    except Exception as err:  # noqa: BLE001 - any failure means "do not use the cache with this model"
        log.info("static KV cache probe failed (%s: %s); decoding by recomputation", type(err).__name__, err)
        return False
    cached_logits = torch.stack(cached, dim=1)  # [b, 4, V]
    error = (cached_logits - full).norm() / full.norm().clamp_min(1e-6)
    return bool(error < rel_tol)


class _MegatronTokenizer:
    """What Megatron's TextGenerationController reads from a tokenizer (ids in, text out)."""

    def __init__(self, hf_tokenizer: Any, eos_id: int) -> None:
        self._tok = hf_tokenizer
        self.eod = eos_id
        self.bos = getattr(hf_tokenizer, "bos_token_id", None)
        self.vocab_size = len(hf_tokenizer)

    def tokenize(self, text: str) -> list[int]:
        return self._tok.encode(text, add_special_tokens=False)

    def detokenize(self, ids: Sequence[int], skip_special_tokens: bool = True) -> str:
        return self._tok.decode(list(ids), skip_special_tokens=skip_special_tokens)


class MegatronGenerator(Generator):
    """Greedy decoding with a single-process Megatron-Core GPTModel (TP = PP = CP = 1)."""

    def __init__(self, model: Any, eos_ids: Sequence[int], pad_id: int | None, max_new_tokens: int, batch_size: int,
                 vocab_size: int, decode: str = "auto", tokenizer: Any = None) -> None:
        super().__init__(eos_ids, max_new_tokens, batch_size)
        self.model = model.eval()
        self.pad_id = int(pad_id if pad_id is not None else self.eos_ids[0])
        self.vocab_size = vocab_size
        self.device = next(model.parameters()).device
        self.tokenizer = tokenizer
        self.path = self._choose_path(decode)
        self._engine = None

    def _choose_path(self, decode: str) -> str:
        on_cuda = self.device.type == "cuda"
        if decode == "engine":
            if not on_cuda:
                raise ValueError("eval.megatron_decode=engine needs CUDA (Megatron-Core's inference engine "
                                 "allocates on the GPU); use static_kv, recompute or auto on CPU")
            if self.tokenizer is None:
                raise ValueError("eval.megatron_decode=engine needs the tokenizer (the engine detokenizes)")
            return "mcore-engine"
        if decode == "auto" and on_cuda and self.tokenizer is not None:
            return "mcore-engine"
        if decode == "recompute":
            return "recompute-loop"
        return self._loop_path(require_cache=decode == "static_kv")

    def _loop_path(self, require_cache: bool) -> str:
        """static-kv-loop when cached decoding reproduces recomputation on this model, else recompute-loop."""
        dtype = next(self.model.parameters()).dtype
        tolerance = 1e-3 if dtype == torch.float32 else 5e-2
        exact = static_kv_matches_recompute(self.model, self.vocab_size, self.device, tolerance)
        if require_cache and not exact:
            raise ValueError("eval.megatron_decode=static_kv, but with this model's core attention the cached "
                             "decoding does not reproduce full recomputation; use recompute or auto")
        return "static-kv-loop" if exact else "recompute-loop"

    @torch.no_grad()
    def generate_batch(self, prompts: list[list[int]]) -> list[list[int]]:
        if self.path == "mcore-engine":
            try:
                return self._engine_generate(prompts)
            except Exception as err:  # noqa: BLE001 - the engine is optional; the loop is always correct
                warnings.warn(f"Megatron-Core inference engine failed ({type(err).__name__}: {err}); "
                              "falling back to the static-KV loop for the rest of this run")
                self.path = self._loop_path(require_cache=False)
        total = max(len(p) for p in prompts) + self.max_new_tokens
        if self.path == "static-kv-loop":
            step = static_kv_next_logits(self.model, len(prompts), total)
        else:
            step = recompute_next_logits(self.model)
        return forced_prefix_greedy(step, prompts, self.max_new_tokens, self.eos_ids, self.pad_id, self.device)

    def _engine_generate(self, prompts: list[list[int]]) -> list[list[int]]:
        from megatron.core.inference.inference_request import InferenceRequest
        from megatron.core.inference.sampling_params import SamplingParams

        engine = self._engine_for(len(prompts), max(len(p) for p in prompts) + self.max_new_tokens)
        params = SamplingParams(temperature=1.0, top_k=1, num_tokens_to_generate=self.max_new_tokens,
                                termination_id=self.eos_ids[0])
        requests = [InferenceRequest(request_id=engine.get_new_request_id(), prompt="", prompt_tokens=list(p),
                                     sampling_params=params) for p in prompts]
        results = engine.generate(inference_requests=requests)  # in the order of `requests`
        return [r.generated_tokens.tolist() if torch.is_tensor(r.generated_tokens) else list(r.generated_tokens)
                for r in results]

    def _engine_for(self, batch_size: int, max_sequence_length: int):
        """A legacy static engine sized for this batch (rebuilt when a batch needs more room)."""
        from megatron.core.inference.contexts import StaticInferenceContext
        from megatron.core.inference.engines import StaticInferenceEngine
        from megatron.core.inference.model_inference_wrappers.gpt.gpt_inference_wrapper import GPTInferenceWrapper
        from megatron.core.inference.text_generation_controllers.text_generation_controller import (
            TextGenerationController,
        )

        size = (max(batch_size, self.batch_size), max_sequence_length)
        if self._engine is None or self._engine[0][0] < size[0] or self._engine[0][1] < size[1]:
            wrapped = GPTInferenceWrapper(self.model, StaticInferenceContext(*size))
            controller = TextGenerationController(wrapped, _MegatronTokenizer(self.tokenizer, self.eos_ids[0]))
            with warnings.catch_warnings():
                warnings.simplefilter("ignore", DeprecationWarning)
                self._engine = (size, StaticInferenceEngine(controller, max_batch_size=size[0], legacy=True))
        engine = self._engine[1]
        engine.controller.inference_wrapped_model.inference_context.reset()
        return engine
