"""Tokenization of preference pairs for training, with an Arrow cache.

Tokenized sample format (one row per pair record; consumed by the trainer)
---------------------------------------------------------------------------
A ``datasets.Dataset`` whose rows are dicts with

* ``"id"`` (str): the pair record's id.
* for each role in ``ROLES = ("short_chosen", "short_rejected", "long_chosen", "long_rejected")``:

  - ``f"{role}_input_ids"`` (list[int], stored as int32): prompt tokens + response tokens + EOS, where
    the prompt is the short or long context rendered as the user turn by the tokenizer's chat
    template (with ``data.system_prompt`` if set, and the assistant generation prompt), and the
    response is the chosen or rejected text followed by ``tokenizer.eos_token_id``.
  - ``f"{role}_loss_mask"`` (list[int], stored as int8, same length): 1 on the response tokens
    including the EOS, 0 on the prompt. The trainer shifts: the log-prob of token t is computed
    from the hidden state at t-1, so position 0 is never scored (it is always prompt).

No padding and no truncation: every sequence is complete, and a sequence longer than the maximum
length is an error (``data.on_too_long=error``) or is dropped with the whole pair and counted
(``skip``). The response tokens are identical across the short and long sequences of the same
response (only the prompt differs), which SoLo-RA relies on: r(x_short, y_w) vs r(x_long, y_w).

SoLoPO training uses short_chosen, short_rejected and long_chosen; long_rejected serves the long-X and
expand-long baselines.

Cache: ``{data.cache_dir}/tokenized-{key}/`` holds ``data.arrow`` (an Arrow stream,
memory-mapped on load) and ``stats.json``; the key hashes the tokenizer (vocabulary, merges, special
tokens, chat template), the tokenization fields of the config and the pair records, so any change
rebuilds and nothing stale is reused. The directory appears atomically (built under a temporary name).
"""

from __future__ import annotations

import errno
import hashlib
import json
import logging
import os
import pathlib
import shutil
import tempfile
from collections.abc import Iterator, Mapping, Sequence
from typing import Any

from megatron_solopo.console import relative_path_hint
from megatron_solopo.data.config import DataConfig
from megatron_solopo.data.contexts import config_prompt_examples
from megatron_solopo.data.records import read_pair_records, validate_pair_record

__all__ = ["ROLES", "CACHE_FORMAT_VERSION", "check_tokenizer_fits_model", "load_tokenizer", "prompt_token_ids",
           "tokenize_pair",
           "sample_from_token_ids", "load_tokenized_pairs", "tokenizer_fingerprint", "resolve_max_seq_len",
           "tokenized_features"]

logger = logging.getLogger(__name__)

ROLES: tuple[str, ...] = ("short_chosen", "short_rejected", "long_chosen", "long_rejected")
CACHE_FORMAT_VERSION = 1
# tokenizers without a real limit report model_max_length as a huge sentinel (int(1e30))
_NO_LIMIT = 10**7
_WRITE_BATCH = 256


def load_tokenizer(path: str | os.PathLike) -> Any:
    """A Hugging Face tokenizer from a model/tokenizer directory, or from a SentencePiece ``.model`` file."""
    import transformers

    path = pathlib.Path(path)
    if path.is_dir():
        if not any(any(path.glob(pattern)) for pattern in _TOKENIZER_FILES):
            raise FileNotFoundError(f"{path} holds no tokenizer files (tokenizer.json, tokenizer_config.json, "
                                    "tokenizer.model, vocab.json); give the model's tokenizer directory (model.tokenizer "
                                    "or --tokenizer)" + relative_path_hint(path))
        try:
            return transformers.AutoTokenizer.from_pretrained(str(path))
        except Exception as err:  # noqa: BLE001 - transformers raises anything on a bad tokenizer/config file
            first = " ".join(str(err).split())[:200]
            raise ValueError(f"the tokenizer in {path} cannot be loaded ({type(err).__name__}: {first}); give the "
                             "model's own tokenizer directory (model.tokenizer or --tokenizer)") from None
    if path.is_file() and path.suffix == ".model":
        # a bare SentencePiece model loads as a Llama-style tokenizer (<s>, </s>, <unk>); it has no chat
        # template, so use data.use_chat_template=false with it. from_pretrained on a directory holding
        # `tokenizer.model` works across transformers 4.x (slow) and 5.x (converted to fast).
        with tempfile.TemporaryDirectory() as tmp:
            shutil.copyfile(path, pathlib.Path(tmp) / "tokenizer.model")
            return transformers.LlamaTokenizer.from_pretrained(tmp)
    raise FileNotFoundError(f"tokenizer {path} not found: give a Hugging Face model/tokenizer directory or a "
                            "SentencePiece .model file" + relative_path_hint(path))


