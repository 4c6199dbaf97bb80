"""SoLoPO data: QA sources, short/long contexts, response sampling, sub-EM pairs, tokenized triplets.

Flow (docs/data.md): source -> contexts -> sampling -> scoring -> pairs.jsonl -> tokens (Arrow cache)
-> DP-sharded sampler. Importing this package is light (no torch); heavy libraries load on use.
"""

from megatron_solopo.data.config import DataConfig
from megatron_solopo.data.contexts import (ContextSkip, ContextTemplates, LongContext, TokenCounter, build_long_context,
                                           build_short_context, long_context_at_depth, render_prompt)
from megatron_solopo.data.pair_order import DistributedPairSampler
from megatron_solopo.data.records import Document, QAItem, read_pair_records, validate_pair_record
from megatron_solopo.data.ruler import RULER_TASKS, RulerSpec, generate_ruler
from megatron_solopo.data.scoring import (answer_scores, exact_match, extract_final_answer, normalize_answer,
                                          score_response, sub_exact_match, token_f1)
from megatron_solopo.data.synthetic import generate_synthetic_qa
from megatron_solopo.data.tokenization import ROLES, load_tokenized_pairs, load_tokenizer, prompt_token_ids

__all__ = [
    "DataConfig", "Document", "QAItem", "ContextSkip", "ContextTemplates", "LongContext", "TokenCounter",
    "build_long_context", "build_short_context", "long_context_at_depth", "render_prompt", "read_pair_records",
    "validate_pair_record", "DistributedPairSampler", "exact_match", "extract_final_answer", "normalize_answer",
    "score_response", "sub_exact_match", "token_f1", "generate_synthetic_qa", "ROLES", "load_tokenized_pairs",
    "load_tokenizer", "prompt_token_ids", "answer_scores", "RULER_TASKS", "RulerSpec", "generate_ruler",
]
