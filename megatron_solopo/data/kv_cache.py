"""KV caches for decoding with a Hugging Face causal LM on CPU or GPU (sampling and evaluation).

Prompts are prefilled one by one without padding or mask (SDPA's causal kernel, the LM head on the
last position only), their caches stacked left-padded into one batch cache whose layers have spare
room, so that a decoding step writes its key/value in place instead of copying the whole cache with
torch.cat (transformers' DynamicLayer), and finished rows can leave the batch. Used by
`data.sampling.HFBackend` (N responses per prompt) and `eval.generation.HFGenerator` (greedy). With N
responses per prompt, `SharedPrompts` keeps each prompt's keys/values once for all of them. Prompts
that start with the same tokens (chat template, system prompt, worked example, instruction) can have that
prefix prefilled once (`SharedPrefix`): each prompt then prefills only its own remainder.
"""

from __future__ import annotations

import contextlib
import contextvars
import dataclasses
import os
from collections.abc import Iterator, Sequence
from typing import Any

import torch

__all__ = ["cache_kwarg", "full_attention_only", "prefill_each", "SharedPrefix", "SHARED_PREFIX_MIN_TOKENS", "stack_left_padded", "reserved_cache",
           "select_rows", "last_logits", "SharedPrompts", "shared_prompt_attention", "shared_prompt_decoding",
           "row_mask", "SHARED_PROMPT_ATTENTION"]


def cache_kwarg(model: Any) -> str | None:
    """The forward argument that takes a KV cache: `cache` (transformers >= 5.x) or `past_key_values`."""
    import inspect

    params = inspect.signature(model.forward).parameters
    if "logits_to_keep" not in params:
        return None
    for name in ("cache", "past_key_values"):
        if name in params:
            return name
    return None


def full_attention_only(config: Any) -> bool:
    """True when every layer attends to the whole prefix (no sliding window, no linear-attention layers)."""
    layer_types = getattr(config, "layer_types", None)
    if layer_types and any(t != "full_attention" for t in layer_types):
        return False
    window = getattr(config, "sliding_window", None)
    return not window or getattr(config, "use_sliding_window", True) is False


def _layer_kv(cache: Any, layer: int) -> tuple[torch.Tensor, torch.Tensor]:
    if hasattr(cache, "layers"):
        return cache.layers[layer].keys, cache.layers[layer].values
    return cache.key_cache[layer], cache.value_cache[layer]  # transformers < 4.54


def _num_layers(cache: Any) -> int:
    return len(cache.layers) if hasattr(cache, "layers") else len(cache.key_cache)


def stack_left_padded(caches: list[Any], lengths: list[int], width: int, reserve: int) -> Any:
    """One batch cache [b, heads, width, dim] per layer from per-prompt caches, prompts right-aligned.

    The pad columns hold zeros and are masked out in decoding. Each layer has room for `reserve` more
    positions, so a decoding step writes its key/value in place (transformers' DynamicLayer copies the
    whole cache every step with torch.cat: half of a CPU decoding step at 2K tokens).
    """
    merged = reserved_cache(_num_layers(caches[0]), reserve)
    for layer in range(_num_layers(caches[0])):
        keys0, values0 = _layer_kv(caches[0], layer)
        keys = keys0.new_zeros((len(caches), keys0.shape[1], width, keys0.shape[3]))
        values = values0.new_zeros((len(caches), values0.shape[1], width, values0.shape[3]))
        for row, (cache, length) in enumerate(zip(caches, lengths, strict=True)):
            k, v = _layer_kv(cache, layer)
            keys[row, :, width - length:] = k[0]
            values[row, :, width - length:] = v[0]
            if hasattr(cache, "layers"):
                cache.layers[layer].keys = cache.layers[layer].values = None  # free as we go
        merged.update(keys, values, layer)
        del keys, values
    return merged