_TOKENIZER_FILES = ("tokenizer*", "vocab.json", "*.model", "vocab.txt")


def check_tokenizer_fits_model(tokenizer: Any, tokenizer_path: str | os.PathLike, vocab_size: int, model: str,
                               own_tokenizer_dir: str | os.PathLike | None = None) -> None:
    """ValueError naming both when `tokenizer` cannot be the tokenizer of `model` (a description, e.g.
    "--hf-model DIR"): it has more tokens than the model's vocabulary (ids would index past the embedding),
    or the model carries its own tokenizer (`own_tokenizer_dir`) with another vocabulary (the model's ids would
    decode to other text: every score 0)."""
    if len(tokenizer) > vocab_size:
        raise ValueError(f"the tokenizer at {tokenizer_path} has {len(tokenizer)} tokens but {model} has a vocabulary "
                         f"of {vocab_size}; use the model's own tokenizer (model.tokenizer / --tokenizer)")
    if own_tokenizer_dir is None or pathlib.Path(own_tokenizer_dir).resolve() == pathlib.Path(tokenizer_path).resolve():
        return
    try:
        own = load_tokenizer(own_tokenizer_dir)
    except (OSError, ValueError):
        return  # nothing reliable to compare with
    if own.get_vocab() != tokenizer.get_vocab():
        raise ValueError(f"the tokenizer at {tokenizer_path} ({len(tokenizer)} tokens) is not the one {model} was "
                         f"trained with ({own_tokenizer_dir}, {len(own)} tokens, another vocabulary); drop "
                         "--tokenizer / model.tokenizer to use the model's own, or give the same one")


def prompt_token_ids(tokenizer: Any, prompt: str, system_prompt: str | None, use_chat_template: bool,
                     examples: Sequence[tuple[str, str]] = ()) -> list[int]:
    """Token ids of the prompt as the model sees it right before its response.

    With the chat template: [system] + one user/assistant turn pair per worked example + the user turn
    + the assistant generation prompt. Without: the system prompt, the examples as "prompt\nresponse"
    blocks and the prompt, as plain text with the tokenizer's own special tokens (e.g. BOS).
    `examples`: (user prompt, assistant response) pairs (`data.contexts.config_prompt_examples`).
    """
    if use_chat_template:
        if not getattr(tokenizer, "chat_template", None):
            raise ValueError(f"tokenizer {getattr(tokenizer, 'name_or_path', '')!r} has no chat template; give a "
                             "tokenizer with one, or set data.use_chat_template=false for plain-text prompts")
        messages = [{"role": "system", "content": system_prompt}] if system_prompt else []
        for user, assistant in examples:
            messages += [{"role": "user", "content": user}, {"role": "assistant", "content": assistant}]
        messages.append({"role": "user", "content": prompt})
        text = tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)
        # the rendered template already holds its special tokens (BOS included when it wants one)
        return list(tokenizer(text, add_special_tokens=False)["input_ids"])
    blocks = ([system_prompt] if system_prompt else []) + [f"{user}\n{assistant}" for user, assistant in examples]
    text = "\n\n".join([*blocks, prompt])
    return list(tokenizer(text, add_special_tokens=True)["input_ids"])


def _response_ids(tokenizer: Any, response: str) -> list[int]:
    eos = tokenizer.eos_token_id
    if eos is None:
        raise ValueError(f"tokenizer {getattr(tokenizer, 'name_or_path', '')!r} has no eos_token; responses end "
                         "with EOS so the model learns to stop: set tokenizer.eos_token")
    return list(tokenizer(response, add_special_tokens=False)["input_ids"]) + [eos]


