"""Constant tensors made once per size/device/dtype and reused (no host-to-device copy per batch).

A cached tensor may first be asked for under ``torch.inference_mode`` (``trainer.validate`` and
``predict`` run under it). Built there, it would be an inference tensor, and a later training step
that saves it for its backward would fail ("Inference tensors cannot be saved for backward").
:func:`tensor_cache` builds every entry outside inference mode and without autograd, so where it
was first asked for does not matter.
"""

from __future__ import annotations

import functools
from collections.abc import Callable
from typing import TypeVar

import torch

F = TypeVar("F", bound=Callable)


def tensor_cache(maxsize: int = 16) -> Callable[[F], F]:
    """``functools.lru_cache(maxsize)`` for functions that build constant tensors: each entry is
    built with inference mode off and gradients off (a normal, grad-free tensor in any mode)."""

    def decorate(build: F) -> F:
        @functools.lru_cache(maxsize=maxsize)
        @functools.wraps(build)
        def cached(*args):  # noqa: ANN002, ANN202 - the wrapped function's own signature
            with torch.inference_mode(False), torch.no_grad():
                return build(*args)

        return cached  # type: ignore[return-value]

    return decorate
