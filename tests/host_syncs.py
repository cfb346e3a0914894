"""Counting, on the CPU, the operations that would stall the host on a GPU.

A ``TorchDispatchMode`` sees every aten op. On a CUDA device these make the host wait for the
device (a synchronisation): reading a value (``.item()``, ``bool(t)``, ``float(t)``, ``tolist``,
``torch.equal``), ops whose output size depends on the data (``nonzero``, boolean-mask indexing,
``masked_select``, ``unique``, ``bincount`` — CUDA's reads the input's maximum —,
``repeat_interleave`` without ``output_size``), and tensors made from Python data on the
device (``torch.tensor(…, device=cuda)``: a blocking copy from pageable host memory; seen here as
``lift_fresh``). On the CPU they are all cheap, but the dispatcher shows them just the same, so a
test can demand that a training step has none.
"""

from __future__ import annotations

import traceback
from collections import Counter
from typing import Any

import torch
from torch.utils._python_dispatch import TorchDispatchMode

aten = torch.ops.aten

#: ops that always read device data on the host
ALWAYS = {
    aten._local_scalar_dense.default: "read a value (.item()/bool()/float()/tolist())",
    aten.is_nonzero.default: "bool(tensor)",
    aten.equal.default: "torch.equal",
    aten.nonzero.default: "nonzero (data-dependent size)",
    aten.argwhere.default: "argwhere (data-dependent size)",
    aten.masked_select.default: "masked_select (data-dependent size)",
    aten.bincount.default: "bincount (CUDA reads the input's maximum)",
    aten._unique2.default: "unique",
    aten.unique_dim.default: "unique",
    aten.unique_consecutive.default: "unique_consecutive",
    aten.lift_fresh.default: "a tensor from Python data (a blocking host-to-device copy on a GPU)",
}
for _name in ("_unique",):
    if hasattr(aten, _name):
        ALWAYS[getattr(aten, _name).default] = "unique"


def _has_bool_index(args: tuple[Any, ...]) -> bool:
    indices = args[1] if len(args) > 1 else []
    return any(isinstance(i, torch.Tensor) and i.dtype == torch.bool for i in (indices or []))


class HostSyncCounter(TorchDispatchMode):
    """Counts (and remembers where) the ops that would synchronise the host with a GPU.

    ``counts``: ``Counter`` of reasons; ``where``: one short Python stack per occurrence (for the
    assertion message). Nest-safe: use as ``with HostSyncCounter() as counter: …``.
    """

    def __init__(self, keep_stacks: bool = True) -> None:
        super().__init__()
        self.counts: Counter[str] = Counter()
        self.where: list[str] = []
        self.ops = 0  # every op seen (a check that the mode was active at all)
        self.keep_stacks = keep_stacks

    def _record(self, reason: str) -> None:
        self.counts[reason] += 1
        if self.keep_stacks:
            frames = [f for f in traceback.extract_stack()[:-2] if "/torch/" not in f.filename or "/torch/optim/" in f.filename]
            ours = [f"{f.filename.split('/site-packages/')[-1].split('/work/main/')[-1]}:{f.lineno} {f.name}" for f in frames[-4:]]
            self.where.append(f"{reason}\n    " + "\n    ".join(ours))

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        self.ops += 1
        if func in ALWAYS:
            self._record(ALWAYS[func])
        elif func in (aten.index.Tensor, aten.index_put.default, aten.index_put_.default) and _has_bool_index(args):
            self._record("boolean-mask indexing (data-dependent size)")
        elif func is aten.repeat_interleave.Tensor and kwargs.get("output_size") is None:
            self._record("repeat_interleave without output_size")
        return func(*args, **kwargs)

    @property
    def total(self) -> int:
        return sum(self.counts.values())
