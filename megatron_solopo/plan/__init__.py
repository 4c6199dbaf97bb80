"""`solopo plan`: per-rank memory of one real training step, measured by a fake-tensor dry run."""

from megatron_solopo.plan.dry_run import PlanResult, PlanSpec, parse_tokens, plan_step
from megatron_solopo.plan.memory import LiveBytesTracker, MemoryBreakdown

__all__ = ["LiveBytesTracker", "MemoryBreakdown", "PlanResult", "PlanSpec", "parse_tokens", "plan_step"]
