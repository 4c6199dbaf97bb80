"""Layout search for `solopo plan --gpus N`: which TP x CP x DP layouts (with / without full recompute) fit a
GPU's memory, by the dry run, ordered by a PROJECTED step time (a roofline model, not a measurement).

    layouts = search_layouts(PlanSpec(preset="llama3.1-8b", short_tokens=4096, long_tokens=1 << 20),
                             gpus=64, gpu_memory_gib=80)
    print("\\n".join(layouts.lines()))

Memory (every number shown): `scaled_plan`, the dry run of plan/dry_run.py at 2 and 4 transformer layers,
extrapolated to the model's depth. Each layer adds the same weights, gradient buffer, optimizer states and
saved activations, so every phase's peak is affine in the layer count; checked to a few bytes against
full-depth dry runs (tests/plan/test_search.py, docs/scaling.md: 8B at 128K TP8 CP8, 25,555,890,505 bytes
either way) and ~3x faster than the full-depth run for an 8B model (two 2/4-layer runs instead of 32 layers).

Time: `project_time`, a roofline with every assumption in `Assumptions` (printed with the results):
compute = hardware FLOPs (the benchmark's model FLOPs, plan/flops.py, plus the recomputed
forward under full recompute) / (GPUs of a replica x peak x MFU); TP all-reduces and the CP K/V ring over
NVLink inside a node or InfiniBand across nodes; the data-parallel gradient reduction once per step.

Search: candidates TP in the divisors of gcd(heads, kv heads) up to the GPUs of a node (TP stays inside a
node), CP in the powers of two, DP = the rest, sequence parallelism on wherever TP > 1 (it moves the same
bytes as TP's all-reduces, as a reduce-scatter plus an all-gather, and splits the activations that TP
alone replicates); PP is not searched (`solopo plan --pp` dry-runs a given PP layout, first and last
stage: a search over PP would also need the schedule's bubble and the micro-batch count). Pruning before
any dry run: `memory_lower_bound` (persistent bytes + the saved activations that must coexist at the start
of the backward) above the usable memory; then,
in projected-time order, a layout is skipped when a dry-run one that holds no less per GPU (no more TP,
CP or recompute) already did not fit (memory per GPU does not increase with TP, CP or recompute). Dry
runs are cached by their spec (DP only matters with the distributed optimizer). The search stops after
`top` layouts that fit (0: all).
"""

from __future__ import annotations

import dataclasses
import math
import time

from megatron_solopo.model import get_preset
from megatron_solopo.parallel.config import ParallelConfig
from megatron_solopo.plan import lower_bound
from megatron_solopo.plan.dry_run import PlanSpec, plan_step
from megatron_solopo.plan.flops import attention_flops, linear_flops_per_token, sequence_train_flops
from megatron_solopo.plan.lower_bound import GIB

__all__ = ["Assumptions", "Candidate", "ScaledPlan", "TimeProjection", "SearchResult", "scaled_plan",
           "sequence_lengths", "project_time", "memory_lower_bound", "candidates", "search_layouts",
           "sbatch_line", "RECOMPUTE_ORDER"]

RECOMPUTE_ORDER = {"none": 0, "selective": 1, "full": 2}
SCALE_LAYERS = (2, 4)
_CACHE: dict[tuple, "ScaledPlan"] = {}
"""Layer-scaled dry runs of this process by spec: identical runs (e.g. the same layout searched for two GPU
memory sizes, or candidates that differ only in DP without the distributed optimizer) run once."""


