"""SLURM scripts: syntax (bash -n), --dry-run (layout + memory estimate, 8B at 128K), the time-limit
protocol (SIGUSR1 -> stop file -> trainer exits 75 -> requeue) with fake srun/scontrol, and the memory
model's arithmetic against hand-derived values."""

import os
import pathlib
import shutil
import signal
import subprocess
import sys
import time

import pytest

from megatron_solopo.model.presets import ModelPreset, get_preset
from megatron_solopo.parallel.config import ParallelConfig
from megatron_solopo.training.memory_estimate import (
    GIB,
    SequencePlan,
    activation_bytes_per_token_per_layer,
    estimate_memory,
    params_per_gpu,
)

ROOT = pathlib.Path(__file__).resolve().parents[2]
SCRIPTS = sorted((ROOT / "examples" / "slurm").glob("*.sbatch"))
RECIPE_8B_128K = ROOT / "examples" / "configs" / "recipes" / "llama3.1-8b-128k" / "solo-orpo.yaml"


def _env(**extra):
    env = {k: v for k, v in os.environ.items() if not k.startswith("SLURM_")}
    env.update({"PYTHON": sys.executable, "SOLOPO_ROOT": str(ROOT), "VENV": "/nonexistent", **extra})
    return env


def test_scripts_exist_and_parse():
    assert {p.name for p in SCRIPTS} >= {"train_single_node.sbatch", "train_multi_node.sbatch"}
    for script in SCRIPTS:
        result = subprocess.run(["bash", "-n", str(script)], capture_output=True, text=True, check=False)
        assert result.returncode == 0, f"{script.name}: {result.stderr}"
        text = script.read_text()
        assert "#SBATCH --signal=B:USR1@300" in text and "#SBATCH --requeue" in text
        assert "train.resume=auto" in text and "scontrol requeue" in text


def test_dry_run_prints_layout_and_memory_for_8b_at_128k():
    result = subprocess.run(["bash", str(ROOT / "examples/slurm/train_multi_node.sbatch"), "--dry-run",
                             str(RECIPE_8B_128K)], capture_output=True, text=True, check=False, env=_env(), timeout=120)
    assert result.returncode == 0, result.stderr
    out = result.stdout
    assert "job: 4 node(s) x 8 GPUs = 32 GPUs" in out  # the node count of the script's #SBATCH header
    assert "layout: TP=8 PP=1 CP=4 DP=1" in out
    assert "model: llama3.1-8b (8.03B params" in out
    for term in ("weights", "gradients", "optimizer", "activations", "LM head", "total"):
        assert term in out
    assert "-> fits" in out
    # an impossible layout is reported with its reason (exit 2), one that does not fit with advice (exit 3)
    bad = subprocess.run(["bash", str(ROOT / "examples/slurm/train_multi_node.sbatch"), "--dry-run",
                          str(RECIPE_8B_128K), "parallel.cp=3"],
                         capture_output=True, text=True, check=False, env=_env(NODES="1"), timeout=120)
    assert bad.returncode == 2 and "not divisible by tp*pp*cp" in bad.stderr, bad.stderr
    too_big = subprocess.run(["bash", str(ROOT / "examples/slurm/train_single_node.sbatch"), "--dry-run",
                              str(RECIPE_8B_128K), "parallel.tp=1", "parallel.cp=1",
                              "parallel.sequence_parallel=false"],
                             capture_output=True, text=True, check=False, env=_env(GPUS_PER_NODE="1"), timeout=120)
    assert too_big.returncode == 3 and "DOES NOT FIT" in too_big.stdout and "try: model.recompute=full" in too_big.stdout


FAKE_SRUN = """#!/bin/bash
# stands in for srun + torchrun + the trainer: waits for the stop file like the trainer's step loop would
echo "srun $*" >> "$FAKE_LOG"
for _ in $(seq 600); do
  if [ -f "$SOLOPO_STOP_FILE" ]; then echo "saved checkpoint, stopping" >> "$FAKE_LOG"; exit 75; fi
  sleep 0.1
done
exit 1
"""