def reserved_cache(num_layers: int, reserve: int) -> Any:
    """A DynamicCache whose layers keep keys/values in buffers with spare room (plain DynamicCache on
    transformers versions without per-layer cache objects)."""
    from transformers import DynamicCache

    cache = DynamicCache()
    layer_class = _reserved_layer_class()
    if layer_class is None or not isinstance(getattr(cache, "layers", None), list):
        return cache
    cache.layers[:] = [layer_class(reserve) for _ in range(num_layers)]
    return cache


_RESERVED_LAYER: list[Any] = []


def _reserved_layer_class() -> Any:
    """transformers' DynamicLayer with in-place appends into preallocated buffers (None if it has none)."""
    if _RESERVED_LAYER:
        return _RESERVED_LAYER[0]
    try:
        from transformers.cache_utils import DynamicLayer
    except ImportError:
        _RESERVED_LAYER.append(None)
        return None

    class ReservedDynamicLayer(DynamicLayer):
        """`keys`/`values` are views [b, h, length, d] of buffers [b, h, capacity, d]; appending writes in place."""

        def __init__(self, reserve: int) -> None:
            super().__init__()
            self.reserve = reserve
            self._buffers: tuple[torch.Tensor, torch.Tensor] | None = None

        def _owns_views(self) -> bool:
            return (self._buffers is not None and self.keys is not None and self.keys.numel() > 0
                    and self.keys.data_ptr() == self._buffers[0].data_ptr()
                    and self.keys.shape[0] == self._buffers[0].shape[0])

        def update(self, key_states: torch.Tensor, value_states: torch.Tensor, *args: Any,
                   **kwargs: Any) -> tuple[torch.Tensor, torch.Tensor]:
            if not self.is_initialized:
                self.lazy_initialization(key_states, value_states)
            length, new = self.get_seq_length(), key_states.shape[-2]
            if not self._owns_views() or length + new > self._buffers[0].shape[-2]:
                self._reallocate(key_states, value_states, length, length + new + self.reserve)
            key_buffer, value_buffer = self._buffers
            key_buffer[:, :, length:length + new] = key_states
            value_buffer[:, :, length:length + new] = value_states
            self.keys, self.values = key_buffer[:, :, :length + new], value_buffer[:, :, :length + new]
            return self.keys, self.values

        def _reallocate(self, key_states: torch.Tensor, value_states: torch.Tensor, length: int,
                        capacity: int) -> None:
            buffers = []
            for old, new in ((self.keys, key_states), (self.values, value_states)):
                buffer = new.new_zeros((new.shape[0], new.shape[1], capacity, new.shape[3]))
                if length:
                    buffer[:, :, :length] = old
                buffers.append(buffer)
            self._buffers = (buffers[0], buffers[1])

        def batch_select_indices(self, indices: torch.Tensor) -> None:
            if self._owns_views():
                length = self.get_seq_length()
                self._buffers = (self._buffers[0][indices], self._buffers[1][indices])
                self.keys, self.values = self._buffers[0][:, :, :length], self._buffers[1][:, :, :length]
            else:
                super().batch_select_indices(indices)

    _RESERVED_LAYER.append(ReservedDynamicLayer)
    return ReservedDynamicLayer


def select_rows(cache: Any, mask: torch.Tensor, keep: list[int], batch: int) -> torch.Tensor:
    """Drops finished rows from the cache (in place) and the attention mask (returned)."""
    index = torch.tensor(keep, dtype=torch.long, device=mask.device)
    if len(keep) and len(keep) < batch:
        cache.batch_select_indices(index)
    return mask[index]


def last_logits(model: Any, input_ids: torch.Tensor, cache: Any, kwarg: str, **kwargs: Any) -> torch.Tensor:
    """fp32 logits [b, V] at the last position; `cache` (passed as the forward argument `kwarg`) is
    updated in place."""
    out = model(input_ids=input_ids, use_cache=True, logits_to_keep=1, **{kwarg: cache}, **kwargs)
    return out.logits[:, -1].float()