def resolve_max_seq_len(tokenizer: Any, config: DataConfig) -> int | None:
    """data.max_seq_len_tokens, else the tokenizer's model_max_length when it is a real limit."""
    if config.max_seq_len_tokens is not None:
        return config.max_seq_len_tokens
    limit = getattr(tokenizer, "model_max_length", None)
    return int(limit) if isinstance(limit, int) and limit < _NO_LIMIT else None


class SequenceTooLong(ValueError):
    """A tokenized sequence exceeds the maximum length."""


def sample_from_token_ids(sample_id: str, x_short: Sequence[int], x_long: Sequence[int], y_chosen: Sequence[int],
                          y_rejected: Sequence[int]) -> dict[str, Any]:
    """One tokenized sample (the format above) from prompt and response token ids: each role's input is
    its prompt then its response, and only the response is in the loss mask. For synthetic batches
    (tests, benchmarks, the memory dry run) that skip text and tokenizers."""
    sample: dict[str, Any] = {"id": sample_id}
    pieces = {"short_chosen": (x_short, y_chosen), "short_rejected": (x_short, y_rejected),
              "long_chosen": (x_long, y_chosen), "long_rejected": (x_long, y_rejected)}
    for role, (prompt, response) in pieces.items():
        sample[f"{role}_input_ids"] = [*prompt, *response]
        sample[f"{role}_loss_mask"] = [0] * len(prompt) + [1] * len(response)
    return sample


def tokenize_pair(record: Mapping[str, Any], tokenizer: Any, config: DataConfig,
                  max_seq_len: int | None = None) -> dict[str, Any]:
    """One pair record -> one tokenized sample (format in the module docstring).

    Raises SequenceTooLong naming the id, role and lengths when a sequence exceeds `max_seq_len`.
    """
    examples = config_prompt_examples(config)
    prompts = {ctx: prompt_token_ids(tokenizer, record[f"{ctx}_context"], config.system_prompt,
                                     config.use_chat_template, examples) for ctx in ("short", "long")}
    responses = {kind: _response_ids(tokenizer, record[kind]) for kind in ("chosen", "rejected")}
    sample: dict[str, Any] = {"id": record["id"]}
    for role in ROLES:
        ctx, kind = role.split("_")
        prompt, response = prompts[ctx], responses[kind]
        length = len(prompt) + len(response)
        if max_seq_len is not None and length > max_seq_len:
            raise SequenceTooLong(
                f"pair {record['id']!r}: {role} has {length} tokens ({len(prompt)} prompt + {len(response)} response) "
                f"> max length {max_seq_len}; raise data.max_seq_len_tokens, lower data.long_target_tokens, "
                "or set data.on_too_long=skip to drop such pairs")
        sample[f"{role}_input_ids"] = prompt + response
        sample[f"{role}_loss_mask"] = [0] * len(prompt) + [1] * len(response)
    return sample


def tokenized_features() -> Any:
    """The `datasets.Features` of a tokenized sample."""
    import datasets

    features = {"id": datasets.Value("string")}
    for role in ROLES:
        features[f"{role}_input_ids"] = datasets.Sequence(datasets.Value("int32"))
        features[f"{role}_loss_mask"] = datasets.Sequence(datasets.Value("int8"))
    return datasets.Features(features)


# ------------------------------------------------------------------------------------------ cache key
def tokenizer_fingerprint(tokenizer: Any) -> str:
    """Content hash of a tokenizer: vocabulary/merges, special tokens, chat template, class."""
    h = hashlib.sha256()
    backend = getattr(tokenizer, "backend_tokenizer", None)
    if backend is not None:
        h.update(backend.to_str().encode())
    else:
        h.update(json.dumps(sorted(tokenizer.get_vocab().items())).encode())
    extras = {"class": type(tokenizer).__name__, "chat_template": getattr(tokenizer, "chat_template", None),
              "special": {k: str(v) for k, v in sorted(tokenizer.special_tokens_map.items())},
              "eos": tokenizer.eos_token_id, "bos": getattr(tokenizer, "bos_token_id", None),
              "add_bos": getattr(tokenizer, "add_bos_token", None)}
    h.update(json.dumps(extras, sort_keys=True, default=str).encode())
    return h.hexdigest()


