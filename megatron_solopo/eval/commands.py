"""`solopo eval`: long-context QA evaluation of a checkpoint, and side-by-side comparison of reports.

    solopo eval --hf-model DIR [--config X.yaml] [section.key=value ...]
    solopo eval --checkpoint DIR [--config X.yaml] [section.key=value ...]
    solopo eval --compare a/report.json b/report.json          # table + plot only
    solopo eval --hf-model DIR --compare base/report.json       # evaluate, then compare

A Megatron-Core checkpoint is evaluated by exporting it to Hugging Face format in a temporary
directory (eval.backend=hf, the default) or by loading it into a GPTModel (eval.backend=megatron).
`evaluate()` is the library entry point used by the demo.
"""

from __future__ import annotations

import argparse
import contextlib
import dataclasses
import hashlib
import logging
import pathlib
import re
import sys
import tempfile
import time
from collections.abc import Iterator, Sequence
from typing import Any

__all__ = ["ModelSource", "add_arguments", "run", "evaluate", "compare_reports", "model_fingerprint"]

log = logging.getLogger(__name__)

_WEIGHT_SUFFIXES = (".safetensors", ".bin", ".distcp", ".pt", ".json", ".model")
_SAMPLE_BYTES = 1 << 20


@dataclasses.dataclass(frozen=True)
class ModelSource:
    """What to evaluate: a Hugging Face directory or a Megatron-Core checkpoint directory."""

    kind: str
    """hf | megatron."""
    path: str
    """The model directory."""
    tokenizer: str | None = None
    """Tokenizer directory (None: the HF directory; for Megatron checkpoints it must be given,
    via --tokenizer or model.tokenizer, unless the checkpoint directory holds tokenizer files)."""
    label: str | None = None
    """Name in reports (None: derived from the path)."""

    def __post_init__(self) -> None:
        if self.kind not in ("hf", "megatron"):
            raise ValueError(f"model source kind {self.kind!r} must be hf or megatron")
        if not pathlib.Path(self.path).is_dir():
            raise FileNotFoundError(f"{'--hf-model' if self.kind == 'hf' else '--checkpoint'} {self.path} is not a "
                                    "directory")
        if self.kind == "megatron":
            _megatron_kind(self.path)  # fail before loading anything when it is not a checkpoint

    def display_label(self) -> str:
        if self.label:
            return self.label
        path = pathlib.Path(self.path).resolve()
        # run_dir/checkpoints/step_000100 -> run_dir/step_000100: the run name says more than "checkpoints"
        if re.fullmatch(r"(iter|step)[_-]?\d+", path.name) and path.parent.name == "checkpoints":
            return f"{path.parent.parent.name}/{path.name}"
        return path.name


def model_fingerprint(path: str | pathlib.Path) -> str:
    """A cheap identity of a model directory: sha256 over file names, sizes and the first and last
    MiB of each weight/config file. Two different checkpoints differ in it with near certainty, and an
    8B model is fingerprinted in well under a second (reading whole weights would take minutes)."""
    h = hashlib.sha256()
    root = pathlib.Path(path)
    for file in sorted(p for p in root.rglob("*") if p.is_file() and p.suffix in _WEIGHT_SUFFIXES):
        size = file.stat().st_size
        h.update(f"{file.relative_to(root)}\0{size}\0".encode())
        with file.open("rb") as f:
            h.update(f.read(_SAMPLE_BYTES))
            if size > 2 * _SAMPLE_BYTES:
                f.seek(size - _SAMPLE_BYTES)
                h.update(f.read(_SAMPLE_BYTES))
    return h.hexdigest()


def _checkpoint_step(path: str) -> int | None:
    match = re.search(r"(?:iter|step)[_-]?(\d+)$", pathlib.Path(path).resolve().name)
    return int(match.group(1)) if match else None


