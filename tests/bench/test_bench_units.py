"""`solopo bench` pure parts: length search, ratios, variants, config checks, report.

Expected values are derived by hand in the comments (no numbers copied from the code's output).
"""

from __future__ import annotations

import json

import pytest

from megatron_solopo.bench import measure
from megatron_solopo.commands import bench as commands
from megatron_solopo.bench.random_pairs import pair_sequences, synthetic_sample
from megatron_solopo.bench.config import DEFAULT_GPU_VARIANTS, BenchConfig, Variant, parse_variant
from megatron_solopo.bench.measure import run_case, summarize
from megatron_solopo.bench.ratios import compute_ratios
from megatron_solopo.bench.report import SCHEMA, across_runs_baseline_ratios, machine_slug, regenerate_report
from megatron_solopo.bench.max_length import search_max_length
from megatron_solopo.model.presets import get_preset
from megatron_solopo.plan.flops import sequence_train_flops


# ----------------------------------------------------------------------------------------- search
def _fits_below(limit, calls=None):
    def fits(length):
        if calls is not None:
            calls.append(length)
        return length <= limit
    return fits


def test_search_doubling_then_bisection():
    calls = []
    res = search_max_length(_fits_below(19000, calls), start=4096, limit=131072, granularity=1024)
    # doubling 4K ok, 8K ok, 16K ok, 32K fail; bisect 24K fail, 20K fail, 18K ok, 19K (19456) fail
    assert calls == [4096, 8192, 16384, 32768, 24576, 20480, 18432, 19456]
    assert (res.max_ok, res.first_fail, res.hit_limit) == (18432, 19456, False)
    assert [t["status"] for t in res.trials] == ["ok", "ok", "ok", "fail", "fail", "fail", "ok", "fail"]


def test_search_edges():
    nothing = search_max_length(_fits_below(100), start=4096, limit=65536, granularity=1024)
    assert (nothing.max_ok, nothing.first_fail, len(nothing.trials)) == (None, 4096, 1)
    everything = search_max_length(_fits_below(10**9), start=4096, limit=20000, granularity=1024)
    # 4096, 8192, 16384, then the limit itself
    assert (everything.max_ok, everything.first_fail, everything.hit_limit) == (20000, None, True)
    assert [t["long_length"] for t in everything.trials] == [4096, 8192, 16384, 20000]


def test_search_seeded_by_sweep_skips_known_lengths():
    calls = []
    res = search_max_length(_fits_below(19000, calls), 4096, 131072, 1024, known_ok=16384, known_fail=32768)
    assert calls == [24576, 20480, 18432, 19456]
    assert res.max_ok == 18432
    calls.clear()
    res = search_max_length(_fits_below(19000, calls), 4096, 131072, 1024, known_fail=4096)
    assert calls == [] and res.max_ok is None


# ----------------------------------------------------------------------------------------- ratios
def _case(runner, variant, objective, mode, length, tpp, status="ok"):
    return {"runner": runner, "variant": variant, "objective": objective, "mode": mode, "long_length": length,
            "status": status, "time_per_pair_s": tpp if status == "ok" else None,
            "pairs_per_s": 1 / tpp if status == "ok" else None}


def _search(runner, variant, objective, mode, max_ok, hit_limit=False):
    return {"runner": runner, "variant": variant, "objective": objective, "mode": mode, "max_ok": max_ok,
            "hit_limit": hit_limit}


