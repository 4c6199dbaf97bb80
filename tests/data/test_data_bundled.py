"""The packaged sample dataset is valid, small, fits the tiny presets, and is reproducible."""

from megatron_solopo.data.config import DataConfig
from megatron_solopo.data.records import read_pair_records
from megatron_solopo.data.bundled import build_sample, sample_pairs_path, sample_tokenizer_dir
from megatron_solopo.data.scoring import score_response
from megatron_solopo.data.tokenization import ROLES, load_tokenized_pairs, load_tokenizer

TINY_PRESET_VOCAB = 256
TINY_PRESET_POSITIONS = 4096


def test_sample_is_valid_small_and_fits_the_tiny_presets(tmp_path):
    assert sample_pairs_path().stat().st_size < 200_000
    records = read_pair_records(sample_pairs_path())
    assert len(records) >= 24
    for record in records:
        assert score_response(record["chosen"], record["answers"]).sub_em == 1.0
        assert score_response(record["rejected"], record["answers"]).sub_em == 0.0
        assert abs(record["meta"]["long_tokens"] - 1536) <= 0.05 * 1536
    tokenizer = load_tokenizer(sample_tokenizer_dir())
    assert len(tokenizer) == TINY_PRESET_VOCAB
    dataset = load_tokenized_pairs(sample_pairs_path(), tokenizer, DataConfig(cache_dir=str(tmp_path)))
    assert len(dataset) == len(records)
    unk = tokenizer.unk_token_id
    for role in ROLES:
        for ids in dataset[f"{role}_input_ids"]:
            assert max(ids) < TINY_PRESET_VOCAB and len(ids) <= TINY_PRESET_POSITIONS
            assert unk not in ids  # the ASCII alphabet covers all the text
    # decoding gives the text back (the tokenizer is lossless on it)
    first = dataset[0]
    response = [t for t, m in zip(first["short_chosen_input_ids"], first["short_chosen_loss_mask"], strict=True) if m]
    assert tokenizer.decode(response[:-1]) == records[0]["chosen"]


def test_sample_rebuild_is_identical(tmp_path):
    (tmp_path / "tokenizer").symlink_to(sample_tokenizer_dir())
    build_sample(tmp_path)
    assert (tmp_path / "pairs.jsonl").read_bytes() == sample_pairs_path().read_bytes()
    assert (tmp_path / "summary.json").read_bytes() == (sample_pairs_path().parent / "summary.json").read_bytes()
