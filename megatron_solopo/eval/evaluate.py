"""The library entry point of evaluation: `evaluate(config, ModelSource(...)) -> (report, paths)`.

A Hugging Face directory is loaded as is (eval.backend=hf) or into a GPTModel (eval.backend=megatron).
A Megatron-Core checkpoint (converted or trained: the marker says which, checkpoint/format.py) is
exported to Hugging Face format in a temporary directory, in the checkpoint's own params dtype
(eval.backend=hf), or loaded into a GPTModel (eval.backend=megatron). Every model is loaded by
`checkpoint.load_model`; the `solopo eval` command line is commands/eval.py.
"""

from __future__ import annotations

import contextlib
import dataclasses
import pathlib
import re
import sys
import tempfile
import time
from collections.abc import Iterator, Sequence
from typing import TYPE_CHECKING, Any
from megatron_solopo.checkpoint.fingerprint import directory_fingerprint
from megatron_solopo.checkpoint.format import read_marker, stored_tokenizer_dir
from megatron_solopo.checkpoint.loader import checkpoint_dtype, checkpoint_preset, load_model
from megatron_solopo.convert.mcore_to_hf import convert_mcore_to_hf
from megatron_solopo.data.contexts import ContextTemplates, config_prompt_examples
from megatron_solopo.data.tokenization import (check_tokenizer_fits_model, load_tokenizer, prompt_token_ids,
                                               tokenizer_fingerprint)
from megatron_solopo.dataclass_yaml import to_dict
from megatron_solopo.eval.config import ruler_task_of
from megatron_solopo.eval.generation import HFGenerator, MegatronGenerator, resolve_device, resolve_dtype
from megatron_solopo.eval.metrics import score_prediction
from megatron_solopo.eval.report import build_report, compare_markdown, plot_comparison, write_report
from megatron_solopo.eval.suites import build_suites
from megatron_solopo.model.config import ModelConfig
from megatron_solopo.model.hf.loading import check_hf_model
from megatron_solopo.parallel.config import ParallelConfig
from megatron_solopo.parallel.session import parallel_session

if TYPE_CHECKING:
    from megatron_solopo.config import ExperimentConfig
    from megatron_solopo.data.config import DataConfig

__all__ = ["ModelSource", "compare_reports", "evaluate"]


@dataclasses.dataclass(frozen=True)
class ModelSource:
    """What to evaluate: a Hugging Face directory or a Megatron-Core checkpoint directory."""

    kind: str
    """hf | megatron."""
    path: str
    """The model directory."""
    tokenizer: str | None = None
    """Tokenizer directory (None: the HF directory; for Megatron checkpoints the tokenizer saved in
    their hf_assets/, else it must be given via --tokenizer or model.tokenizer)."""
    label: str | None = None
    """Name in reports (None: derived from the path)."""

    def __post_init__(self) -> None:
        if self.kind not in ("hf", "megatron"):
            raise ValueError(f"model source kind {self.kind!r} must be hf or megatron")
        if not pathlib.Path(self.path).is_dir():
            raise FileNotFoundError(f"{'--hf-model' if self.kind == 'hf' else '--checkpoint'} {self.path} is not a "
                                    "directory")
        if self.kind == "megatron":
            self.checkpoint_kind()  # fail before loading anything when it is not a checkpoint

    def checkpoint_kind(self) -> str | None:
        """converted | trained for a Megatron checkpoint (from its marker), None for a HF directory."""
        return read_marker(self.path).kind if self.kind == "megatron" else None

    def display_label(self) -> str:
        if self.label:
            return self.label
        path = pathlib.Path(self.path).resolve()
        # run_dir/checkpoints/step_000100 -> run_dir/step_000100: the run name says more than "checkpoints"
        if re.fullmatch(r"(iter|step)[_-]?\d+", path.name) and path.parent.name == "checkpoints":
            return f"{path.parent.parent.name}/{path.name}"
        return path.name


def _checkpoint_step(path: str) -> int | None:
    match = re.search(r"(?:iter|step)[_-]?(\d+)$", pathlib.Path(path).resolve().name)
    return int(match.group(1)) if match else None


def compare_reports(reports: Sequence[dict], output_dir: str) -> tuple[str, dict[str, str]]:
    """Writes compare.md (and compare.png when the reports have length data); returns (table, paths)."""
    out = pathlib.Path(output_dir)
    out.mkdir(parents=True, exist_ok=True)
    table = compare_markdown(reports)
    (out / "compare.md").write_text(table, encoding="utf-8")
    paths = {"markdown": str(out / "compare.md")}
    plot = plot_comparison(reports, out / "compare.png")
    if plot:
        paths["plot"] = plot
    return table, paths