def prefill_each(model: Any, prompts: Sequence[Sequence[int]], reserve: int, kwarg: str,
                 prefix: SharedPrefix | None = None) -> tuple[torch.Tensor, Any, torch.Tensor]:
    """Prefills every prompt alone and stacks the caches: (next-token logits [P, V] fp32, one batch
    cache [P, heads, width, dim] per layer with room for `reserve` more positions, attention mask
    [P, width] with 0 on the left padding). Needs `full_attention_only(model.config)`.

    With `prefix`, the tokens all prompts start with are prefilled once (`SharedPrefix.prepare`) and each
    prompt prefills only the rest against a copy of the prefix's keys/values (a masked attention kernel
    instead of the causal one: the same logits up to floating-point summation order)."""
    from transformers import DynamicCache

    device = next(model.parameters()).device
    lengths = [len(p) for p in prompts]
    width = max(lengths)
    shared = prefix.prepare(model, prompts, kwarg) if prefix is not None else 0
    logits, caches = [], []
    for prompt in prompts:
        cache = prefix.fresh_cache() if shared else DynamicCache()
        rest = torch.tensor([list(prompt[shared:])], device=device)
        logits.append(last_logits(model, rest, cache, kwarg))  # no mask: causal, or explicit over the prefix
        caches.append(cache)
    stacked = stack_left_padded(caches, lengths, width, reserve=reserve)
    del caches
    mask = torch.zeros(len(prompts), width, dtype=torch.long, device=device)
    for row, length in enumerate(lengths):
        mask[row, width - length:] = 1
    return torch.cat(logits), stacked, mask


# ------------------------------------------------------------------ one prefill for the shared prefix
SHARED_PREFIX_MIN_TOKENS = 64
"""Shorter shared prefixes are not worth a cache copy per prompt and a masked attention kernel."""


def _common_prefix(sequences: Sequence[Sequence[int]]) -> list[int]:
    return list(os.path.commonprefix([list(s) for s in sequences]))


class SharedPrefix:
    """The keys/values of the tokens a run's prompts start with, prefilled once and reused by `prefill_each`.

    Prompts of an eval suite or a sampling run share their first few hundred tokens (chat template, system
    prompt, worked example, instruction): 30% of the eval's prompt tokens and 61% of x_short sampling
    prompts' in the RULER experiment. The prefix kept is the longest that the prompts seen so far all start
    with (shortened by slicing, as later prompts share less of it: a causal model's keys/values of a prefix
    do not depend on what follows), cut so that every prompt keeps at least one token to prefill (its
    next-token logits), and used when it is at least `min_tokens` long; prompts that share fewer of its
    tokens get a prefix of their own. `prefilled_tokens` counts the prefix's own prefills.
    """

    def __init__(self, min_tokens: int = SHARED_PREFIX_MIN_TOKENS) -> None:
        self.min_tokens = min_tokens
        self.tokens: list[int] = []
        self.prefilled_tokens = 0
        self._layers: list[tuple[torch.Tensor, torch.Tensor]] = []  # per layer [1, kv_heads, len(tokens), dim]

    def prepare(self, model: Any, prompts: Sequence[Sequence[int]], kwarg: str) -> int:
        """How many leading tokens of every prompt in `prompts` the cached prefix holds (0: none usable),
        prefilling or shortening the prefix first."""
        common = _common_prefix(prompts)[:min(len(p) for p in prompts) - 1]
        kept = _common_prefix([self.tokens, common]) if self.tokens else []
        if len(kept) >= self.min_tokens:
            self._shorten(len(kept))
        elif len(common) >= self.min_tokens:
            self._prefill(model, common, kwarg)
        else:
            return 0
        return len(self.tokens)

    def fresh_cache(self) -> Any:
        """A new DynamicCache holding a copy of the prefix's keys/values (the prompt's remainder appends to it)."""
        from transformers import DynamicCache

        cache = DynamicCache()
        for layer, (keys, values) in enumerate(self._layers):
            cache.update(keys.clone(), values.clone(), layer)
        return cache

    def _prefill(self, model: Any, tokens: list[int], kwarg: str) -> None:
        from transformers import DynamicCache

        cache = DynamicCache()
        last_logits(model, torch.tensor([tokens], device=next(model.parameters()).device), cache, kwarg)
        self._layers = [_layer_kv(cache, layer) for layer in range(_num_layers(cache))]
        self.tokens = list(tokens)
        self.prefilled_tokens += len(tokens)

    def _shorten(self, length: int) -> None:
        if length < len(self.tokens):
            self._layers = [(k[:, :, :length].clone(), v[:, :, :length].clone()) for k, v in self._layers]
            self.tokens = self.tokens[:length]


