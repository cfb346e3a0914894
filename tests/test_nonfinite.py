"""The update guard on its own: undo and keep, on sets of tensors that overlap as alternate mode's do."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from mtssl_lightning.nonfinite import UpdateGuard, choose


def _update(optimizer: torch.optim.Optimizer, params: list[nn.Parameter], value: float) -> None:
    optimizer.zero_grad()
    loss = sum((p * value).sum() for p in params)
    loss.backward()
    optimizer.step()


def test_overlapping_sets_undo_and_keep_with_one_shared_scratch() -> None:
    """Two optimizers share a "trunk" (as each task's optimizer does in alternate mode): a
    non-finite update of one is undone exactly (parameters, moments, BatchNorm buffers), a finite
    one of the other is kept; the two sets keep their own saved copies but borrow one stage buffer
    (per dtype), sized for the larger set."""
    torch.manual_seed(0)
    trunk, head_a, head_b = nn.Linear(6, 5), nn.Linear(5, 2), nn.Linear(5, 3)
    norm = nn.BatchNorm1d(5)
    opt_a = torch.optim.Adam([*trunk.parameters(), *head_a.parameters()], lr=0.1)
    opt_b = torch.optim.Adam([*trunk.parameters(), *head_b.parameters()], lr=0.1)
    params_a, params_b = list(opt_a.param_groups[0]["params"]), list(opt_b.param_groups[0]["params"])
    for opt, ps in ((opt_a, params_a), (opt_b, params_b)):  # moments exist, so they are guarded too
        _update(opt, ps, 1.0)
    guard = UpdateGuard("skip")

    for step in range(2):
        before = [p.detach().clone() for p in params_a] + [s.clone() for p in params_a for s in opt_a.state[p].values() if s.dim()]
        snapshot = guard.begin([opt_a], [norm])
        norm.train()(torch.randn(8, 5))  # the forward pass moves the running statistics
        _update(opt_a, params_a, float("nan"))
        assert not all(torch.isfinite(p).all() for p in params_a)
        guard.settle(snapshot, torch.tensor(False), step)
        after = [p.detach() for p in params_a] + [s for p in params_a for s in opt_a.state[p].values() if s.dim()]
        for old, new in zip(before, after):
            torch.testing.assert_close(new, old, rtol=0, atol=0)
        assert torch.equal(norm.running_mean, torch.zeros(5)) and int(norm.num_batches_tracked) == 0

        snapshot = guard.begin([opt_b], [])
        kept = [p.detach().clone() for p in params_b]
        _update(opt_b, params_b, 1.0)
        moved = [p.detach().clone() for p in params_b]
        guard.settle(snapshot, torch.tensor(True), step)
        assert all(torch.equal(p, m) for p, m in zip(params_b, moved)) and not all(torch.equal(p, k) for p, k in zip(params_b, kept))

    assert guard.read() == (2, 0)
    groups = [g for gs in guard._groups.values() for g in gs]
    float_groups = [g for g in groups if g.saved.dtype == torch.float32]
    assert len(float_groups) == 2  # set a (trunk, head a, BatchNorm statistics) and set b; an int64 group holds the batch count
    assert len({id(g.scratch) for g in float_groups}) == 1
    assert float_groups[0].scratch.buffer.numel() == max(g.saved.numel() for g in float_groups)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16, torch.float64, torch.int64, torch.bool])
@pytest.mark.parametrize("ok", [True, False])
def test_choose_is_bit_exact_by_both_methods(dtype: torch.dtype, ok: bool) -> None:
    """Both ways of choosing (``where`` for CUDA, the integer-view blend elsewhere) give the chosen
    tensor bit for bit, NaN, infinities and -0 included (compared as raw bytes)."""
    if dtype.is_floating_point:
        live = torch.tensor([1.5, float("nan"), float("inf"), -0.0, 3.0, -2.25]).to(dtype)
        saved = torch.tensor([2.0, 1.0, -float("inf"), 0.0, float("nan"), 7.0]).to(dtype)
    else:
        live, saved = torch.tensor([1, 0, 5, 7, 1, 0]).to(dtype), torch.tensor([0, 1, 0, 3, 1, 1]).to(dtype)
    expected = (live if ok else saved).clone()
    for method in ("where", "bits", "auto"):
        out = live.clone()
        choose(torch.tensor(ok), out, saved, method)
        assert torch.equal(out.view(torch.uint8), expected.view(torch.uint8)), method
