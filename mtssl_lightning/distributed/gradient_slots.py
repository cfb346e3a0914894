"""Per-task gradient slots, reduced across ranks in buckets, as DDP reduces one gradient.

Under task-parallel training every rank computes the gradients of *its* tasks, at the same
parameters; each task's optimizer then needs that task's gradient averaged over the task's ranks
— on *every* rank, so that all ranks apply identical updates. :class:`GradientSlots` holds one
slot per task (its gradient of the shared trunk, plus its own head / lasso parameters), which a
rank fills for its tasks (scaled by ``1 / |ranks of t|``) and leaves zero for the others; one SUM
all-reduce of all slots then gives every rank every task's mean gradient.

Layout (the buffers are allocated once per set of slots and reused, like DDP's buckets):

* the shared parameters, in reverse registration order (roughly the order backward produces
  their gradients), grouped by dtype into buckets of at most ``bucket_bytes``; a bucket is a
  ``(S, n)`` tensor — row ``s`` is slot ``s``'s gradient of those ``n`` elements;
* each task's own parameters once (only its slot has them), in ``(n,)`` buckets per dtype.

Reductions run in the gradients' own dtype, one asynchronous all-reduce per bucket, launched in
bucket order on every rank (the collective order must match across ranks, whatever tasks they
run). With :meth:`GradientSlots.collect` the shared buckets are filled by post-accumulate-grad
hooks *during* backward and each is launched as soon as it is complete and all before it are
launched, so communication overlaps the rest of backward; the own-parameter buckets follow at
:meth:`GradientSlots.finish`.

Bytes per reduction: ``S · P_shared + Σ_t P_own(t)`` elements × the dtype's size (ring
all-reduce moves about twice that over each rank's link).
"""

from __future__ import annotations

from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass, field

import torch
import torch.distributed as dist
from torch import Tensor, nn

__all__ = ["GradientSlots", "DEFAULT_BUCKET_BYTES"]

#: DDP's default bucket size
DEFAULT_BUCKET_BYTES = 25 * 1024 * 1024


@dataclass
class _Bucket:
    """One flat buffer: ``flat`` is ``(S, n)`` (shared parameters) or ``(n,)`` (own parameters)."""

    params: list[nn.Parameter]
    flat: Tensor
    offsets: list[int]
    ready: int = 0
    work: object | None = None
    launched: bool = False
    index: dict[int, int] = field(default_factory=dict)  # id(param) -> position in params

    def view(self, p: nn.Parameter, row: int | None = None) -> Tensor:
        i = self.index[id(p)]
        flat = self.flat if row is None else self.flat[row]
        return flat[self.offsets[i] : self.offsets[i] + p.numel()].view(p.shape)


def _buckets(params: Sequence[nn.Parameter], rows: int | None, bucket_bytes: int) -> list[_Bucket]:
    by_dtype: dict[torch.dtype, list[nn.Parameter]] = {}
    for p in params:
        by_dtype.setdefault(p.dtype, []).append(p)
    out: list[_Bucket] = []
    for dtype, group in by_dtype.items():
        chunk: list[nn.Parameter] = []
        size = 0
        for i, p in enumerate(group):
            chunk.append(p)
            size += p.numel()
            if size * (rows or 1) * p.element_size() >= bucket_bytes or i == len(group) - 1:
                offsets = [0]
                for q in chunk[:-1]:
                    offsets.append(offsets[-1] + q.numel())
                shape = (rows, size) if rows is not None else (size,)
                flat = torch.zeros(shape, dtype=dtype, device=chunk[0].device)
                out.append(_Bucket(chunk, flat, offsets, index={id(q): k for k, q in enumerate(chunk)}))
                chunk, size = [], 0
    return out