# ------------------------------------------------------------------------------------------ CLI
def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--config", help="experiment YAML (its eval, data and model sections are used); "
                                         "default: built-in defaults")
    source = parser.add_mutually_exclusive_group()
    source.add_argument("--hf-model", metavar="DIR", help="Hugging Face model directory to evaluate")
    source.add_argument("--checkpoint", metavar="DIR",
                        help="Megatron-Core checkpoint directory (from solopo train or convert hf-to-mcore)")
    parser.add_argument("--tokenizer", metavar="DIR", help="tokenizer directory (default: the model's)")
    parser.add_argument("--label", help="name of the model in reports and tables (default: directory name)")
    parser.add_argument("--compare", nargs="+", metavar="REPORT",
                        help="report.json files to put side by side (with a model: after evaluating it); "
                             "writes compare.md and compare.png to eval.output_dir")
    parser.add_argument("--no-progress", action="store_true", help="no progress bars")
    parser.add_argument("overrides", nargs="*", metavar="section.key=value",
                        help="config overrides, e.g. eval.num_samples=5 eval.context_lengths=[1024,4096]")


def _model_source(args: argparse.Namespace, config: Any) -> ModelSource | None:
    """--hf-model / --checkpoint; without them the config's model, except with --compare (table only)."""
    tokenizer = args.tokenizer or config.model.tokenizer
    label = args.label or config.eval.label
    if args.hf_model:
        return ModelSource("hf", args.hf_model, tokenizer or args.hf_model, label)
    if args.checkpoint:
        return ModelSource("megatron", args.checkpoint, tokenizer, label)
    if args.compare:
        return None
    if config.model.hf_model:
        return ModelSource("hf", config.model.hf_model, tokenizer or config.model.hf_model, label)
    if config.model.checkpoint:
        return ModelSource("megatron", config.model.checkpoint, tokenizer, label)
    return None


_OVERRIDE = re.compile(r"^[A-Za-z_]\w*(\.[A-Za-z_]\w*)+=")


def run(args: argparse.Namespace) -> int:
    try:
        return _run(args)
    except (ValueError, FileNotFoundError) as err:  # user errors (ConfigError is a ValueError): the message is the fix
        print(f"solopo eval: error: {err}", file=sys.stderr)
        return 1


def _run(args: argparse.Namespace) -> int:
    from megatron_solopo.config import load_config

    # `--compare a.json b.json eval.x=1`: argparse gives the override to --compare; take it back
    overrides = list(args.overrides) + [c for c in args.compare or [] if _OVERRIDE.match(c)]
    args.compare = [c for c in args.compare or [] if not _OVERRIDE.match(c)] or None
    config = load_config(args.config, overrides)
    source = _model_source(args, config)
    if source is None and not args.compare:
        print("solopo eval: nothing to evaluate; give --hf-model DIR or --checkpoint DIR (or model.hf_model / "
              "model.checkpoint in the config), or --compare REPORT.json ...", file=sys.stderr)
        return 2
    reports = []
    if source is not None:
        report, paths = evaluate(config, source, progress=not args.no_progress)
        _print_summary(report, paths)
        reports.append(report)
    if args.compare:
        from megatron_solopo.eval.report import load_report

        reports = [load_report(p) for p in args.compare] + reports
        table, paths = compare_reports(reports, config.eval.output_dir)
        print(table)
        print("comparison written to " + ", ".join(paths.values()))
    return 0


def _print_summary(report: dict, paths: dict[str, str]) -> None:
    overall = report["overall"]
    print(f"{report['model']['label']}: sub-EM {overall['sub_em']:.1f}  EM {overall['em']:.1f}  "
          f"F1 {overall['f1']:.1f}  ({overall['num_items']} items, decoding {report['generation']['path']})")
    for suite, agg in report["suites"].items():
        print(f"  {suite:<12} sub-EM {agg['sub_em']:5.1f}  ({agg['num_items']} items)")
    for suite, reasons in report["skipped"].items():
        if reasons:
            print(f"  {suite}: contexts skipped: " + ", ".join(f"{k} x{v}" for k, v in reasons.items()))
    print("report: " + ", ".join(f"{k} {v}" for k, v in paths.items()))


