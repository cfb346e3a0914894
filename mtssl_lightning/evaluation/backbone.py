"""The pretrained trunk as a transfer backbone: loading, freezing, and the representation heads read.

Every evaluation module (linear probe, kNN, fine-tuning, detection, depth) gets its trunk
here, so "which weights" and "frozen or not" mean the same thing everywhere:

* ``checkpoint`` set: the trunk of an ``mtssl fit`` checkpoint or a trunk export, read with
  ``torch.load(weights_only=True)`` by :func:`~mtssl_lightning.load_trunk` (no code from the
  file runs; missing or unexpected keys are an error listing them);
* ``checkpoint`` ``None``: the ``trunk`` given, as initialised (the random-init baseline).

A frozen trunk has ``requires_grad=False`` everywhere **and stays in eval mode** even when
Lightning calls ``.train()`` on the module around it, so its BN running statistics never move.
"""

from __future__ import annotations

import os
from typing import Any, Literal

from torch import Tensor, nn

from mtssl_lightning.checkpoint import TRUNK_PREFIX_KEY, load_trunk
from mtssl_lightning.trunks.base import Trunk
from mtssl_lightning.trunks.lasso import UnitMixer

Representation = Literal["features", "lasso"]


def pretrained_trunk(checkpoint: str | os.PathLike | None, trunk: Trunk | None = None) -> Trunk:
    """The trunk to transfer: the one saved in ``checkpoint``, or ``trunk`` (random init) when it is ``None``.

    Raises:
        ValueError: neither is given, or the checkpoint is not an mtssl-lightning checkpoint.
        FileNotFoundError: ``checkpoint`` does not exist.
    """
    if checkpoint is not None:
        loaded = load_trunk(checkpoint)
        assert isinstance(loaded, Trunk)
        return loaded.train()
    if trunk is None:
        raise ValueError(
            "no trunk to evaluate: set `model.checkpoint` to a checkpoint of `mtssl fit` (or an exported trunk), "
            "or give `model.trunk` for a randomly initialised baseline"
        )
    return trunk


def freeze(module: nn.Module) -> nn.Module:
    """``requires_grad=False`` on every parameter and eval mode (BN uses, never updates, its statistics)."""
    module.requires_grad_(False)
    return module.eval()


class TrunkRepresentation(nn.Module):
    """The trunk plus how a transfer head reads it: block output, or a fresh lasso row over its units.

    Args:
        trunk: the (pretrained) trunk.
        frozen: freeze the trunk (linear-probe protocol); otherwise it is fine-tuned.
        representation: ``"features"`` (the block output, what naive multi-head pretraining
            trained heads on) or ``"lasso"`` (a new α over the units of the last block, trained
            with the evaluation head, as in the paper's lasso evaluation).
        lasso_init: initial α of the ``"lasso"`` row.

    ``forward((B, 3, H, W) RGB in [0, 1]) -> (B, C, h, w)``.
    """

    def __init__(
        self,
        trunk: Trunk,
        frozen: bool = True,
        representation: Representation = "features",
        lasso_init: Literal["last", "uniform"] = "last",
    ) -> None:
        super().__init__()
        if representation not in ("features", "lasso"):
            raise ValueError(f"`representation` must be 'features' or 'lasso', got {representation!r}")
        self.trunk, self.frozen, self.representation = trunk, frozen, representation
        self.mixer = UnitMixer(trunk.num_units, trunk.out_channels, lasso_init) if representation == "lasso" else None
        self.out_channels, self.out_stride = trunk.out_channels, trunk.out_stride
        if frozen:
            freeze(trunk)

    def train(self, mode: bool = True) -> TrunkRepresentation:
        super().train(mode)
        if self.frozen:
            self.trunk.eval()  # Lightning calls .train() every epoch; a frozen trunk's BN stays put
        return self

    def forward(self, images: Tensor) -> Tensor:
        out = self.trunk(images)
        return out.features if self.mixer is None else self.mixer(out.units)


class SavesTrunkSpec:
    """Mixin for evaluation LightningModules with a ``trunk`` property: their checkpoints record
    how to rebuild the trunk and where its weights sit, so :func:`~mtssl_lightning.load_trunk`
    reads a fine-tuned trunk back (e.g. a supervised baseline to evaluate like any other)."""

    def on_save_checkpoint(self, checkpoint: dict[str, Any]) -> None:
        trunk = self.trunk  # type: ignore[attr-defined]
        name = next(name for name, module in self.named_modules() if module is trunk)  # type: ignore[attr-defined]
        checkpoint["trunk_spec"] = trunk.spec()
        checkpoint[TRUNK_PREFIX_KEY] = f"{name}."