@dataclasses.dataclass(frozen=True)
class Assumptions:
    """Every assumption of the step-time projection (printed with each search)."""

    gpu_peak_tflops: float = 989.0
    """Dense BF16 tensor-core peak per GPU, TFLOP/s (H100 / H200 SXM; plan/flops.py)."""
    mfu: float = 0.40
    """Fraction of that peak reached by the step's matmuls and attention (model + recomputed FLOPs)."""
    nvlink_gb_s: float = 360.0
    """NCCL bus bandwidth per GPU inside a node, GB/s (NVLink 4: 450 GB/s per direction, ~80% achieved)."""
    ib_gb_s: float = 40.0
    """Bus bandwidth per GPU across nodes, GB/s (one 400 Gb/s NDR adapter per GPU = 50 GB/s, ~80% achieved)."""
    gpus_per_node: int = 8
    cp_overlap: float = 1.0
    """Fraction of the attention compute that hides the CP ring's K/V traffic (Megatron's p2p ring overlaps)."""
    tp_overlap: float = 0.0
    """Fraction of TP all-reduce time hidden behind compute (0: exposed; no SP / TP comm overlap)."""
    global_batch_pairs: int = 64
    """Pairs per optimizer step (the recipes' 64): the gradient reduction is paid once per step."""
    reserve_fraction: float = 0.10
    """Share of GPU memory kept free for what the dry run does not count (CUDA context, NCCL buffers,
    allocator rounding and fragmentation, kernel workspaces): a layout fits when its dry-run peak is at
    most (1 - reserve_fraction) x the GPU memory."""

    def lines(self) -> list[str]:
        out = ["assumptions of the projection (megatron_solopo/plan/search.py Assumptions):"]
        for field in dataclasses.fields(self):
            doc = {"gpu_peak_tflops": "dense BF16 peak per GPU", "mfu": "achieved fraction of peak",
                   "nvlink_gb_s": "bus bandwidth per GPU inside a node", "ib_gb_s": "per GPU across nodes",
                   "gpus_per_node": "TP stays inside a node", "cp_overlap": "attention compute hiding the CP ring",
                   "tp_overlap": "TP all-reduce hidden", "global_batch_pairs": "pairs per optimizer step",
                   "reserve_fraction": "memory kept free for what the dry run does not count"}[field.name]
            out.append(f"  {field.name} = {getattr(self, field.name)}  ({doc})")
        return out


@dataclasses.dataclass(frozen=True)
class Candidate:
    tp: int
    cp: int
    dp: int
    recompute: str
    sequence_parallel: bool = False

    @property
    def label(self) -> str:
        sp = " SP" if self.sequence_parallel else ""
        return f"TP={self.tp}{sp} CP={self.cp} DP={self.dp} recompute={self.recompute}"


# ------------------------------------------------------------------------------ memory
@dataclasses.dataclass
class ScaledPlan:
    """A dry run's numbers at the model's depth, from dry runs at SCALE_LAYERS layers."""

    peak_bytes: int
    persistent_bytes: dict[str, int]
    activations_bytes: int
    peak_phase: str
    seconds: float
    layers: tuple[int, int]

    @property
    def peak_gib(self) -> float:
        return self.peak_bytes / GIB


def _affine(at_a: float, at_b: float, a: int, b: int, n: int) -> int:
    return round(at_a + (at_b - at_a) * (n - a) / (b - a))


def scaled_plan(spec: PlanSpec, layers: tuple[int, int] | None = None) -> ScaledPlan:
    """The dry run of `spec` at `layers` transformer layers, extrapolated to the preset's depth: persistent
    categories and each phase's peak are affine in the layer count; the peak is the largest phase peak.
    Default layers: SCALE_LAYERS per (virtual) pipeline stage, i.e. SCALE_LAYERS x pp x vpp in all."""
    stages = spec.pp * (spec.virtual_pp or 1)
    layers = layers or tuple(n * stages for n in SCALE_LAYERS)

    depth = get_preset(spec.preset).num_layers
    if depth <= max(layers):
        result = plan_step(dataclasses.replace(spec, num_layers=None))
        m = result.memory
        return ScaledPlan(m.peak_bytes, dict(m.persistent_bytes), m.activations_bytes, m.peak_phase,
                          result.seconds_setup + result.seconds_step, (depth, depth))
    start = time.perf_counter()
    runs = [plan_step(dataclasses.replace(spec, num_layers=n)).memory for n in layers]
    a, b = layers
    phases = {name: _affine(runs[0].phase_peaks.get(name, 0), runs[1].phase_peaks.get(name, 0), a, b, depth)
              for name in set(runs[0].phase_peaks) | set(runs[1].phase_peaks)}
    peak_phase, peak = max(phases.items(), key=lambda item: item[1]) if phases else ("", 0)
    persistent = {name: _affine(runs[0].persistent_bytes.get(name, 0), runs[1].persistent_bytes.get(name, 0),
                                a, b, depth) for name in runs[1].persistent_bytes}
    peak = max(peak, _affine(runs[0].peak_bytes, runs[1].peak_bytes, a, b, depth))
    return ScaledPlan(peak, persistent, peak - sum(persistent.values()), peak_phase,
                      time.perf_counter() - start, layers)


def sequence_lengths(spec: PlanSpec) -> list[int]:
    """Tokens of each sequence of one pair (prompt + response): SoLoPO short/short/long, long-PO long/long."""
    short, long = spec.short_tokens + spec.response_tokens, spec.long_tokens + spec.response_tokens
    return [short, short, long] if spec.mode == "solo" else [long, long]


