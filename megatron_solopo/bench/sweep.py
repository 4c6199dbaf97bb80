"""One `solopo bench` invocation's measurements: length sweep + max-length search per runner, JSON kept current."""

from __future__ import annotations

import dataclasses
import datetime
import pathlib
import time
from collections.abc import Iterable, Mapping, Sequence
from typing import Any

from megatron_solopo.bench.random_pairs import pair_sequences
from megatron_solopo.bench.config import BenchConfig
from megatron_solopo.bench.max_length import search_max_length
from megatron_solopo.bench.measure import CaseResult, run_case
from megatron_solopo.bench.ratios import compute_ratios
from megatron_solopo.bench.report import (
    PAPER_REFERENCE,
    SCHEMA,
    _fmt,
    _length_label,
    machine_info,
    write_json_atomic,
)
from megatron_solopo.model.presets import get_preset
from megatron_solopo.plan.flops import linear_flops_per_token, sequence_train_flops


class BenchRun:
    """One `solopo bench` invocation: runs the cases in order and keeps the JSON up to date."""

    def __init__(self, cfg: BenchConfig, folder: pathlib.Path, tag: str, argv: Sequence[str]):
        self.cfg, self.folder = cfg, folder
        self.preset = get_preset(cfg.preset)
        self.path = folder / f"bench-{cfg.preset}-{tag}.json"
        self.started = time.monotonic()
        self.stop_signal: int | None = None
        """Set by the SIGTERM handler (commands.bench): the run ends at the next case boundary at the latest,
        even when library code swallowed the SystemExit the handler raised (a bare `except:`)."""
        self.doc: dict[str, Any] = {
            "schema": SCHEMA, "tag": tag, "status": "running",
            "date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
            "command": ["solopo", "bench", *argv], "meta": machine_info(cfg.device), "settings": cfg.settings(),
            "model": {"preset": dataclasses.asdict(self.preset), "parameters": self.preset.num_parameters(),
                      "linear_flops_per_token": linear_flops_per_token(self.preset)},
            "paper_reference": PAPER_REFERENCE, "runners": [], "cases": [], "searches": [],
            "ratios": compute_ratios([], []),
        }

    def save(self) -> None:
        self.doc["ratios"] = compute_ratios(self.doc["cases"], self.doc["searches"])
        write_json_atomic(self.path, self.doc)

    def check_stop(self) -> None:
        """SystemExit(128 + signal) when a stop signal arrived: called before every case and search trial."""
        if self.stop_signal is not None:
            raise SystemExit(128 + self.stop_signal)

    def out_of_time(self) -> bool:
        budget = self.cfg.time_budget_s
        return budget is not None and time.monotonic() - self.started > budget

    def measure(self, runner, objectives: Iterable[str], modes: Iterable[str]) -> None:
        """The length sweep and (optionally) the max-length search of one runner."""
        for objective in objectives:
            for mode in modes:
                self._sweep(runner, objective, mode)
                if self.cfg.search:
                    self._search(runner, objective, mode)

    def _skipped(self, runner, objective: str, mode: str, length: int, why: str) -> dict[str, Any]:
        seqs = pair_sequences(objective, mode, length, self.cfg.short_length)
        return dataclasses.asdict(CaseResult(
            runner=runner.name, variant=runner.variant_name, objective=objective, mode=mode, long_length=length,
            status="skipped", sequences_per_pair=[list(s) for s in seqs],
            tokens_per_step=self.cfg.pairs_per_step * sum(t for _, t in seqs),
            model_flops_per_step=self.cfg.pairs_per_step * sum(
                sequence_train_flops(self.preset, t, self.cfg.response_length) for _, t in seqs), error=why))

    def _sweep(self, runner, objective: str, mode: str) -> None:
        failed_at = None
        for length in self.cfg.long_lengths:
            if failed_at is not None:
                case = self._skipped(runner, objective, mode, length, f"shorter length {failed_at} ran out of memory")
            elif self.out_of_time():
                case = self._skipped(runner, objective, mode, length, "time budget spent")
            else:
                self.check_stop()
                case = dataclasses.asdict(run_case(runner, objective, mode, length, self.cfg, self.cfg.peak_tflops))
                print(_case_line(case), flush=True)
                failed_at = length if case["status"] == "oom" else None
            self.doc["cases"].append(case)
            self.save()

    def _search(self, runner, objective: str, mode: str) -> None:
        mine = [c for c in self.doc["cases"] if (c["runner"], c["variant"], c["objective"], c["mode"])
                == (runner.name, runner.variant_name, objective, mode)]
        known_ok = max((c["long_length"] for c in mine if c["status"] == "ok"), default=None)
        known_fail = min((c["long_length"] for c in mine if c["status"] == "oom"), default=None)
        errors: dict[int, str] = {}

        def fits(length: int) -> bool:
            if self.out_of_time():
                raise TimeoutError("time budget spent")
            self.check_stop()
            case = run_case(runner, objective, mode, length, self.cfg, None, steps=(0, 1))
            print(f"  search {runner.name}/{runner.variant_name} {mode}-{objective} {length}: {case.status}", flush=True)
            if case.status == "error":
                raise RuntimeError(f"search trial at {length} failed: {case.error}")
            if case.status == "oom":
                errors[length] = case.error or "oom"
            return case.status == "ok"

        record: dict[str, Any] = {"runner": runner.name, "variant": runner.variant_name, "objective": objective,
                                  "mode": mode, "start": self.cfg.long_lengths[0], "limit": self.cfg.search_limit,
                                  "granularity": self.cfg.search_granularity}
        try:
            result = search_max_length(fits, self.cfg.long_lengths[0], self.cfg.search_limit,
                                       self.cfg.search_granularity, known_ok, known_fail)
            record.update(dataclasses.asdict(result), status="ok")
            for trial in record["trials"]:
                if trial["long_length"] in errors:
                    trial["error"] = errors[trial["long_length"]]
        except (TimeoutError, RuntimeError) as err:
            record.update(max_ok=None, first_fail=None, hit_limit=False, trials=[], status="incomplete",
                          error=str(err))
        self.doc["searches"].append(record)
        self.save()


def _case_line(case: Mapping[str, Any]) -> str:
    tail = (f"{case['time_per_pair_s']:.4g} s/pair, peak {_fmt(case['peak_memory_gib'])} GiB"
            if case["status"] == "ok" else case.get("error") or "")
    return (f"{case['runner']}/{case['variant']} {case['mode']}-{case['objective']} "
            f"{_length_label(case['long_length'])}: {case['status']} {tail}")