def test_ratios():
    cases = [
        _case("ours", "te", "orpo", "solo", 8192, 0.29),
        _case("ours", "te", "orpo", "long", 8192, 0.5),
        _case("ours", "te", "orpo", "solo", 65536, 2.0),
        _case("ours", "te", "orpo", "long", 65536, None, status="oom"),
        _case("baseline-trl", "gc", "orpo", "long", 8192, 1.0),
    ]
    searches = [_search("ours", "te", "orpo", "solo", 40960), _search("ours", "te", "orpo", "long", 20480),
                _search("ours", "sdpa", "orpo", "solo", 131072, hit_limit=True),
                _search("ours", "sdpa", "orpo", "long", 32768)]
    r = compute_ratios(cases, searches)
    by_len = {x["long_length"]: x for x in r["solo_over_long_time_per_pair"]}
    assert by_len[8192]["ratio"] == pytest.approx(0.58)
    assert by_len[65536]["ratio"] is None and by_len[65536]["long_status"] == "oom"
    lengths = {x["variant"]: x for x in r["max_length_solo_over_long"]}
    assert lengths["te"]["ratio"] == pytest.approx(2.0) and lengths["te"]["kind"] == "measured"
    assert lengths["sdpa"]["ratio"] == pytest.approx(4.0) and lengths["sdpa"]["kind"] == "lower_bound"
    base = {(x["mode"], x["long_length"]): x for x in r["ours_over_baseline_pairs_per_s"]}
    # pairs/s: ours solo 1/0.29 vs baseline 1/1.0; ours long 1/0.5 vs 1
    assert base[("solo", 8192)]["ratio"] == pytest.approx(1 / 0.29)
    assert base[("long", 8192)]["ratio"] == pytest.approx(2.0)
    assert ("solo", 65536) not in base  # no baseline case at that length


def test_summarize_median_and_mfu():
    out = summarize([3.0, 1.0, 2.0], pairs=2, tokens=1000, flops=4e12, peak_tflops=4.0)
    # median 2 s: 1 s/pair, 1 pair/s, 500 tokens/s, 2 TFLOP/s, MFU 2/4
    assert out == {"time_per_pair_s": 1.0, "pairs_per_s": 1.0, "tokens_per_s": 500.0,
                   "model_tflops_per_s": 2.0, "mfu": 0.5}
    assert summarize([1.0], 1, 1, 1e12, None)["mfu"] is None


# ------------------------------------------------------------------------------ sequences, variants
def test_pair_sequences_follow_the_objective():
    solo = pair_sequences("orpo", "solo", 8192, 1024)
    assert sorted(solo) == [("long_chosen", 8192), ("short_chosen", 1024), ("short_rejected", 1024)]
    assert sorted(pair_sequences("dpo", "long", 8192, 1024)) == [("long_chosen", 8192), ("long_rejected", 8192)]


def test_synthetic_sample_format():
    import torch

    gen = torch.Generator().manual_seed(0)
    dpo = synthetic_sample("dpo", "solo", 256, 64, 16, 256, gen, "s0")
    assert {k: len(v) for k, v in dpo.items() if k.endswith("_input_ids")} == {
        "long_chosen_input_ids": 256, "short_chosen_input_ids": 64, "short_rejected_input_ids": 64}
    # the response is the last 16 tokens, the same y_w under the short and the long context
    assert dpo["long_chosen_loss_mask"] == [0] * 240 + [1] * 16
    assert dpo["long_chosen_input_ids"][-16:] == dpo["short_chosen_input_ids"][-16:]
    assert dpo["short_rejected_input_ids"][-16:] != dpo["short_chosen_input_ids"][-16:]
    assert sorted(k for k in dpo if k.startswith("ref_")) == [
        "ref_long_chosen_logps", "ref_short_chosen_logps", "ref_short_rejected_logps"]
    assert all(v < 0 for k, v in dpo.items() if k.startswith("ref_"))
    orpo = synthetic_sample("orpo", "long", 256, 64, 16, 256, gen, "s1")
    assert not any(k.startswith("ref_") for k in orpo)


def test_parse_variant():
    v = parse_variant("x:backend=sdpa,recompute=full,packing=off,objectives=orpo+dpo", [])
    assert (v.attention_backend, v.recompute, v.packing, v.objectives) == ("sdpa", "full", False, ("orpo", "dpo"))
    assert parse_variant("te-fp8", DEFAULT_GPU_VARIANTS).fp8 == "hybrid"
    with pytest.raises(ValueError, match="needs backend=te"):
        parse_variant("x:backend=sdpa,fp8=hybrid", [])
    with pytest.raises(ValueError, match="packing=off"):
        parse_variant("x:backend=local", [])
    with pytest.raises(ValueError, match="not one of off, hybrid"):
        parse_variant("x:backend=te,fp8=mxfp4", [])
    with pytest.raises(ValueError, match="unknown key"):
        parse_variant("x:kernel=flash", [])
    with pytest.raises(ValueError, match="known: te"):
        parse_variant("nope", DEFAULT_GPU_VARIANTS)