def _progress(enabled: bool):
    from tqdm import tqdm

    def factory(total: int, desc: str):
        return tqdm(total=total, desc=desc, unit="q", disable=not enabled, file=sys.stderr, dynamic_ncols=True)

    return factory


# ------------------------------------------------------------------------------------------ models
def _load_megatron_model(config: ExperimentConfig, source: ModelSource, hf_dir: str | None, dtype: Any):
    """A single-process GPTModel (TP = PP = CP = 1) from a HF directory or a Megatron-Core checkpoint.

    The experiment's parallel section describes training and is not used: a Megatron checkpoint saved
    with any layout loads at tp=pp=cp=1 (dist_checkpointing reshards).
    """
    names = {"torch.float32": "fp32", "torch.bfloat16": "bf16", "torch.float16": "fp16"}
    weights = {"hf_model": hf_dir} if source.kind == "hf" else {"checkpoint": source.path}
    model = ModelConfig(params_dtype=names[str(dtype)], attention_backend=config.model.attention_backend, **weights)
    return load_model(model, ParallelConfig())[0]


def _megatron_session(needed: bool):
    """A single-process Megatron parallel state for the duration of the eval (torn down only if created
    here), or nothing when no Megatron model is involved."""
    if not needed:
        return contextlib.nullcontext()

    return parallel_session(ParallelConfig())


@contextlib.contextmanager
def _hf_dir_for(source: ModelSource, progress: bool) -> Iterator[str]:
    """The HF directory to load: the source itself, or a temporary export of a Megatron checkpoint in the
    checkpoint's own params dtype (an 8B bf16 model: 16 GB of temporary files, not 32 GB in fp32)."""
    if source.kind == "hf":
        yield source.path
        return

    with tempfile.TemporaryDirectory(prefix="solopo-eval-hf-") as tmp:
        log_fn = (lambda msg: print(msg, file=sys.stderr)) if progress else (lambda msg: None)
        log_fn(f"exporting {source.path} ({source.checkpoint_kind()} checkpoint) to Hugging Face format in {tmp}")
        convert_mcore_to_hf(source.path, tmp, dtype=checkpoint_dtype(source.path) or "fp32", log=log_fn)
        yield tmp


def _tokenizer_dir(source: ModelSource, hf_dir: str | None) -> str:
    if source.tokenizer:
        return source.tokenizer
    if hf_dir is not None:
        return hf_dir
    stored = stored_tokenizer_dir(source.path)
    if stored is not None:
        return str(stored)
    raise ValueError(f"no tokenizer for Megatron checkpoint {source.path}: pass --tokenizer DIR (or set "
                     "model.tokenizer) with the tokenizer of the model it was trained from")


def _check_model_and_tokenizer(source: ModelSource, tokenizer: Any, tokenizer_path: str) -> None:
    """An HF directory's config.json must match its weights (`check_hf_model`), and the tokenizer must fit the
    model: no more tokens than its vocabulary, and the model's own tokenizer (its HF directory's, or the one
    saved with the checkpoint) when it carries one (data.tokenization.check_tokenizer_fits_model)."""
    if source.kind == "hf":
        vocab, own, what = check_hf_model(source.path).vocab_size, source.path, f"--hf-model {source.path}"
    else:
        vocab, own = checkpoint_preset(source.path).vocab_size, stored_tokenizer_dir(source.path)
        what = f"--checkpoint {source.path}"
    check_tokenizer_fits_model(tokenizer, tokenizer_path, vocab, what, own)


def _build_generator(config: ExperimentConfig, source: ModelSource, hf_dir: str | None, tokenizer: Any):
    ev = config.eval
    device = resolve_device(ev.device)
    dtype = resolve_dtype(ev.dtype, device)
    eos_ids = _eos_ids(tokenizer)
    pad_id = tokenizer.pad_token_id
    if ev.backend == "hf":
        generator = HFGenerator.from_pretrained(hf_dir, eos_ids, pad_id, ev.max_new_tokens, ev.batch_size, device,
                                                dtype)
        return generator, device, dtype
    model = _load_megatron_model(config, source, hf_dir, dtype).to(device=device)
    vocab = getattr(model, "vocab_size", None) or len(tokenizer)
    generator = MegatronGenerator(model, eos_ids, pad_id, ev.max_new_tokens, ev.batch_size, vocab,
                                  decode=ev.megatron_decode, tokenizer=tokenizer)
    return generator, device, dtype


def _eos_ids(tokenizer: Any) -> list[int]:
    eos = tokenizer.eos_token_id
    ids = eos if isinstance(eos, list) else [eos] if eos is not None else []
    if not ids:
        raise ValueError(f"tokenizer {getattr(tokenizer, 'name_or_path', '')!r} has no eos_token; greedy decoding "
                         "needs one to stop (set eos_token in its tokenizer_config.json)")
    return [int(i) for i in ids]