def compare_reports(reports: Sequence[dict], output_dir: str) -> tuple[str, dict[str, str]]:
    """Writes compare.md (and compare.png when the reports have length data); returns (table, paths)."""
    from megatron_solopo.eval.report import compare_markdown, plot_comparison

    out = pathlib.Path(output_dir)
    out.mkdir(parents=True, exist_ok=True)
    table = compare_markdown(reports)
    (out / "compare.md").write_text(table, encoding="utf-8")
    paths = {"markdown": str(out / "compare.md")}
    plot = plot_comparison(reports, out / "compare.png")
    if plot:
        paths["plot"] = plot
    return table, paths


# ------------------------------------------------------------------------------------------ library
def _progress(enabled: bool):
    from tqdm import tqdm

    def factory(total: int, desc: str):
        return tqdm(total=total, desc=desc, unit="q", disable=not enabled, file=sys.stderr, dynamic_ncols=True)

    return factory


# ------------------------------------------------------------------------------------------ checkpoints
_MARKER = "solopo_checkpoint.json"
_CONVERTED_TOKENIZER = "hf_assets"  # what `solopo convert hf-to-mcore` copies next to the weights
_TRAINED_TOKENIZER = "tokenizer"    # what the trainer saves next to a checkpoint
_TRAINED_CONFIG = "config.yaml"


def _megatron_kind(path: str) -> str:
    """converted (written by `solopo convert hf-to-mcore`) | trained (a training step_N checkpoint)."""
    import json

    marker = pathlib.Path(path) / _MARKER
    if not marker.is_file():
        raise FileNotFoundError(f"{marker} does not exist: {path} is not a complete checkpoint of this project "
                                "(neither `solopo convert hf-to-mcore` output nor a training step_N directory)")
    info = json.loads(marker.read_text(encoding="utf-8"))
    if "preset" in info:
        return "converted"
    if "step" in info and (pathlib.Path(path) / _TRAINED_CONFIG).is_file():
        return "trained"
    raise ValueError(f"{marker} describes neither a converted checkpoint (no 'preset') nor a training "
                     f"checkpoint (no 'step' with {_TRAINED_CONFIG} beside it)")


def _trained_preset(path: str):
    """The architecture of a training checkpoint, resolved from the experiment config saved with it the way
    the trainer resolved it (model.hf_model's config.json, model.checkpoint's marker, or model.preset)."""
    from megatron_solopo.config import load_config
    from megatron_solopo.training.runtime import resolve_preset

    model = load_config(pathlib.Path(path) / _TRAINED_CONFIG).model
    if model.hf_model and not (pathlib.Path(model.hf_model) / "config.json").is_file():
        raise FileNotFoundError(f"training checkpoint {path} started from model.hf_model={model.hf_model}, which is "
                                "not reachable from here; run solopo eval from the directory the training ran in "
                                "(the architecture is read from that config.json)")
    return resolve_preset(model)


def _model_config(config: Any, dtype: Any, **source: Any):
    from megatron_solopo.model.config import ModelConfig

    names = {"torch.float32": "fp32", "torch.bfloat16": "bf16", "torch.float16": "fp16"}
    return ModelConfig(params_dtype=names[str(dtype)], attention_backend=config.model.attention_backend, **source)