def test_variant_ra_gradient_reaches_the_objective():
    from megatron_solopo.bench.stack import _objective_config
    from megatron_solopo.objectives import RA_GRADIENT
    from megatron_solopo.bench.config import RA_GRADIENT as BENCH_RA_GRADIENT

    assert BENCH_RA_GRADIENT == RA_GRADIENT  # the bench's copy (no torch import there) stays in step
    variant = parse_variant("x:backend=sdpa,ra_gradient=long", [])
    assert _objective_config("simpo", "solo", variant).resolved_hparams["ra_gradient"] == "long"
    assert _objective_config("orpo", "solo", Variant("y", "sdpa")).resolved_hparams["ra_gradient"] == "both"
    assert "ra_gradient" not in _objective_config("orpo", "long", variant).resolved_hparams
    with pytest.raises(ValueError, match="ra_gradient='short' is not one of both, long"):
        parse_variant("x:backend=sdpa,ra_gradient=short", [])


def _cfg(**kw):
    base = dict(preset="tiny", device="cpu", dtype="fp32", long_lengths=(128, 256), short_length=64,
                response_length=16)
    base.update(kw)
    return BenchConfig(**base)


@pytest.mark.parametrize("kw, msg", [
    (dict(long_lengths=(256, 128)), "ascending"),
    (dict(response_length=64), "shorter"),
    (dict(long_lengths=(64, 128)), "exceed"),
    (dict(gpu_memory_cap_gib=1.0), "needs --device cuda"),
    (dict(variants=(Variant("te"),)), "te backend needs"),
    (dict(baseline="hf"), "--baseline"),
])
def test_config_errors(kw, msg):
    with pytest.raises(ValueError, match=msg):
        _cfg(**kw)


def test_tokens_parser():
    assert commands._int_list("4K,8k, 16384") == (4096, 8192, 16384)


# ----------------------------------------------------------------------------------------- report
def test_report_from_json(tmp_path):
    doc = {
        "schema": SCHEMA, "tag": "t", "status": "complete", "date": "2026-01-01T00:00:00+00:00",
        "meta": {"gpu_name": None, "torch": "x", "megatron_core": "y", "transformer_engine": None,
                 "transformers": "z", "trl": None},
        "settings": {"preset": "tiny", "dtype": "fp32", "short_length": 64, "response_length": 16,
                     "pairs_per_step": 1, "measure_steps": 2, "warmup_steps": 1,
                     "simulate_oom_above_step_tokens": 400},
        "cases": [dict(_case("ours", "sdpa", "orpo", "solo", 128, 0.5), tokens_per_s=1.0, model_tflops_per_s=0.1,
                       mfu=None, peak_memory_gib=None)],
        "searches": [dict(_search("ours", "sdpa", "orpo", "solo", 256), first_fail=320, trials=[{}])],
        "ratios": compute_ratios([], []),
    }
    (tmp_path / "bench-tiny-t.json").write_text(json.dumps(doc))
    files = regenerate_report(tmp_path)
    assert sorted(f.name for f in files) == ["memory.png", "table.md", "time_per_pair.png"]
    table = (tmp_path / "table.md").read_text()
    assert "| ours | sdpa | orpo | solo | 128 | ok | 0.5 |" in table
    assert "not a measurement" in table
    assert (tmp_path / "time_per_pair.png").read_bytes()[:4] == b"\x89PNG"
    with pytest.raises(ValueError, match="no bench"):
        regenerate_report(tmp_path / "empty")