class GradientSlots:
    """Gradient slots of ``slots`` (task names) over ``shared`` and each task's ``own`` parameters.

    Args:
        shared: parameters every slot has (the trunk), in registration order.
        own: ``{task: its own parameters}`` (head, lasso weights); a task's own parameters live in
            its slot only. Keys need not be slots (sum mode: one slot, every task's own parameters).
        slots: the slot names, one row each in the shared buckets.
        bucket_bytes: the largest bucket (a bucket holds whole parameters, all its rows).
        group: the process group (default: the world).
    """

    def __init__(
        self,
        shared: Sequence[nn.Parameter],
        own: dict[str, Sequence[nn.Parameter]],
        slots: Sequence[str],
        bucket_bytes: int = DEFAULT_BUCKET_BYTES,
        group: dist.ProcessGroup | None = None,
    ) -> None:
        self.slots = list(slots)
        self.group = group
        self.shared = _buckets([p for p in reversed(shared) if p.requires_grad], len(self.slots), bucket_bytes)
        self.own_params = {name: [p for p in ps if p.requires_grad] for name, ps in own.items()}
        self.own = _buckets([p for ps in self.own_params.values() for p in ps], None, bucket_bytes)
        self._shared_of = {id(p): b for b in self.shared for p in b.params}
        self._own_of = {id(p): b for b in self.own for p in b.params}
        self._next = 0  # the next shared bucket to launch

    # -------------------------------------------------------------------- filling
    def begin(self) -> None:
        """Zero every slot (a rank's slots of tasks it does not run stay zero)."""
        for b in [*self.shared, *self.own]:
            b.flat.zero_()
            b.ready, b.work, b.launched = 0, None, False
        self._next = 0

    def add(self, slot: str, tasks: Sequence[str], scale: float) -> None:
        """Move the gradients of the last backward pass into ``slot`` (shared parameters) and into
        the own buckets of ``tasks``, times ``scale``; leaves those ``.grad`` as ``None``."""
        row = self.slots.index(slot)
        for b in self.shared:
            for p in b.params:
                if p.grad is not None:
                    b.view(p, row).add_(p.grad, alpha=scale)
                    p.grad = None
        self._add_own(tasks, scale)

    def _add_own(self, tasks: Sequence[str], scale: float) -> None:
        for name in tasks:
            for p in self.own_params.get(name, []):
                if p.grad is not None:
                    self._own_of[id(p)].view(p).add_(p.grad, alpha=scale)
                    p.grad = None

    @contextmanager
    def collect(self, slot: str, tasks: Sequence[str], scale: float, launch: bool) -> Iterator[None]:
        """Inside: a backward pass whose shared gradients go straight into ``slot`` (× ``scale``) as
        they are accumulated; with ``launch`` (the rank's last backward pass of the step), each
        shared bucket's all-reduce starts as soon as the bucket is complete. On exit, the own
        gradients of ``tasks`` are added the same way."""
        row = self.slots.index(slot)

        def hook(p: Tensor) -> None:
            bucket = self._shared_of[id(p)]
            assert p.grad is not None
            bucket.view(p, row).add_(p.grad, alpha=scale)
            p.grad = None  # the slot holds it: no second copy of the trunk's gradient
            if launch:
                bucket.ready += 1
                self._launch_ready()

        handles = [p.register_post_accumulate_grad_hook(hook) for b in self.shared for p in b.params]
        try:
            yield
        finally:
            for h in handles:
                h.remove()
        self._add_own(tasks, scale)

    # -------------------------------------------------------------------- reducing
    def _start(self, bucket: _Bucket) -> None:
        # one process (e.g. a task-parallel strategy on one device): the slots are already the sums
        if dist.is_available() and dist.is_initialized() and dist.get_world_size(self.group) > 1:
            bucket.work = dist.all_reduce(bucket.flat, op=dist.ReduceOp.SUM, group=self.group, async_op=True)
        bucket.launched = True

    def _launch_ready(self) -> None:
        # in bucket order only: every rank must issue the same collectives in the same order
        while self._next < len(self.shared) and self.shared[self._next].ready == len(self.shared[self._next].params):
            self._start(self.shared[self._next])
            self._next += 1

    def finish(self) -> None:
        """Launch what is not launched yet (shared buckets in order, then the own buckets) and wait
        for all: afterwards every rank holds the SUM over ranks of every slot."""
        for b in self.shared[self._next :]:
            self._start(b)
        self._next = len(self.shared)
        for b in self.own:
            self._start(b)
        for b in [*self.shared, *self.own]:
            if b.work is not None:
                b.work.wait()  # type: ignore[attr-defined]
                b.work = None

    # -------------------------------------------------------------------- reading
    def assign(self, slot: str, tasks: Sequence[str]) -> None:
        """Set ``.grad`` of the shared parameters to ``slot``'s reduced gradient and of the own
        parameters of ``tasks`` to theirs (views of the buckets, no copy)."""
        row = self.slots.index(slot)
        for b in self.shared:
            for p in b.params:
                p.grad = b.view(p, row)
        for name in tasks:
            for p in self.own_params.get(name, []):
                p.grad = self._own_of[id(p)].view(p)

    def shared_gradient(self, slot: str) -> list[Tensor]:
        """``slot``'s reduced gradient of the shared parameters: one flat view per bucket."""
        row = self.slots.index(slot)
        return [b.flat[row] for b in self.shared]

    def numel(self) -> int:
        """Elements one reduction moves: ``S · P_shared + Σ_t P_own(t)``."""
        return sum(b.flat.numel() for b in [*self.shared, *self.own])