# ------------------------------------------------------------------ one prompt cache for n responses
# Sampling n responses per prompt used to repeat each prompt's KV cache n times: every decoding step then
# reads n copies of the same prompt keys/values (at 1K-token prompts x 8 responses, more bytes than the
# model's weights). With `shared_prompt_decoding` the prompt part is stored once per prompt and each
# decoding row keeps only its own generated keys/values; one attention function combines the two.

SHARED_PROMPT_ATTENTION = "solopo_shared_prompt"
"""The transformers attention implementation name the shared-prompt decoding runs under."""

_ACTIVE_PROMPTS: contextvars.ContextVar[SharedPrompts | None] = contextvars.ContextVar("shared_prompts", default=None)


@dataclasses.dataclass
class SharedPrompts:
    """The prompts' keys/values once per prompt, and which prompt each decoding row continues.

    keys/values: per layer [P, kv_heads, width, dim], prompts right-aligned (`stack_left_padded`);
    bias: [P, 1, 1, width], 0 on prompt positions and the dtype's minimum on the left padding;
    owner: [B] the prompt of each decoding row, prompt-major (rows keep their order when some leave).
    """

    keys: list[torch.Tensor]
    values: list[torch.Tensor]
    bias: torch.Tensor
    owner: torch.Tensor

    @classmethod
    def from_cache(cls, cache: Any, mask: torch.Tensor, responses_per_prompt: int) -> SharedPrompts:
        """Takes the prompts' layers out of a stacked cache (`prefill_each`); rows are prompt-major."""
        layers = [_layer_kv(cache, layer) for layer in range(_num_layers(cache))]
        keys, values = [k for k, _ in layers], [v for _, v in layers]
        bias = torch.zeros(mask.shape, dtype=keys[0].dtype, device=mask.device)
        bias = bias.masked_fill(mask == 0, torch.finfo(keys[0].dtype).min)[:, None, None, :]
        owner = torch.arange(mask.shape[0], device=mask.device).repeat_interleave(responses_per_prompt)
        return cls(keys, values, bias, owner)

    def keep_rows(self, keep: list[int]) -> None:
        """Rows `keep` (indices into the current rows) stay; the prompt part itself never changes."""
        self.owner = self.owner[torch.tensor(keep, dtype=torch.long, device=self.owner.device)]

    def row_slots(self) -> tuple[torch.Tensor, int]:
        """(slot [B] of each row in a [P, most rows of one prompt] grid, that most): rows grouped by prompt,
        so that the prompt part is one matmul per prompt instead of one per row."""
        counts = torch.bincount(self.owner, minlength=self.keys[0].shape[0])
        most = int(counts.max())
        first_row = torch.cumsum(counts, 0) - counts  # rows are prompt-major
        rank_in_prompt = torch.arange(len(self.owner), device=self.owner.device) - first_row[self.owner]
        return self.owner * most + rank_in_prompt, most


def _rows_to_groups(rows: torch.Tensor, slots: torch.Tensor, prompts: int, most: int) -> torch.Tensor:
    """[B, kv_heads, g, k] -> [P, kv_heads, most * g, k]; the grid's empty slots hold zeros."""
    grid = rows.new_zeros((prompts * most, *rows.shape[1:]))
    grid[slots] = rows
    _, heads, g, k = rows.shape
    return grid.view(prompts, most, heads, g, k).transpose(1, 2).reshape(prompts, heads, most * g, k)