def _records_fingerprint(path: pathlib.Path | None, records: Sequence[Mapping[str, Any]]) -> str:
    h = hashlib.sha256()
    if path is not None:
        with path.open("rb") as f:
            for chunk in iter(lambda: f.read(1 << 20), b""):
                h.update(chunk)
    else:
        for record in records:
            h.update(json.dumps(record, sort_keys=True, ensure_ascii=False).encode())
            h.update(b"\n")
    return h.hexdigest()


def _cache_key(tokenizer: Any, config: DataConfig, max_seq_len: int | None, records_hash: str) -> str:
    settings = {"version": CACHE_FORMAT_VERSION, "use_chat_template": config.use_chat_template,
                "system_prompt": config.system_prompt, "max_seq_len": max_seq_len,
                "prompt_examples": config_prompt_examples(config),
                "on_too_long": config.on_too_long}
    h = hashlib.sha256()
    for part in (tokenizer_fingerprint(tokenizer), json.dumps(settings, sort_keys=True), records_hash):
        h.update(part.encode())
        h.update(b"\0")
    return h.hexdigest()[:24]


# ------------------------------------------------------------------------------------------ building
def _tokenized_rows(records: Sequence[Mapping[str, Any]], tokenizer: Any, config: DataConfig,
                    max_seq_len: int | None, stats: dict[str, Any]) -> Iterator[dict[str, Any]]:
    for record in records:
        try:
            sample = tokenize_pair(record, tokenizer, config, max_seq_len)
        except SequenceTooLong as err:
            if config.on_too_long == "error":
                raise
            stats["skipped_too_long"] += 1
            if len(stats["skipped_ids"]) < 20:
                stats["skipped_ids"].append(record["id"])
            logger.debug("skipping: %s", err)
            continue
        stats["num_samples"] += 1
        for role in ROLES:
            stats[f"max_{role}_tokens"] = max(stats[f"max_{role}_tokens"], len(sample[f"{role}_input_ids"]))
        yield sample


def _write_arrow(rows: Iterator[dict[str, Any]], path: pathlib.Path) -> None:
    import pyarrow as pa

    schema = tokenized_features().arrow_schema
    with pa.OSFile(str(path), "wb") as sink, pa.ipc.new_stream(sink, schema) as writer:
        batch: list[dict[str, Any]] = []
        for row in rows:
            batch.append(row)
            if len(batch) == _WRITE_BATCH:
                writer.write_batch(pa.RecordBatch.from_pylist(batch, schema=schema))
                batch = []
        if batch:
            writer.write_batch(pa.RecordBatch.from_pylist(batch, schema=schema))


def _build_cache(records: Sequence[Mapping[str, Any]], tokenizer: Any, config: DataConfig,
                 max_seq_len: int | None, final_dir: pathlib.Path) -> None:
    tmp_dir = final_dir.with_name(f".{final_dir.name}.tmp-{os.getpid()}")
    shutil.rmtree(tmp_dir, ignore_errors=True)
    tmp_dir.mkdir(parents=True)
    stats: dict[str, Any] = {"num_records": len(records), "num_samples": 0, "skipped_too_long": 0,
                             "skipped_ids": [], "max_seq_len": max_seq_len,
                             **{f"max_{role}_tokens": 0 for role in ROLES}}
    try:
        _write_arrow(_tokenized_rows(records, tokenizer, config, max_seq_len, stats), tmp_dir / "data.arrow")
        if stats["num_samples"] == 0:
            raise ValueError(f"no pair survived tokenization ({stats['skipped_too_long']} over max length "
                             f"{max_seq_len}); raise data.max_seq_len_tokens or shorten the contexts")
        (tmp_dir / "stats.json").write_text(json.dumps(stats, indent=2) + "\n", encoding="utf-8")
        try:
            os.replace(tmp_dir, final_dir)
        except OSError:  # another process finished the same cache first: theirs is identical
            if not (final_dir / "stats.json").is_file():
                raise
    except OSError as err:
        if err.filename is not None:
            raise
        # Arrow's write errors name no file ("[Errno 28] Error writing bytes to file"): say which cache it was
        text = " ".join(str(err).split())[:200]
        code = err.errno or (errno.ENOSPC if "No space left" in text or "Errno 28" in text else errno.EIO)
        raise OSError(code, f"writing the tokenized-data cache (data.cache_dir) failed: {text}", str(final_dir)) from None
    finally:
        shutil.rmtree(tmp_dir, ignore_errors=True)