@pytest.mark.skipif(shutil.which("bash") is None, reason="needs bash")
def test_time_limit_signal_saves_and_requeues(tmp_path):
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir()
    fake_scontrol = '#!/bin/bash\necho "scontrol $*" >> "$FAKE_LOG"\nif [ "$1" = show ]; then echo node001; fi\n'
    for name, body in (("srun", FAKE_SRUN), ("scontrol", fake_scontrol)):
        (bin_dir / name).write_text(body)
        (bin_dir / name).chmod(0o755)
    log = tmp_path / "fake.log"
    env = _env(PATH=f"{bin_dir}:{os.environ['PATH']}", FAKE_LOG=str(log), SOLOPO_ROOT=str(tmp_path),
               SLURM_JOB_ID="4242", SLURM_JOB_NAME="solopo-train", SLURM_JOB_NODELIST="node001",
               SLURM_JOB_NUM_NODES="1", SLURM_RESTART_COUNT="0")
    proc = subprocess.Popen(["bash", str(ROOT / "examples/slurm/train_multi_node.sbatch"), "recipe.yaml",
                             "train.lr=1e-6"], env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    deadline = time.time() + 30
    while not (log.exists() and "srun" in log.read_text()) and time.time() < deadline:
        time.sleep(0.1)
    proc.send_signal(signal.SIGUSR1)  # what SLURM does 300 s before the time limit
    output, _ = proc.communicate(timeout=60)
    assert proc.returncode == 0, output
    calls = log.read_text()
    assert "--config recipe.yaml train.resume=auto train.lr=1e-6" in calls
    assert "saved checkpoint, stopping" in calls and "scontrol requeue 4242" in calls
    job_dir = tmp_path / "logs" / "solopo-train-4242"
    assert (job_dir / "stop-requested").exists() and (job_dir / "attempt-0" / "command.txt").exists()


# ------------------------------------------------------------------------------------------ memory model
TOY = ModelPreset("toy", "llama", num_layers=4, hidden_size=8, ffn_hidden_size=16, num_attention_heads=2,
                  num_query_groups=1, vocab_size=32, max_position_embeddings=64)


def test_params_per_gpu_hand_counted():
    # per layer: qkv 8*4*(2+2)=128, proj 2*4*8=64, mlp 3*8*16=384 (split by TP) + norms 16 (replicated)
    assert params_per_gpu(TOY, ParallelConfig()) == 4 * (576 + 16) + 2 * 32 * 8 + 8 == TOY.num_parameters()
    assert params_per_gpu(TOY, ParallelConfig(tp=2)) == 4 * (288 + 16) + 2 * 16 * 8 + 8
    # pp=2: first stage 2 layers + embedding; last stage 2 layers + output layer + final norm (larger)
    assert params_per_gpu(TOY, ParallelConfig(pp=2)) == 2 * (576 + 16) + 32 * 8 + 8
    tied = TOY.replace(tie_embeddings=True)
    assert params_per_gpu(tied, ParallelConfig()) == tied.num_parameters()


def test_activation_bytes_hand_derived():
    # bf16: 2 * [4h + (2*a*d + 2*g*d + 3f)] = 2 * [32 + (16 + 8 + 48)] = 208 bytes per token per layer
    assert activation_bytes_per_token_per_layer(TOY, ParallelConfig(), 2, "none") == 208
    # tp=2 without SP: the 4h stays, the rest halves; with SP everything halves
    assert activation_bytes_per_token_per_layer(TOY, ParallelConfig(tp=2), 2, "none") == 2 * (32 + 36)
    assert activation_bytes_per_token_per_layer(TOY, ParallelConfig(tp=2, sequence_parallel=True), 2,
                                                "none") == 104
    assert activation_bytes_per_token_per_layer(TOY, ParallelConfig(), 2, "full") == 16  # the layer input


def test_bytes_per_parameter_match_megatron_mixed_precision():
    preset = get_preset("llama3.1-8b")
    seqs = SequencePlan(("short_chosen",), (1024,), 128)
    plain = estimate_memory(preset, ParallelConfig(tp=8), 8, seqs, micro_batch_pairs=1, num_microbatches=1,
                            distributed_optimizer=False)
    params = plain.params_per_gpu
    # 2 (bf16 weights) + 4 (fp32 grads) + 12 (fp32 master, Adam m, v) = 18 bytes per parameter
    assert plain.weights + plain.gradients + plain.optimizer == 18 * params
    sharded = estimate_memory(preset, ParallelConfig(tp=2, cp=2), 16, seqs, micro_batch_pairs=1, num_microbatches=1,
                              distributed_optimizer=True)
    # dp = 16 / (2*2) = 4; optimizer shards over dp*cp = 8: 6 + 12/8 bytes per parameter
    assert sharded.weights + sharded.gradients + sharded.optimizer == pytest.approx(7.5 * sharded.params_per_gpu)
    # CP halves the tokens per GPU and hence the activations (same tp)
    cp1 = estimate_memory(preset, ParallelConfig(tp=2), 8, seqs, micro_batch_pairs=1, num_microbatches=1)
    cp2 = estimate_memory(preset, ParallelConfig(tp=2, cp=2), 8, seqs, micro_batch_pairs=1, num_microbatches=1)
    assert cp2.activations == pytest.approx(cp1.activations / 2)
    assert cp1.total < 80 * GIB


def test_solo_needs_less_activation_memory_than_long_at_the_same_length():
    preset = get_preset("llama3.1-8b")
    long_len, short_len, resp = 65536, 2048, 512
    solo = SequencePlan(("short_chosen", "short_rejected", "long_chosen"), (short_len, short_len, long_len), resp)
    long = SequencePlan(("long_chosen", "long_rejected"), (long_len, long_len), resp)
    args = {"micro_batch_pairs": 1, "num_microbatches": 8}
    a = estimate_memory(preset, ParallelConfig(tp=8), 8, solo, **args)
    b = estimate_memory(preset, ParallelConfig(tp=8), 8, long, **args)
    # packed tokens: (2*2048 + 65536) / (2*65536) of long-X's
    assert a.activations / b.activations == pytest.approx((2 * short_len + long_len) / (2 * long_len))
    padded = estimate_memory(preset, ParallelConfig(tp=8), 8, solo, packed=False, **args)
    assert padded.tokens_per_microbatch_per_gpu == 3 * long_len  # padding wastes what packing saves