def memory_lower_bound(spec: PlanSpec, candidate: Candidate) -> int:
    """Bytes one rank must hold at once (PP=1): plan/lower_bound.py's memory_lower_bound for this batch
    shape; the dry run never goes below it (tests/plan/test_search.py). Used only to skip dry runs."""
    seqs = sequence_lengths(spec)
    plan = lower_bound.SequencePlan(tuple(f"s{i}" for i in range(len(seqs))), tuple(seqs), spec.response_tokens)
    parallel = ParallelConfig(tp=candidate.tp, cp=candidate.cp, sequence_parallel=candidate.sequence_parallel)
    bound = lower_bound.memory_lower_bound(
        get_preset(spec.preset), parallel, candidate.tp * candidate.cp * candidate.dp, plan,
        micro_batch_pairs=spec.micro_batch_pairs, num_microbatches=1, params_dtype=spec.params_dtype,
        recompute=candidate.recompute, distributed_optimizer=spec.distributed_optimizer)
    return int(bound.total)


# ------------------------------------------------------------------------------ time
@dataclasses.dataclass
class TimeProjection:
    """Seconds of one pair through one model replica (tp*cp GPUs), by term, and the job's seconds per pair."""

    model_flops: float
    """Model FLOPs of one pair (plan/flops.py: 3 x forward, LM head at response positions)."""
    hardware_flops: float
    """model_flops + the recomputed forward (full recompute: the layers' forward again)."""
    compute_s: float
    tp_comm_s: float
    cp_comm_s: float
    """CP ring traffic left exposed after overlapping it with attention compute."""
    dp_comm_s_per_step: float
    pair_s: float
    """One pair through one replica: compute + TP + exposed CP."""
    job_s_per_pair: float
    """(pairs per DP rank per step x pair_s + the step's gradient reduction) / pairs per step."""


def project_time(spec: PlanSpec, candidate: Candidate, assumptions: Assumptions = Assumptions(),
                 gradient_bytes: int | None = None) -> TimeProjection:
    """Roofline step time of `candidate` (formulas in docs/scaling.md, "Step-time projection").

    compute_s = hardware FLOPs / (tp*cp x gpu_peak_tflops x mfu)
    tp_comm_s = n_ar x L x 2(tp-1)/tp x (tokens/cp x h x 2 B) / nvlink, n_ar = 2 all-reduces per layer per
                forward pass: 4 (forward + backward), 6 with full recompute (the recomputed forward's);
                with sequence parallelism each all-reduce is a reduce-scatter + an all-gather: the same bytes
    cp ring   = n_kv x L x (cp-1) x (tokens/cp x 2 x g*d/tp x 2 B) / bw, n_kv = 3 (forward K,V; backward K,V
                and dK,dV), 4 with full recompute; bw = nvlink if tp*cp <= gpus_per_node else ib;
                exposed = max(0, ring - cp_overlap x attention compute)
    dp_comm   = 2(n-1)/n x gradient bytes / bw over n = dp*cp ranks (Megatron reduces gradients over DP x CP);
                bw = nvlink if the whole job is one node, else ib; once per step
    """
    preset = get_preset(spec.preset)
    a = assumptions
    seqs = sequence_lengths(spec)
    pairs = spec.micro_batch_pairs
    model_flops = pairs * sum(sequence_train_flops(preset, s, spec.response_tokens) for s in seqs)
    forward_layers = pairs * sum(s * linear_flops_per_token(preset) + attention_flops(preset, s) for s in seqs)
    attention = pairs * sum(attention_flops(preset, s) for s in seqs)
    recompute_flops = {"none": 0, "selective": attention, "full": forward_layers}[candidate.recompute]
    hardware_flops = model_flops + recompute_flops
    rate = candidate.tp * candidate.cp * a.gpu_peak_tflops * 1e12 * a.mfu
    compute_s = hardware_flops / rate
    attention_s = (3 * attention + (attention if candidate.recompute != "none" else 0)) / rate

    tokens_per_rank = pairs * sum(seqs) / candidate.cp
    layers = preset.num_layers
    nvlink, ib = a.nvlink_gb_s * 1e9, a.ib_gb_s * 1e9
    tp = candidate.tp
    n_ar = 6 if candidate.recompute == "full" else 4
    tp_bytes = n_ar * layers * 2 * (tp - 1) / tp * tokens_per_rank * preset.hidden_size * 2
    tp_comm_s = (1 - a.tp_overlap) * tp_bytes / nvlink
    cp = candidate.cp
    n_kv = 4 if candidate.recompute == "full" else 3
    kv_bytes = tokens_per_rank * 2 * preset.num_query_groups * preset.head_dim / tp * 2
    ring_bw = nvlink if tp * cp <= a.gpus_per_node else ib
    ring_s = n_kv * layers * (cp - 1) * kv_bytes / ring_bw
    cp_comm_s = max(0.0, ring_s - a.cp_overlap * attention_s)
    pair_s = compute_s + tp_comm_s + cp_comm_s

    if gradient_bytes is None:
        gradient_bytes = 4 * lower_bound.params_per_gpu(preset, ParallelConfig(tp=tp))
    n = candidate.dp * cp
    world = tp * cp * candidate.dp
    dp_bw = nvlink if world <= a.gpus_per_node else ib
    dp_comm_s = 2 * (n - 1) / n * gradient_bytes / dp_bw if n > 1 else 0.0
    pairs_per_rank = math.ceil(a.global_batch_pairs / candidate.dp)
    steps_pairs = pairs_per_rank * candidate.dp
    job_s_per_pair = (pairs_per_rank / pairs * pair_s + dp_comm_s) / steps_pairs
    return TimeProjection(model_flops, hardware_flops, compute_s, tp_comm_s, cp_comm_s, dp_comm_s, pair_s,
                          job_s_per_pair)