def test_machine_slug():
    assert machine_slug({"gpu_name": "NVIDIA H100 80GB HBM3"}) == "nvidia-h100-80gb-hbm3"
    assert machine_slug({"gpu_name": None}) == "cpu"


# --------------------------------------------------------------------------------- OOM handling
class _FakeRunner:
    """A runner whose step allocates and then fails like a GPU out of memory above `max_tokens`."""

    name, variant_name = "fake", "v"

    def __init__(self, max_tokens, error=None):
        self.preset = get_preset("tiny")
        self.max_tokens, self.error = max_tokens, error
        self.recovered = 0
        self.held = []

    def make_step(self, objective, mode, long_len):
        import torch

        def step():
            self.held.append(torch.zeros(long_len))  # state a failed step leaves behind
            if self.error is not None:
                raise self.error
            if long_len > self.max_tokens:
                raise torch.OutOfMemoryError("CUDA out of memory. Tried to allocate 2.00 GiB")
            self.held.clear()
        return step

    def recover(self):
        self.recovered += 1
        self.held.clear()


def test_run_case_catches_oom_and_recovers():
    cfg = _cfg(warmup_steps=1, measure_steps=2)
    fake = _FakeRunner(max_tokens=200)
    ok = run_case(fake, "orpo", "solo", 128, cfg, peak_tflops=None)
    assert ok.status == "ok" and len(ok.step_times_s) == 2 and fake.recovered == 0
    # solo at 128: short 64 + 64 + long 128 tokens; FLOPs summed over the three sequences
    assert ok.tokens_per_step == 256
    assert ok.model_flops_per_step == (2 * sequence_train_flops(fake.preset, 64, 16)
                                       + sequence_train_flops(fake.preset, 128, 16))
    oom = run_case(fake, "orpo", "solo", 256, cfg, peak_tflops=None)
    assert oom.status == "oom" and oom.time_per_pair_s is None
    assert oom.error.startswith("OutOfMemoryError: CUDA out of memory")
    assert fake.recovered == 1 and fake.held == []


def test_run_case_other_errors_are_not_oom():
    fake = _FakeRunner(max_tokens=10**6, error=RuntimeError("shape mismatch"))
    res = run_case(fake, "orpo", "long", 128, _cfg(), peak_tflops=None)
    assert res.status == "error" and "shape mismatch" in res.error


def test_simulated_oom_counts_step_tokens():
    fake = _FakeRunner(max_tokens=10**6)
    cfg = _cfg(simulate_oom_above_step_tokens=400)
    # long at 256: 2 x 256 = 512 tokens > 400; solo at 256: 64 + 64 + 256 = 384 <= 400
    assert run_case(fake, "orpo", "long", 256, cfg, None).status == "oom"
    assert run_case(fake, "orpo", "solo", 256, cfg, None).status == "ok"


def test_library_allocation_failures_count_as_oom():
    import torch

    assert measure._is_oom(torch.OutOfMemoryError("x"))
    assert measure._is_oom(RuntimeError("CUDA error: CUBLAS_STATUS_ALLOC_FAILED when calling cublasCreate"))
    assert not measure._is_oom(RuntimeError("shape '[2, 3]' is invalid"))
    assert not measure._is_oom(ValueError("CUDA out of memory"))  # only runtime errors carry allocator failures


def test_across_runs_ratio_takes_fastest_solo():
    def doc(tag, cases):
        return {"tag": tag, "settings": {"preset": "p"}, "cases": cases}

    runs = [doc("a", [_case("ours", "te", "orpo", "solo", 8192, 0.5), _case("baseline-trl", "gc", "orpo", "long", 8192, 2.0)]),
            doc("b", [_case("ours", "te-full", "orpo", "solo", 8192, 0.25), _case("ours", "te-full", "orpo", "long", 8192, 0.1)])]
    (row,) = across_runs_baseline_ratios(runs)
    # fastest solo: te-full at 4 pairs/s; baseline 0.5 pairs/s (long-ORPO of ours is not a baseline)
    assert row["ratio"] == pytest.approx(8.0) and row["ours"] == "te-full (b)"


