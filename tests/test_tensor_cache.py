"""Cached constant tensors are normal, grad-free tensors whatever mode first asked for them."""

from __future__ import annotations

import torch

from mtssl_lightning.tensor_cache import tensor_cache


def test_an_entry_first_built_under_inference_mode_is_a_normal_tensor_reused_after():
    calls = []

    @tensor_cache(maxsize=4)
    def ramp(n: int, dtype: torch.dtype) -> torch.Tensor:
        calls.append(n)
        return torch.arange(n, dtype=dtype)

    with torch.inference_mode():
        first = ramp(5, torch.float32)
    assert not first.is_inference() and not first.requires_grad
    assert ramp(5, torch.float32) is first and calls == [5]  # cached: built once
    x = torch.ones(5, requires_grad=True)
    (x * ramp(5, torch.float32)).sum().backward()  # saved for backward: fails for an inference tensor
    torch.testing.assert_close(x.grad, torch.arange(5.0))