def _groups_to_rows(groups: torch.Tensor, slots: torch.Tensor, most: int) -> torch.Tensor:
    """The inverse of `_rows_to_groups` for the rows present: [P, kv_heads, most * g, k] -> [B, kv_heads, g, k]."""
    prompts, heads, _, k = groups.shape
    grid = groups.view(prompts, heads, most, -1, k).transpose(1, 2).reshape(prompts * most, heads, -1, k)
    return grid[slots]


def shared_prompt_attention(module: Any, query: torch.Tensor, key: torch.Tensor, value: torch.Tensor,
                            attention_mask: Any, scaling: float | None = None, **kwargs: Any) -> tuple[torch.Tensor, None]:
    """Attention of one new token per row over its prompt (shared, `SharedPrompts`) and its own generated
    tokens (`key`/`value`: [B, kv_heads, t, dim], this row's cache). Returns ([B, 1, heads, dim], None) as
    transformers' attention functions do. Outside `shared_prompt_decoding` it is transformers' SDPA."""
    prompts = _ACTIVE_PROMPTS.get()
    if prompts is None:
        from transformers.integrations.sdpa_attention import sdpa_attention_forward

        return sdpa_attention_forward(module, query, key, value, attention_mask, scaling=scaling, **kwargs)
    rows, heads, _, dim = query.shape  # one query position per row
    kv_heads = key.shape[1]
    scale = dim ** -0.5 if scaling is None else scaling
    q = query.reshape(rows, kv_heads, heads // kv_heads, dim).float()  # head h reads kv head h // g
    prompt_keys = prompts.keys[module.layer_idx].float()
    slots, most = prompts.row_slots()
    num_prompts = prompt_keys.shape[0]
    prompt_scores = _rows_to_groups(q, slots, num_prompts, most) @ prompt_keys.transpose(-1, -2) * scale
    prompt_scores = prompt_scores + prompts.bias.float()  # [P, kv_heads, most * g, width]
    own_scores = (q @ key.float().transpose(-1, -2)) * scale  # [B, kv_heads, g, t]
    scores = torch.cat([_groups_to_rows(prompt_scores, slots, most), own_scores], dim=-1)
    probs = torch.softmax(scores, dim=-1)
    width = prompt_keys.shape[2]
    from_prompt = _rows_to_groups(probs[..., :width], slots, num_prompts, most) @ prompts.values[module.layer_idx].float()
    out = _groups_to_rows(from_prompt, slots, most) + probs[..., width:] @ value.float()  # [B, kv_heads, g, dim]
    return out.reshape(rows, 1, heads, dim).to(query.dtype), None


def register_shared_prompt_attention() -> None:
    """Registers `shared_prompt_attention` (and SDPA's mask for prefill) with transformers, once."""
    from transformers import AttentionInterface
    from transformers.masking_utils import ALL_MASK_ATTENTION_FUNCTIONS, sdpa_mask

    AttentionInterface.register(SHARED_PROMPT_ATTENTION, shared_prompt_attention)
    ALL_MASK_ATTENTION_FUNCTIONS.register(SHARED_PROMPT_ATTENTION, sdpa_mask)


@contextlib.contextmanager
def shared_prompt_decoding(model: Any, prompts: SharedPrompts) -> Iterator[None]:
    """Within the block the model attends through `prompts` (its forward calls must pass a 4D mask, e.g.
    `row_mask`, which the shared attention ignores); the model's attention implementation is restored after."""
    register_shared_prompt_attention()
    before = model.config._attn_implementation
    token = _ACTIVE_PROMPTS.set(prompts)
    model.config._attn_implementation = SHARED_PROMPT_ATTENTION
    try:
        yield
    finally:
        model.config._attn_implementation = before
        _ACTIVE_PROMPTS.reset(token)


def row_mask(rows: int, device: torch.device) -> torch.Tensor:
    """A placeholder 4D mask [rows, 1, 1, 1]: transformers passes a 4D mask through unchanged instead of
    building one from the cache length (the shared attention knows its own masking)."""
    return torch.ones(rows, 1, 1, 1, dtype=torch.bool, device=device)