def _prompt_config(data: DataConfig) -> dict[str, Any]:
    return {"doc_template": data.doc_template, "doc_separator": data.doc_separator,
            "prompt_template": data.prompt_template, "system_prompt": data.system_prompt,
            "use_chat_template": data.use_chat_template, "num_prompt_examples": data.num_prompt_examples,
            "answer_regex": data.answer_regex, "max_answer_words": data.max_answer_words}


def _check_answer_words(ev: Any, data: DataConfig) -> None:
    """A ruler suite whose complete answer has more words than data.max_answer_words could score only 0."""
    if ev.answer_extraction != "final_answer" or data.max_answer_words is None:
        return
    for suite in ev.suites:
        task = ruler_task_of(suite)
        if task is not None and ev.ruler_spec(task).min_answer_words > data.max_answer_words:
            raise ValueError(f"eval suite {suite}: a complete answer lists {ev.ruler_spec(task).min_answer_words} "
                             f"values, more than data.max_answer_words={data.max_answer_words} (longer final answers "
                             "score 0); raise data.max_answer_words or set it to null")


# ------------------------------------------------------------------------------------------ evaluate
def evaluate(config: ExperimentConfig, source: ModelSource, progress: bool = True) -> tuple[dict, dict[str, str]]:
    """Builds the suites, generates greedily, scores, and writes the report; returns (report, paths).

    `config`'s eval section says what to run; its data section renders the prompts exactly as
    training did.
    """
    ev, data = config.eval, config.data
    _check_answer_words(ev, data)
    started = time.perf_counter()
    make_bar = _progress(progress)
    needs_hf_dir = ev.backend == "hf" or source.kind == "hf"
    with _megatron_session(ev.backend == "megatron" or source.kind == "megatron"), \
            _hf_dir_for(source, progress) if needs_hf_dir else contextlib.nullcontext(None) as hf_dir:
        tokenizer_path = _tokenizer_dir(source, hf_dir)
        tokenizer = load_tokenizer(tokenizer_path)
        built = build_suites(ev, tokenizer, ContextTemplates.from_config(data), make_bar)
        if not built.items:
            raise ValueError(f"no eval items could be built (skipped: {built.skipped}); lower eval.context_lengths "
                             "or check eval.jsonl_paths")
        examples = config_prompt_examples(data)
        prompts = [prompt_token_ids(tokenizer, item.prompt, data.system_prompt, data.use_chat_template, examples)
                   for item in built.items]
        seconds_build = time.perf_counter() - started
        _check_model_and_tokenizer(source, tokenizer, tokenizer_path)
        generator, device, dtype = _build_generator(config, source, hf_dir, tokenizer)
        bar = make_bar(len(prompts), f"generating ({generator.path})")
        outputs = generator.generate(prompts, progress=bar)
        bar.close()
    records = []
    for item, prompt_ids, output in zip(built.items, prompts, outputs):
        prediction = tokenizer.decode(output, skip_special_tokens=True)
        scores = score_prediction(prediction, item.answers, ev.answer_extraction, data.answer_regex,
                                  data.max_answer_words, item.answer_match)
        records.append({"suite": item.suite, "item_id": item.item_id, "source_id": item.source_id,
                        "question": item.question, "answers": item.answers, "context_length": item.context_length,
                        "depth": item.depth, "prompt_tokens": item.prompt_tokens, "input_tokens": len(prompt_ids),
                        "prediction": prediction, **scores, "generated_tokens": len(output), "meta": item.meta})
    stats = generator.stats
    report = build_report(
        items=records, skipped=built.skipped,
        model={"label": source.display_label(), "kind": source.kind, "path": str(pathlib.Path(source.path).resolve()),
               "fingerprint": directory_fingerprint(source.path), "step": _checkpoint_step(source.path),
               "tokenizer": str(pathlib.Path(tokenizer_path).resolve()),
               "tokenizer_fingerprint": tokenizer_fingerprint(tokenizer)},
        generation={"backend": ev.backend, "path": generator.path, "device": str(device),
                    "dtype": str(dtype).replace("torch.", ""), "max_new_tokens": ev.max_new_tokens,
                    "batch_size": ev.batch_size, "greedy": True,
                    "shared_prefix_tokens": getattr(generator, "shared_prefix_tokens", 0)},
        config={"eval": to_dict(ev), "prompt": _prompt_config(data)},
        timing={"seconds_total": round(time.perf_counter() - started, 3), "seconds_build": round(seconds_build, 3),
                "seconds_generate": round(stats.seconds, 3), "num_prompts": stats.num_prompts,
                "prompt_tokens": stats.prompt_tokens, "generated_tokens": stats.generated_tokens,
                "generated_tokens_per_second": round(stats.generated_tokens_per_second, 3)},
        long_suites=ev.long_suites)
    paths = write_report(report, ev.output_dir)
    return report, paths
