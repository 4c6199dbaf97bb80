"""Live-bytes accounting of one training step, for real tensors and for fake ones alike.

`LiveBytesTracker` is a `TorchDispatchMode`: every tensor an op returns has its storage recorded once
(keyed by the C++ storage), with its size in bytes, and a weakref finalizer on the storage takes the
bytes off again when the last tensor using it dies. Live bytes therefore count what a caching
allocator would hand out if it had no rounding and no fragmentation: the sum of the storages that
exist now, views counted once. Under `torch._subclasses.FakeTensorMode` the same ops return fake
tensors with (meta) storages of the same sizes, so the same tracker measures a step that allocates
nothing; `tests/plan/test_plan.py` checks that the fake and the real peaks agree.

Data-dependent reads (`Tensor.item()`, `.tolist()`, `bool(tensor)`) reach the dispatcher as
`aten._local_scalar_dense`; a fake tensor has no value. With `fake_scalars=True`, tensors computed only
from known values (the real collated batch: cu_seqlens, positions, index tables; python numbers: Adam's
step counter) carry a real "shadow" value computed alongside and answer with it (`_propagate_values`);
every other read gets a placeholder, counted in `placeholder_reads`: 0 / False / 0.0 (the step's NaN/Inf
flags: "finite, nothing to skip"; the gradient norm), except float64: 1.0 (train_step's metric totals,
divided by the pair count). Placeholders allocate nothing and steer no shapes, so the memory figures do
not depend on them.

Categories: `mark(name, tensors)` names the storages of persistent tensors (weights, the DDP gradient
buffer, the optimizer's states); `breakdown()` splits the peak into those and the rest ("activations
and temporaries": everything alive at the peak that no category claims).
"""

from __future__ import annotations

import dataclasses
import weakref
from collections.abc import Iterable

import torch
from torch._subclasses.fake_tensor import (
    DataDependentOutputException,
    DynamicOutputShapeException,
    UnsupportedOperatorException,
)
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils._pytree import tree_leaves
from torch.utils.weak import WeakTensorKeyDictionary

from megatron_solopo.plan.lower_bound import GIB

__all__ = ["LiveBytesTracker", "MemoryBreakdown", "storage_key", "GIB"]

_SHADOW_NUMEL_LIMIT = 1 << 20
_NO_VALUES = {torch.ops.aten.empty.memory_format, torch.ops.aten.empty_strided.default,
              torch.ops.aten.empty_like.default, torch.ops.aten.new_empty.default}


def storage_key(tensor: torch.Tensor) -> int:
    """Identity of the storage behind `tensor` (shared by all its views)."""
    return tensor.untyped_storage()._cdata


def _is_fake(tensor: torch.Tensor) -> bool:
    from torch._subclasses.fake_tensor import FakeTensor

    return isinstance(tensor, FakeTensor)


@dataclasses.dataclass
class MemoryBreakdown:
    """Peak live bytes of one rank over the measured window, split by what holds them."""

    peak_bytes: int
    """Largest sum of live storages during the window."""
    persistent_bytes: dict[str, int]
    """Bytes per named category (weights, gradients, optimizer, ...) alive at the peak."""
    activations_bytes: int
    """Everything else alive at the peak: activations saved for the backward, temporaries, logits."""
    peak_phase: str
    """Phase the peak occurred in (forward | backward | optimizer | other)."""
    peak_op: str
    """The op whose output set the peak."""
    placeholder_reads: int = 0
    """Data-dependent scalar reads answered with a placeholder (fake mode only)."""
    phase_peaks: dict[str, int] = dataclasses.field(default_factory=dict)
    """Largest live bytes reached in each phase of the window (forward, loss, backward, optimizer, ...)."""
    real_value_ops: list[str] = dataclasses.field(default_factory=list)
    """Ops without a usable fake implementation, answered from the batch's real values (fake mode)."""
    stand_in_ops: list[str] = dataclasses.field(default_factory=list)
    """c10d collectives without a fake kernel, run on empty stand-ins (fake mode; in place, no memory)."""

    def as_dict(self) -> dict:
        return dataclasses.asdict(self)

    def lines(self) -> list[str]:
        """Human-readable rows, GiB with 3 decimals and the exact bytes."""
        rows = [(name, value) for name, value in self.persistent_bytes.items()]
        rows += [("activations+temporaries", self.activations_bytes), ("PEAK", self.peak_bytes)]
        width = max(len(name) for name, _ in rows)
        out = [f"  {name:<{width}}  {value / GIB:10.3f} GiB  ({value:,} bytes)" for name, value in rows]
        out.append(f"  peak reached in: {self.peak_phase} ({self.peak_op})")
        if self.phase_peaks:
            out.append("  peak by phase: " + ", ".join(f"{name} {value / GIB:.3f} GiB"
                                                        for name, value in self.phase_peaks.items()))
        if self.real_value_ops:
            out.append(f"  no fake implementation, run on the batch's real values: {', '.join(self.real_value_ops)}")
        if self.stand_in_ops:
            out.append("  no fake kernel, run on empty stand-ins (in place, no memory): "
                       + ", ".join(self.stand_in_ops))
        return out