# ------------------------------------------------------------------------------ search
def candidates(spec: PlanSpec, gpus: int, recomputes: tuple[str, ...] = ("none", "full"),
               gpus_per_node: int = 8, max_tp: int = 8, sequence_parallel: bool = True) -> list[Candidate]:
    """TP in divisors of gcd(heads, kv heads, vocab) up to min(max_tp, gpus_per_node) dividing `gpus`, CP in
    powers of two with tp*cp dividing `gpus`, DP = gpus / (tp*cp), each recompute mode; sequence parallel
    wherever TP > 1 unless `sequence_parallel` is False."""
    preset = get_preset(spec.preset)
    out = []
    limit = min(max_tp, gpus_per_node)
    for tp in range(1, limit + 1):
        if preset.num_attention_heads % tp or preset.num_query_groups % tp or preset.vocab_size % tp or gpus % tp:
            continue
        cp = 1
        while tp * cp <= gpus:
            if gpus % (tp * cp) == 0:
                out += [Candidate(tp, cp, gpus // (tp * cp), rc, sequence_parallel and tp > 1) for rc in recomputes]
            cp *= 2
    return out


@dataclasses.dataclass
class Row:
    candidate: Candidate
    lower_bound: int
    projection: TimeProjection
    plan: ScaledPlan | None = None
    status: str = "not dry-run"
    """fits | does not fit | pruned: lower bound | pruned: implied by ... | not dry-run (search stopped)"""


@dataclasses.dataclass
class SearchResult:
    spec: PlanSpec
    gpus: int
    gpu_memory_gib: float
    assumptions: Assumptions
    rows: list[Row]
    dry_runs: int
    cache_hits: int
    seconds: float
    config: str

    @property
    def usable_bytes(self) -> float:
        return self.gpu_memory_gib * GIB * (1 - self.assumptions.reserve_fraction)

    def fitting(self) -> list[Row]:
        return [row for row in self.rows if row.status == "fits"]

    def lines(self) -> list[str]:
        s = self.spec
        out = [f"layout search: {s.preset}, {self.gpus} GPUs of {self.gpu_memory_gib:g} GiB "
               f"({self.usable_bytes / GIB:.1f} GiB usable), mode={s.mode} ({s.objective}), short={s.short_tokens} "
               f"long={s.long_tokens} response={s.response_tokens}, {s.params_dtype}"
               f"{', distributed optimizer' if s.distributed_optimizer else ''}; PP not searched (dry-run a PP "
               "layout with --pp)",
               "memory: dry run (fake tensors) at 2 and 4 layers, extrapolated to the full depth (exact: affine "
               "in layers); time: PROJECTION from the roofline below, not a measurement"]
        fits = self.fitting()
        if self.rows and all(r.status.startswith("pruned: DP does not divide") for r in self.rows):
            out.append(f"  no layout of {self.gpus} GPUs has a DP that divides --global-batch-pairs "
                       f"{self.assumptions.global_batch_pairs}: choose another GPU count or global batch")
        elif not fits:
            out.append("  no searched layout fits: more GPUs, a shorter long context, the distributed optimizer, "
                       "or PP (not searched: dry-run a PP layout with --pp)")
        else:
            out.append(f"  {'layout':<38} {'peak GiB':>9} {'headroom':>9} {'s/pair/replica':>15} "
                       f"{'job s/pair':>11}  (compute / TP / CP exposed, s; DP per step)")
        for row in fits:
            p, c = row.projection, row.candidate
            out.append(f"  {c.label:<38} {row.plan.peak_gib:9.2f} {self.usable_bytes / GIB - row.plan.peak_gib:9.2f}"
                       f" {p.pair_s:15.2f} {p.job_s_per_pair:11.3f}  ({p.compute_s:.2f} / {p.tp_comm_s:.2f} / "
                       f"{p.cp_comm_s:.2f}; {p.dp_comm_s_per_step:.2f})")
            out.append(f"      {sbatch_line(c, self.gpus, self.assumptions.gpus_per_node, self.config)}")
        counts: dict[str, int] = {}
        for row in self.rows:
            key = row.status.split(" (")[0]
            counts[key] = counts.get(key, 0) + 1
        out.append("candidates: " + ", ".join(f"{n} {k}" for k, n in counts.items())
                   + f"; {self.dry_runs} layer-scaled dry runs ({self.cache_hits} cache hits), {self.seconds:.0f} s")
        not_fitting = [r for r in self.rows if r.status == "does not fit"]
        for row in not_fitting:
            out.append(f"  does not fit: {row.candidate.label}: dry-run peak {row.plan.peak_gib:.2f} GiB")
        out += self.assumptions.lines()
        return out

    def as_dict(self) -> dict:
        return {"spec": dataclasses.asdict(self.spec), "gpus": self.gpus, "gpu_memory_gib": self.gpu_memory_gib,
                "assumptions": dataclasses.asdict(self.assumptions), "seconds": self.seconds,
                "dry_runs": self.dry_runs, "cache_hits": self.cache_hits,
                "rows": [{"candidate": dataclasses.asdict(r.candidate), "status": r.status,
                          "lower_bound_bytes": r.lower_bound, "projection": dataclasses.asdict(r.projection),
                          "plan": None if r.plan is None else dataclasses.asdict(r.plan)} for r in self.rows]}


def sbatch_line(candidate: Candidate, gpus: int, gpus_per_node: int = 8, config: str = "CONFIG.yaml") -> str:
    """The examples/slurm command for this layout (DP follows from the GPU count)."""
    overrides = (f"parallel.tp={candidate.tp} parallel.pp=1 parallel.cp={candidate.cp} "
                 f"parallel.sequence_parallel={str(candidate.sequence_parallel).lower()} "
                 f"model.recompute={candidate.recompute}")
    if gpus <= gpus_per_node:
        env = f"GPUS_PER_NODE={gpus} " if gpus != 8 else ""
        return f"{env}sbatch --gpus-per-node={gpus} examples/slurm/train_single_node.sbatch {config} {overrides}"
    nodes = gpus // gpus_per_node
    env = f"GPUS_PER_NODE={gpus_per_node} " if gpus_per_node != 8 else ""
    return (f"{env}sbatch --nodes {nodes} --gpus-per-node={gpus_per_node} examples/slurm/train_multi_node.sbatch "
            f"{config} {overrides}")


def _dominates(failed: Candidate, other: Candidate) -> bool:
    """True when `other` needs at least as much memory per GPU as `failed` (no more TP, CP or recompute)."""
    return (other.tp <= failed.tp and other.cp <= failed.cp
            and RECOMPUTE_ORDER[other.recompute] <= RECOMPUTE_ORDER[failed.recompute])


def _dry_run(spec: PlanSpec, c: Candidate, log=None) -> tuple[ScaledPlan, bool]:
    """(layer-scaled dry run of `spec` as rank 0 of candidate `c`, whether it came from the cache). DP only
    changes the rank's memory with the distributed optimizer, so other DP sizes share one run."""
    run_spec = dataclasses.replace(spec, tp=c.tp, cp=c.cp, pp=1, sequence_parallel=c.sequence_parallel,
                                   recompute=c.recompute,
                                   dp=c.dp if spec.distributed_optimizer else 1, stage="first", num_layers=None)
    key = tuple(sorted(dataclasses.asdict(run_spec).items()))
    cached = key in _CACHE
    if not cached:
        _CACHE[key] = scaled_plan(run_spec)
        if log:
            log(f"  dry run {c.label}: {_CACHE[key].peak_gib:.2f} GiB ({_CACHE[key].seconds:.0f} s)")
    return _CACHE[key], cached


def search_layouts(spec: PlanSpec, gpus: int, gpu_memory_gib: float, assumptions: Assumptions = Assumptions(),
                   recomputes: tuple[str, ...] = ("none", "full"), top: int = 5, config: str = "CONFIG.yaml",
                   log=None, sequence_parallel: bool = True) -> SearchResult:
    """Candidates of `spec`'s model and batch shape over `gpus` GPUs, the ones that fit by the (layer-scaled)
    dry run, ordered by projected job seconds per pair. `spec`'s tp/cp/dp/recompute are ignored."""
    if gpus % assumptions.gpus_per_node and gpus > assumptions.gpus_per_node:
        raise ValueError(f"--gpus {gpus} is not a whole number of nodes of {assumptions.gpus_per_node} GPUs")
    start = time.perf_counter()
    usable = gpu_memory_gib * GIB * (1 - assumptions.reserve_fraction)
    rows = [Row(c, memory_lower_bound(spec, c), project_time(spec, c, assumptions))
            for c in candidates(spec, gpus, recomputes, assumptions.gpus_per_node,
                                sequence_parallel=sequence_parallel)]
    rows.sort(key=lambda r: (r.projection.job_s_per_pair, r.candidate.tp))
    dry_runs = hits = found = 0
    failed: list[Candidate] = []
    for row in rows:
        c = row.candidate
        if assumptions.global_batch_pairs % c.dp:  # train would refuse it: never recommend it
            row.status = (f"pruned: DP does not divide the global batch (DP={c.dp}, --global-batch-pairs "
                          f"{assumptions.global_batch_pairs})")
            continue
        if row.lower_bound > usable:
            row.status = f"pruned: lower bound (lower bound {row.lower_bound / GIB:.1f} GiB)"
            continue
        blocker = next((f for f in failed if _dominates(f, c)), None)
        if blocker is not None:
            row.status = f"pruned: implied by ({blocker.label} does not fit)"
            continue
        if top and found >= top:
            row.status = "not dry-run (search stopped)"
            continue
        row.plan, cached = _dry_run(spec, c, log)
        hits, dry_runs = hits + cached, dry_runs + (not cached)
        row.projection = project_time(spec, c, assumptions, row.plan.persistent_bytes.get("gradients (DDP buffer)"))
        if row.plan.peak_bytes <= usable:
            row.status = "fits"
            found += 1
        else:
            row.status = "does not fit"
            failed.append(c)
    rows.sort(key=lambda r: (r.status != "fits", r.projection.job_s_per_pair))
    return SearchResult(spec, gpus, gpu_memory_gib, assumptions, rows, dry_runs, hits,
                        time.perf_counter() - start, config)


def smallest_layout(spec: PlanSpec, gpu_memory_gib: float, recompute: str, assumptions: Assumptions = Assumptions(),
                    max_gpus: int = 256, log=None, sequence_parallel: bool = True) -> Row | None:
    """The fewest GPUs of one model replica (DP=1, PP=1) whose rank 0 fits, by the layer-scaled dry run: TP x CP
    in increasing size (TP within a node, CP powers of two), the projected-faster one first at equal size;
    skipped without a dry run where the lower bound exceeds the usable memory. None when nothing up to
    `max_gpus` fits."""
    usable = gpu_memory_gib * GIB * (1 - assumptions.reserve_fraction)
    size = 1
    while size <= max_gpus:
        rows = [Row(c, memory_lower_bound(spec, c), project_time(spec, c, assumptions))
                for c in candidates(spec, size, (recompute,), assumptions.gpus_per_node,
                                    sequence_parallel=sequence_parallel) if c.dp == 1]
        for row in sorted(rows, key=lambda r: r.projection.pair_s):
            if row.lower_bound > usable:
                continue
            c = row.candidate
            row.plan, _ = _dry_run(spec, c, log)
            row.projection = project_time(spec, c, assumptions, row.plan.persistent_bytes.get("gradients (DDP buffer)"))
            if row.plan.peak_bytes <= usable:
                row.status = "fits"
                return row
            row.status = "does not fit"
        size *= 2
    return None