def load_tokenized_pairs(path_or_records: str | os.PathLike | Sequence[Mapping[str, Any]], tokenizer: Any,
                         config: DataConfig) -> Any:
    """Tokenized pairs (format in the module docstring) as a memory-mapped `datasets.Dataset`.

    Args:
        path_or_records: a pairs JSONL file (validated line by line, errors name file:line) or a list
            of pair records (validated, errors name records[i]).
        tokenizer: the Hugging Face tokenizer of the model being trained.
        config: the data section; uses use_chat_template, system_prompt, max_seq_len_tokens,
            on_too_long and cache_dir.

    The result is cached under data.cache_dir; a second call with the same tokenizer, settings and
    records loads the cache without tokenizing. ``dataset.info.description`` holds the build stats
    as JSON (including how many pairs were skipped as too long). In multi-process training, call it
    on one rank first (then barrier) so the others only load.
    """
    if isinstance(path_or_records, (str, os.PathLike)):
        path = pathlib.Path(path_or_records)
        records = read_pair_records(path)
    else:
        path = None
        records = [validate_pair_record(r, f"records[{i}]") for i, r in enumerate(path_or_records)]
        _check_unique_ids(records)
    max_seq_len = resolve_max_seq_len(tokenizer, config)
    key = _cache_key(tokenizer, config, max_seq_len, _records_fingerprint(path, records))
    final_dir = pathlib.Path(config.cache_dir) / f"tokenized-{key}"
    if not (final_dir / "stats.json").is_file():
        logger.info("tokenizing %d pairs into %s", len(records), final_dir)
        _build_cache(records, tokenizer, config, max_seq_len, final_dir)
    stats, dataset = _open_cache(final_dir, path)
    if stats["skipped_too_long"]:
        logger.warning("%d of %d pairs skipped: a sequence exceeds %s tokens (data.on_too_long=skip); ids: %s",
                       stats["skipped_too_long"], stats["num_records"], max_seq_len, stats["skipped_ids"])
    return dataset


def _open_cache(final_dir: pathlib.Path, source: pathlib.Path | None):
    """(stats, dataset) of a finished cache directory, checked; a damaged one is named with the fix."""
    import datasets
    import pyarrow

    try:
        stats = json.loads((final_dir / "stats.json").read_text(encoding="utf-8"))
        info = datasets.DatasetInfo(description=json.dumps(stats), features=tokenized_features())
        dataset = datasets.Dataset.from_file(str(final_dir / "data.arrow"), info=info)
        rows = len(dataset)
        if rows != stats["num_samples"]:
            raise ValueError(f"{rows} rows where stats.json says {stats['num_samples']}")
    except (OSError, ValueError, KeyError, TypeError, pyarrow.ArrowException) as err:
        # a truncated file (disk full, a copy cut short) or one edited by hand: nothing to do with the
        # tokenizer or the pairs, and rebuilding is cheap
        raise ValueError(f"the tokenized-data cache {final_dir} is damaged ({' '.join(str(err).split())[:200]}); "
                         f"delete that directory and run again: it is rebuilt from "
                         f"{source or 'the records'}") from None
    return stats, dataset


def _check_unique_ids(records: Sequence[Mapping[str, Any]]) -> None:
    seen: set[str] = set()
    for i, record in enumerate(records):
        if record["id"] in seen:
            raise ValueError(f"records[{i}]: duplicate id {record['id']!r}; ids must be unique")
        seen.add(record["id"])
