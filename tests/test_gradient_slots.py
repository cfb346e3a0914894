"""Per-task gradient slots (mtssl_lightning.distributed.gradient_slots) in one process: what each
slot holds against gradients computed directly, and that backward hooks start every shared
bucket's all-reduce before backward has finished (the overlap)."""

from __future__ import annotations

import torch
import torch.distributed as dist
from torch import nn

from mtssl_lightning.distributed.gradient_slots import GradientSlots


def _nets() -> tuple[nn.Module, dict[str, nn.Module]]:
    torch.manual_seed(0)
    trunk = nn.Sequential(nn.Linear(4, 8), nn.Tanh(), nn.Linear(8, 8), nn.Tanh(), nn.Linear(8, 6))
    return trunk, {"a": nn.Linear(6, 1), "b": nn.Linear(6, 2)}


def _loss(trunk: nn.Module, head: nn.Module, x: torch.Tensor) -> torch.Tensor:
    return head(trunk(x)).square().mean()


def _direct(trunk, head, x) -> list[torch.Tensor]:
    """The reference: ∂loss/∂(trunk, head) by autograd.grad, no hooks, no buffers."""
    return list(torch.autograd.grad(_loss(trunk, head, x), [*trunk.parameters(), *head.parameters()]))


def test_each_slot_holds_its_tasks_scaled_gradient_and_nothing_else():
    trunk, heads = _nets()
    x = {"a": torch.randn(5, 4), "b": torch.randn(3, 4)}
    own = {t: list(h.parameters()) for t, h in heads.items()}
    slots = GradientSlots(list(trunk.parameters()), own, ["a", "b"], bucket_bytes=256)
    assert len(slots.shared) > 1  # several buckets at this size
    slots.begin()
    with slots.collect("a", ["a"], 0.5, launch=False):  # a by hooks, b after its backward
        _loss(trunk, heads["a"], x["a"]).backward()
    _loss(trunk, heads["b"], x["b"]).backward()
    slots.add("b", ["b"], 0.25)
    assert all(p.grad is None for p in trunk.parameters())  # moved, not copied
    slots.finish()  # no process group: the sums are the slots themselves
    for task, scale in (("a", 0.5), ("b", 0.25)):
        slots.assign(task, [task])
        got = [p.grad for p in [*trunk.parameters(), *heads[task].parameters()]]
        for g, ref in zip(got, _direct(trunk, heads[task], x[task])):
            torch.testing.assert_close(g, scale * ref)
    assert slots.numel() == 2 * sum(p.numel() for p in trunk.parameters()) + sum(p.numel() for h in heads.values() for p in h.parameters())


def test_hooks_launch_every_shared_bucket_during_backward(tmp_path):
    trunk, heads = _nets()
    store = dist.FileStore(str(tmp_path / "store"), 1)
    dist.init_process_group("gloo", store=store, rank=0, world_size=1)
    try:
        group = dist.new_group([0])
        slots = GradientSlots(list(trunk.parameters()), {"a": list(heads["a"].parameters())}, ["a"], bucket_bytes=128, group=group)
        slots.begin()
        launched_inside: list[int] = []
        with slots.collect("a", ["a"], 1.0, launch=True):
            _loss(trunk, heads["a"], torch.randn(4, 4)).backward()
            launched_inside.append(slots._next)
        assert launched_inside == [len(slots.shared)] and len(slots.shared) > 2
        assert all(b.launched for b in slots.shared) and not any(b.launched for b in slots.own)
        slots.finish()
    finally:
        dist.destroy_process_group()