def test_cli_config_errors_exit_2_with_message(capsys):
    from megatron_solopo.cli import build_parser

    args = build_parser("bench").parse_args(["bench", "--device", "cpu", "--variants", "x:backend=sdpa,fp8=hybrid"])
    assert commands.run(args) == 2
    assert "fp8=hybrid needs backend=te" in capsys.readouterr().err
    args = build_parser("bench").parse_args(["bench", "--device", "cpu", "--long-lengths", "256,128"])
    assert commands.run(args) == 2
    assert "ascending" in capsys.readouterr().err


def test_config_rejects_unknown_preset_and_low_search_limit():
    with pytest.raises(ValueError, match="known presets"):
        _cfg(preset="llama-9000")
    with pytest.raises(ValueError, match="search-limit"):
        _cfg(search_limit=64)
    _cfg(search_limit=64, search=False)  # no search: no limit to check


def test_oom_detection_ignores_case_and_catches_te_messages():
    import torch

    from megatron_solopo.bench import measure

    assert measure._is_oom(RuntimeError("/te/common/util.cpp:42 in function f: CUDA Error: out of memory"))
    assert measure._is_oom(RuntimeError("CUDA OUT OF MEMORY. Tried to allocate 2 GiB"))
    assert measure._is_oom(RuntimeError("cuDNN error: CUDNN_STATUS_ALLOC_FAILED"))
    assert not measure._is_oom(RuntimeError("CUDA error: an illegal memory access was encountered"))
    assert measure._is_oom(torch.OutOfMemoryError("x"))


def test_closing_a_runner_releases_megatrons_global_memory_buffer(monkeypatch):
    import types

    import torch
    from megatron.core import parallel_state
    from megatron.core.utils import GlobalMemoryBuffer

    from megatron_solopo.bench.stack import StackRunner
    from megatron_solopo.parallel.distributed import release_global_memory_buffer

    buffer = GlobalMemoryBuffer()
    buffer.buffer[("mpu", torch.float32)] = torch.zeros(32)  # what a variant's attention left behind
    monkeypatch.setattr(parallel_state, "_GLOBAL_MEMORY_BUFFER", buffer)
    assert release_global_memory_buffer() == 32 * 4 and not buffer.buffer
    buffer.buffer["x"] = torch.zeros(8)
    runner = StackRunner.__new__(StackRunner)
    chunk = types.SimpleNamespace(zero_grad_buffer=lambda: None)
    runner.state = types.SimpleNamespace(chunks=[chunk], optimizer=types.SimpleNamespace(zero_grad=lambda: None))
    runner.cfg = types.SimpleNamespace(device="cpu")
    runner.recover()
    assert not buffer.buffer
    buffer.buffer["x"] = torch.zeros(8)
    runner.close()
    assert not buffer.buffer and runner.state is None


def test_a_swallowed_sigterm_still_stops_the_sweep_at_the_next_case(tmp_path):
    """Library code with a bare `except:` can swallow the SystemExit the SIGTERM handler raises; the sweep
    must still stop before its next case (seen once under load: a bench ran to completion after SIGTERM)."""
    from megatron_solopo.bench.sweep import BenchRun

    bench = BenchRun(_cfg(), tmp_path, "t", [])
    calls = []

    class Runner:
        name, variant_name = "ours", "fake"

    import megatron_solopo.bench.sweep as sweep

    def fake_case(*args, **kwargs):
        calls.append(args[3])
        bench.stop_signal = 15  # the handler ran during this case and its SystemExit was swallowed
        raise AssertionError("not reached")

    original, sweep.run_case = sweep.run_case, fake_case
    try:
        with pytest.raises(AssertionError):
            bench._sweep(Runner(), "orpo", "solo")
        with pytest.raises(SystemExit) as stop:
            bench._sweep(Runner(), "orpo", "solo")
    finally:
        sweep.run_case = original
    assert stop.value.code == 143 and calls == [128]  # no second case was started