def _load_megatron_model(config: Any, source: ModelSource, hf_dir: str | None, dtype: Any):
    """A single-process GPTModel (TP = PP = CP = 1) from a HF directory or a Megatron-Core checkpoint.

    The experiment's parallel section describes training and is not used: a Megatron checkpoint saved
    with any layout loads at tp=pp=cp=1 (dist_checkpointing reshards).
    """
    from megatron_solopo.parallel.session import ensure_parallel
    from megatron_solopo.parallel.config import ParallelConfig

    if source.kind == "hf":
        from megatron_solopo.convert import load_hf_into_mcore

        return load_hf_into_mcore(hf_dir, ParallelConfig(), _model_config(config, dtype, hf_model=hf_dir))
    ensure_parallel(ParallelConfig())
    if _megatron_kind(source.path) == "converted":
        from megatron_solopo.convert import load_mcore_checkpoint, preset_from_checkpoint

        mc = _model_config(config, dtype)
        model = load_mcore_checkpoint(source.path, preset_from_checkpoint(source.path), ParallelConfig(),
                                      params_dtype=mc.params_dtype, attention_backend=mc.attention_backend)
        return model
    from megatron_solopo.model.builder import build_gpt_model
    from megatron_solopo.training.checkpointing import load_model_weights

    preset = _trained_preset(source.path)
    model = build_gpt_model(preset, ParallelConfig(), _model_config(config, dtype, checkpoint=source.path,
                                                                    preset=preset.name))
    load_model_weights(source.path, [model])
    return model


def _megatron_session(needed: bool):
    """A single-process Megatron parallel state for the duration of the eval (torn down only if created
    here), or nothing when no Megatron model is involved."""
    if not needed:
        return contextlib.nullcontext()
    from megatron_solopo.parallel.session import parallel_session
    from megatron_solopo.parallel.config import ParallelConfig

    return parallel_session(ParallelConfig())


@contextlib.contextmanager
def _hf_dir_for(config: Any, source: ModelSource, progress: bool) -> Iterator[str]:
    """The HF directory to load: the source itself, or a temporary export of a Megatron checkpoint."""
    if source.kind == "hf":
        yield source.path
        return
    with tempfile.TemporaryDirectory(prefix="solopo-eval-hf-") as tmp:
        log_fn = (lambda msg: print(msg, file=sys.stderr)) if progress else (lambda msg: None)
        log_fn(f"exporting {source.path} to Hugging Face format in {tmp}")
        if _megatron_kind(source.path) == "converted":
            from megatron_solopo.convert import convert_mcore_to_hf

            convert_mcore_to_hf(source.path, tmp, dtype="fp32", log=log_fn)
        else:
            import torch

            from megatron_solopo.convert.mcore_to_hf import write_hf_checkpoint

            model = _load_megatron_model(config, source, None, torch.float32)
            write_hf_checkpoint(model, _trained_preset(source.path), tmp, "fp32",
                                assets_dir=_checkpoint_tokenizer(source.path))
            del model
        yield tmp


def _checkpoint_tokenizer(path: str) -> str | None:
    """The tokenizer stored with a Megatron checkpoint (hf_assets/ or tokenizer/), if any."""
    for sub in (_TRAINED_TOKENIZER, _CONVERTED_TOKENIZER):
        candidate = pathlib.Path(path) / sub
        if any(candidate.glob("tokenizer*")):
            return str(candidate)
    return None


def _tokenizer_dir(source: ModelSource, hf_dir: str | None) -> str:
    if source.tokenizer:
        return source.tokenizer
    if hf_dir is not None:
        return hf_dir
    stored = _checkpoint_tokenizer(source.path)
    if stored:
        return stored
    raise ValueError(f"no tokenizer for Megatron checkpoint {source.path}: pass --tokenizer DIR (or set "
                     "model.tokenizer) with the tokenizer of the model it was trained from")


def _build_generator(config: Any, source: ModelSource, hf_dir: str | None, tokenizer: Any):
    from megatron_solopo.eval.generation import HFGenerator, MegatronGenerator, resolve_device, resolve_dtype

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


def _prompt_config(data: Any) -> dict[str, Any]:
    return {"doc_template": data.doc_template, "doc_separator": data.doc_separator,
            "prompt_template": data.prompt_template, "system_prompt": data.system_prompt,
            "use_chat_template": data.use_chat_template, "answer_regex": data.answer_regex}


