"""Evaluation: long-context QA suites, greedy generation (HF or Megatron-Core), sub-EM/EM/F1, reports.

Only the config is imported here; generation and reports pull in torch/transformers/matplotlib and
are imported where they are used.
"""

from megatron_solopo.eval.config import EvalConfig

__all__ = ["EvalConfig"]