class LiveBytesTracker(TorchDispatchMode):
    """Counts live storage bytes of every tensor produced while the mode is active (see the module doc)."""

    def __init__(self, fake_scalars: bool = False):
        super().__init__()
        self.fake_scalars = fake_scalars
        self.live_bytes = 0
        self.peak_bytes = 0
        self.phase = "other"
        self.placeholder_reads = 0
        self._sizes: dict[int, int] = {}
        self._categories: dict[int, str] = {}
        self._category_totals: dict[str, int] = {}
        self._peak_snapshot: dict[str, int] = {}
        self._peak_where = ("other", "")
        self._phase_peaks: dict[str, int] = {}
        self._shadows = WeakTensorKeyDictionary()  # fake tensor -> its real value, where known
        self.real_value_ops: set[str] = set()
        """Data-dependent ops answered from the real values of the batch (fake mode)."""
        self.stand_in_ops: set[str] = set()
        """c10d collectives without a fake kernel, run on empty stand-ins (fake mode)."""

    # ---------------------------------------------------------------- dispatch
    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        if func is torch.ops.aten._local_scalar_dense.default and self.fake_scalars and _is_fake(args[0]):
            return self._fake_scalar(args[0])
        try:
            out = func(*args, **kwargs)
        except (DataDependentOutputException, DynamicOutputShapeException):
            out = self._run_on_real_values(func, args, kwargs)
        except UnsupportedOperatorException:
            if func.namespace != "c10d" or not self.fake_scalars:
                raise
            out = self._collective_without_fake_impl(func, args, kwargs)
        for leaf in tree_leaves(out):
            if isinstance(leaf, torch.Tensor):
                self.track(leaf, func)
        if self.fake_scalars:
            self._propagate_values(func, args, kwargs, out)
        return out

    def _collective_without_fake_impl(self, func, args, kwargs):
        """An in-place c10d collective with no fake kernel (c10d.allreduce_coalesced_): on the fake backend
        collectives move no data, so it runs on empty real stand-ins; in place, it allocates nothing."""
        from torch._subclasses.fake_tensor import unset_fake_temporarily
        from torch.utils._pytree import tree_map

        def stand_in(value):
            return torch.empty(0, dtype=value.dtype) if isinstance(value, torch.Tensor) else value

        self.stand_in_ops.add(str(func))
        with unset_fake_temporarily():
            return func(*tree_map(stand_in, args), **tree_map(stand_in, kwargs))

    def _run_on_real_values(self, func, args, kwargs):
        """An op a fake tensor cannot answer (aten.equal, nonzero, ...): run it on the inputs' real values
        when they all have one (then its outputs are fake tensors of the real results); else name the op."""
        from torch._subclasses.fake_tensor import unset_fake_temporarily
        from torch.utils._pytree import tree_map

        inputs = [leaf for leaf in tree_leaves((args, kwargs)) if isinstance(leaf, torch.Tensor)]
        if not self.fake_scalars or any(self._real_value(t) is None for t in inputs):
            raise NotImplementedError(
                f"the dry run met {func}, whose output depends on tensor values, on tensors whose values it does "
                "not know (weights or activations); this op has no fake implementation usable here")
        fake_mode = next(t.fake_mode for t in inputs if _is_fake(t))
        with unset_fake_temporarily():
            real_out = func(*tree_map(self._real_value, args), **tree_map(self._real_value, kwargs))
        self.real_value_ops.add(str(func))

        def to_fake(value):
            if not isinstance(value, torch.Tensor):
                return value
            fake = fake_mode.from_tensor(value)
            self._shadows[fake] = value
            return fake

        return tree_map(to_fake, real_out)

    # ---------------------------------------------------------------- values under fake tensors
    def _real_value(self, value):
        if isinstance(value, torch.Tensor):
            return self._shadows.get(value) if _is_fake(value) else value
        return value

    def _propagate_values(self, func, args, kwargs, out) -> None:
        """Small ops whose inputs all have known values are also run on the real values (shadows).

        Sequence boundaries (cu_seqlens), positions and index tables come from the real collated batch;
        Megatron's THD RoPE and our ring attention read them with .tolist() to split tensors, and Adam
        reads its step counter: a fake tensor alone cannot answer. Weights and activations never get
        shadows (they descend from uninitialized or fake tensors); an in-place op that cannot be
        followed drops the shadow of the tensor it mutates.
        """
        outs = [leaf for leaf in tree_leaves(out) if isinstance(leaf, torch.Tensor) and _is_fake(leaf)]
        if not outs:
            return
        inputs = [leaf for leaf in tree_leaves((args, kwargs)) if isinstance(leaf, torch.Tensor)]
        known = all(self._real_value(t) is not None for t in inputs)
        if (not known or func in _NO_VALUES or any(t.dtype.is_complex for t in outs)
                or sum(t.numel() for t in outs) > _SHADOW_NUMEL_LIMIT):
            for tensor in outs:  # e.g. x.add_(fake) on a shadowed x: its shadow is stale now
                self._shadows.pop(tensor, None)
            return
        from torch._subclasses.fake_tensor import unset_fake_temporarily
        from torch.utils._pytree import tree_map

        with unset_fake_temporarily():
            real_out = func(*tree_map(self._real_value, args), **tree_map(self._real_value, kwargs))
        for fake_leaf, real_leaf in zip(outs, [x for x in tree_leaves(real_out) if isinstance(x, torch.Tensor)]):
            self._shadows[fake_leaf] = real_leaf

    def _fake_scalar(self, tensor: torch.Tensor):
        real = self._shadows.get(tensor)
        if real is not None:
            from torch._subclasses.fake_tensor import unset_fake_temporarily

            with unset_fake_temporarily():
                return real.item()
        self.placeholder_reads += 1
        if tensor.dtype == torch.float64:  # train_step's metric totals: a non-zero pair count to divide by
            return 1.0
        return 0.0 if tensor.dtype.is_floating_point else (False if tensor.dtype == torch.bool else 0)

    def track(self, tensor: torch.Tensor, func=None) -> None:
        """Records `tensor`'s storage if it is new (also for tensors made outside the mode)."""
        if tensor.layout != torch.strided:
            return
        storage = tensor.untyped_storage()
        key = storage._cdata
        if key in self._sizes:
            return
        nbytes = storage.nbytes()
        self._sizes[key] = nbytes
        weakref.finalize(storage, self._free, key)
        self.live_bytes += nbytes
        phase = self._current_phase()
        if self.live_bytes > self._phase_peaks.get(phase, 0):
            self._phase_peaks[phase] = self.live_bytes
        if self.live_bytes > self.peak_bytes:
            self.peak_bytes = self.live_bytes
            self._peak_where = (phase, str(func) if func is not None else "")
            self._peak_snapshot = self._category_bytes()

    def _free(self, key: int) -> None:
        nbytes = self._sizes.pop(key, 0)
        self.live_bytes -= nbytes
        category = self._categories.pop(key, None)
        if category is not None:
            self._category_totals[category] -= nbytes

    def _current_phase(self) -> str:
        return "backward" if torch._C._current_autograd_node() is not None else self.phase

    # ---------------------------------------------------------------- categories
    def mark(self, category: str, tensors: Iterable[torch.Tensor]) -> int:
        """Names the storages of `tensors` (first name wins); returns the bytes newly named."""
        added = 0
        for tensor in tensors:
            if not isinstance(tensor, torch.Tensor):
                continue
            self.track(tensor)
            key = storage_key(tensor)
            if key not in self._categories:
                self._name(key, category)
                added += self._sizes.get(key, 0)
        return added

    def _name(self, key: int, category: str) -> None:
        self._categories[key] = category
        self._category_totals[category] = self._category_totals.get(category, 0) + self._sizes.get(key, 0)

    def _category_bytes(self) -> dict[str, int]:
        return dict(self._category_totals)

    def mark_remaining(self, category: str) -> int:
        """Names every live, unnamed storage (e.g. buffers and caches that outlive the step)."""
        added = 0
        for key, nbytes in list(self._sizes.items()):
            if key not in self._categories:
                self._name(key, category)
                added += nbytes
        return added

    def reset_peak(self) -> None:
        """Starts a new measurement window at the current live bytes."""
        self.peak_bytes = self.live_bytes
        self._peak_snapshot = self._category_bytes()
        self._peak_where = (self.phase, "start of window")
        self._phase_peaks = {}
        self.placeholder_reads = 0

    def breakdown(self, order: Iterable[str] = ()) -> MemoryBreakdown:
        snapshot = dict(self._peak_snapshot)
        ordered = {name: snapshot.pop(name, 0) for name in order}
        ordered.update(snapshot)
        return MemoryBreakdown(peak_bytes=self.peak_bytes, persistent_bytes=ordered,
                               activations_bytes=self.peak_bytes - sum(ordered.values()),
                               peak_phase=self._peak_where[0], peak_op=self._peak_where[1],
                               placeholder_reads=self.placeholder_reads, phase_peaks=dict(self._phase_peaks),
                               real_value_ops=sorted(self.real_value_ops), stand_in_ops=sorted(self.stand_in_ops))