def evaluate(config: Any, source: ModelSource, progress: bool = True) -> tuple[dict, dict[str, str]]:
    """Builds the suites, generates greedily, scores, and writes the report; returns (report, paths).

    `config` is an ExperimentConfig (its eval section says what to run; its data section renders
    the prompts exactly as training did).
    """
    from megatron_solopo.config import to_dict
    from megatron_solopo.data.contexts import ContextTemplates
    from megatron_solopo.data.tokenize import load_tokenizer, prompt_token_ids, tokenizer_fingerprint
    from megatron_solopo.eval.metrics import score_prediction
    from megatron_solopo.eval.report import build_report, write_report
    from megatron_solopo.eval.suites import build_suites

    ev, data = config.eval, config.data
    started = time.perf_counter()
    make_bar = _progress(progress)
    needs_hf_dir = ev.backend == "hf" or source.kind == "hf"
    with _megatron_session(ev.backend == "megatron" or source.kind == "megatron"), \
            _hf_dir_for(config, source, progress) if needs_hf_dir else contextlib.nullcontext(None) as hf_dir:
        tokenizer_path = _tokenizer_dir(source, hf_dir)
        tokenizer = load_tokenizer(tokenizer_path)
        built = build_suites(ev, tokenizer, ContextTemplates.from_config(data), make_bar)
        if not built.items:
            raise ValueError(f"no eval items could be built (skipped: {built.skipped}); lower eval.context_lengths "
                             "or check eval.jsonl_paths")
        prompts = [prompt_token_ids(tokenizer, item.prompt, data.system_prompt, data.use_chat_template)
                   for item in built.items]
        seconds_build = time.perf_counter() - started
        generator, device, dtype = _build_generator(config, source, hf_dir, tokenizer)
        bar = make_bar(len(prompts), f"generating ({generator.path})")
        outputs = generator.generate(prompts, progress=bar)
        bar.close()
    records = []
    for item, prompt_ids, output in zip(built.items, prompts, outputs):
        prediction = tokenizer.decode(output, skip_special_tokens=True)
        scores = score_prediction(prediction, item.answers, ev.answer_extraction, data.answer_regex)
        records.append({"suite": item.suite, "item_id": item.item_id, "source_id": item.source_id,
                        "question": item.question, "answers": item.answers, "context_length": item.context_length,
                        "depth": item.depth, "prompt_tokens": item.prompt_tokens, "input_tokens": len(prompt_ids),
                        "prediction": prediction, **scores, "generated_tokens": len(output), "meta": item.meta})
    stats = generator.stats
    report = build_report(
        items=records, skipped=built.skipped,
        model={"label": source.display_label(), "kind": source.kind, "path": str(pathlib.Path(source.path).resolve()),
               "fingerprint": model_fingerprint(source.path), "step": _checkpoint_step(source.path),
               "tokenizer": str(pathlib.Path(tokenizer_path).resolve()),
               "tokenizer_fingerprint": tokenizer_fingerprint(tokenizer)},
        generation={"backend": ev.backend, "path": generator.path, "device": str(device),
                    "dtype": str(dtype).replace("torch.", ""), "max_new_tokens": ev.max_new_tokens,
                    "batch_size": ev.batch_size, "greedy": True},
        config={"eval": to_dict(ev), "prompt": _prompt_config(data)},
        timing={"seconds_total": round(time.perf_counter() - started, 3), "seconds_build": round(seconds_build, 3),
                "seconds_generate": round(stats.seconds, 3), "num_prompts": stats.num_prompts,
                "prompt_tokens": stats.prompt_tokens, "generated_tokens": stats.generated_tokens,
                "generated_tokens_per_second": round(stats.generated_tokens_per_second, 3)},
        long_suites=ev.long_suites)
    paths = write_report(report, ev.output_dir)
    return report, paths
