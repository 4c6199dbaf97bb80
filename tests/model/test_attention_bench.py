"""benchmarks/attention_bench.py: the FLOP count by hand, and the CPU toy run end to end."""

import importlib.util
import json
import pathlib
import subprocess
import sys

from megatron_solopo.model.presets import get_preset

SCRIPT = pathlib.Path(__file__).resolve().parents[2] / "benchmarks" / "attention_bench.py"


def _load_script():
    spec = importlib.util.spec_from_file_location("attention_bench", SCRIPT)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_stack_flops_by_hand():
    bench = _load_script()
    # tiny: h=64, f=128, 4 heads of d=16, 2 kv heads. Per token MACs: QKV 64*16*(4+2*2) = 8192,
    # output projection 4*16*64 = 4096, SwiGLU 3*64*128 = 24576 -> 36864.
    # Causal attention at s=256: QK^T + PV = 2 * 256*256*16 MACs per head, halved, 4 heads -> 4194304.
    forward_per_layer = 2 * (256 * 36864 + 4194304)
    assert bench.stack_train_flops(get_preset("tiny"), 2, 256) == 3 * 2 * forward_per_layer == 163577856


def test_cpu_toy_run_writes_json_and_png(tmp_path):
    command = [sys.executable, str(SCRIPT), "--device", "cpu", "--lengths", "256,512", "--iters", "1",
               "--warmup", "0", "--out", str(tmp_path)]
    done = subprocess.run(command, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stdout + done.stderr
    (folder,) = tmp_path.glob("attention-*")
    data = json.loads((folder / "attention_bench.json").read_text())
    cases = {(c["backend"], c["seq_len_tokens"]): c for c in data["cases"]}
    assert set(cases) == {("sdpa", 256), ("sdpa", 512), ("local", 256), ("local", 512)}
    assert all(c["status"] == "ok" and c["fwd_bwd_s"] > 0 for c in cases.values())
    assert data["environment"]["device"] == "cpu" and data["config"]["preset"] == "tiny"
    assert (folder / "attention_bench.png").stat().st_size > 0
