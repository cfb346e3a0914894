"""Checkpoints: what the pretraining module adds to them and reads back (:func:`save_run_state`,
:func:`load_run_state`), and getting the pretrained trunk out of one, safely (``weights_only=True``,
no code runs)."""

from __future__ import annotations

import importlib
import os
from pathlib import Path
from typing import Any

import torch
from torch import nn

from mtssl_lightning.trunks.base import Trunk

TRUNK_PREFIX = "trunk."


def save_run_state(module: Any, checkpoint: dict[str, Any]) -> None:
    """What :class:`~mtssl_lightning.MultiTaskSSL` adds to a Lightning checkpoint: the trunk's spec
    (for :func:`load_trunk`), its step and bad-file counters, and torch's RNG states (dropout, and
    data order in the main process; with several ranks every rank's, each resuming with its own), so that a resumed run continues as an uninterrupted one (task
    inputs are seeded by the DataModule, whose state Lightning saves). Plain values and tensors
    only, so checkpoints load with ``weights_only=True``."""
    checkpoint["trunk_spec"] = module.trunk.spec()
    checkpoint["mtssl_train_steps"] = module._train_steps
    checkpoint["mtssl_skipped_files"] = module._skipped_files
    checkpoint["mtssl_nonfinite_skipped"] = module._nonfinite_skipped
    checkpoint["mtssl_rng"] = {"torch": torch.get_rng_state()}
    trainer = getattr(module, "_trainer", None)
    if trainer is not None and trainer.world_size > 1:
        # every rank's own generator (the loaders' shuffling draws from it): Lightning calls this hook
        # on every rank and writes rank 0's dict, so without the gather every rank would resume
        # with rank 0's state and draw other data than an uninterrupted run
        state = torch.get_rng_state()
        states = [torch.empty_like(state) for _ in range(trainer.world_size)]
        torch.distributed.all_gather_object(states, state)  # (gloo and NCCL alike: CPU byte tensors as objects)
        checkpoint["mtssl_rng"]["torch_ranks"] = states
    if torch.cuda.is_available():
        checkpoint["mtssl_rng"]["cuda"] = torch.cuda.get_rng_state_all()


def load_run_state(module: Any, checkpoint: dict[str, Any]) -> None:
    """The counterpart of :func:`save_run_state`; rejects lasso mixers of the old design with the way out.

    Raises:
        ValueError: the checkpoint's lasso mixers normalise after the mix (before the redesign).
    """
    old_mixers = sorted(k for k in checkpoint.get("state_dict", {}) if k.startswith("mixers.") and ".norm." in k)
    if old_mixers:
        raise ValueError(
            f"this checkpoint's lasso mixers ({old_mixers[0]} …) normalise after the mix, as before the lasso was "
            "redesigned (mtssl_lightning/trunks/lasso.py): their α cannot be carried over. Its trunk still loads "
            "with `mtssl_lightning.load_trunk(path)`; train the lasso model again, or resume it with `mixing: naive`."
        )
    module._train_steps = int(checkpoint.get("mtssl_train_steps", 0))
    module._skipped_files = int(checkpoint.get("mtssl_skipped_files", 0))
    module._nonfinite_skipped = int(checkpoint.get("mtssl_nonfinite_skipped", 0))
    rng = checkpoint.get("mtssl_rng")
    if rng is not None:
        trainer = getattr(module, "_trainer", None)
        ranks = rng.get("torch_ranks")
        same_world = trainer is not None and ranks is not None and len(ranks) == trainer.world_size
        torch.set_rng_state(ranks[trainer.global_rank] if same_world else rng["torch"])
        if "cuda" in rng and torch.cuda.is_available() and len(rng["cuda"]) == torch.cuda.device_count():
            torch.cuda.set_rng_state_all(rng["cuda"])
#: checkpoint key naming the state-dict prefix of the trunk's weights (default ``TRUNK_PREFIX``)
TRUNK_PREFIX_KEY = "trunk_prefix"


def _read(path: str | os.PathLike) -> dict[str, Any]:
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"checkpoint {str(path)!r} does not exist; give the path of a .ckpt written by `mtssl fit` (or of an exported trunk)")
    try:
        data = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as err:  # noqa: BLE001 - re-raised with the file named
        raise ValueError(f"{str(path)!r} is not a readable PyTorch checkpoint ({type(err).__name__}: {err})") from err
    if not isinstance(data, dict) or "trunk_spec" not in data or "state_dict" not in data:
        raise ValueError(
            f"{str(path)!r} is not an mtssl-lightning checkpoint or trunk export "
            "(no 'trunk_spec'/'state_dict'); was it written by `mtssl fit` or `export_trunk`?"
        )
    return data


def _trunk_class(class_path: str) -> type[Trunk]:
    module_name, _, name = class_path.rpartition(".")
    cls = getattr(importlib.import_module(module_name), name, None)
    # only Trunk subclasses may be built: the file cannot name an arbitrary callable
    if not (isinstance(cls, type) and issubclass(cls, Trunk)):
        raise ValueError(f"checkpoint names trunk class {class_path!r}, which is not an mtssl_lightning Trunk")
    return cls


def load_trunk(checkpoint_path: str | os.PathLike, strict: bool = True) -> nn.Module:
    """The pretrained trunk of a training checkpoint or of a trunk export, in eval mode.

    The file is read with ``torch.load(weights_only=True)``; the trunk is rebuilt from the
    class path and constructor arguments recorded beside the weights (only
    :class:`~mtssl_lightning.trunks.Trunk` subclasses are accepted).

    Returns a module mapping ``(B, 3, H, W)`` RGB in [0, 1] to a
    :class:`~mtssl_lightning.trunks.TrunkOutput` (``features`` of the last block and the
    outputs of all its ``units``).
    """
    data = _read(checkpoint_path)
    spec = data["trunk_spec"]
    trunk = _trunk_class(spec["class_path"])(**spec["init_args"])
    state = data["state_dict"]
    prefix = data.get(TRUNK_PREFIX_KEY, TRUNK_PREFIX)  # evaluation modules keep it deeper, e.g. "representation.trunk."
    if any(k.startswith(prefix) for k in state):  # a Lightning checkpoint of the whole model
        state = {k[len(prefix):]: v for k, v in state.items() if k.startswith(prefix)}
    result = trunk.load_state_dict(state, strict=False)
    if strict and (result.missing_keys or result.unexpected_keys):
        raise ValueError(
            f"trunk weights in {str(checkpoint_path)!r} do not match {spec['class_path']}({spec['init_args']}): "
            f"missing keys {result.missing_keys[:20]}, unexpected keys {result.unexpected_keys[:20]}"
        )
    return trunk.eval()


def write_trunk_export(trunk: Trunk, output_path: str | os.PathLike, **extra: Any) -> Path:
    """Write ``{"trunk_spec": …, "state_dict": …, **extra}`` of plain values, atomically.

    ``extra`` holds plain metadata (strings, numbers, lists, dicts), e.g. where the weights came
    from; the file still loads with ``torch.load(weights_only=True)`` and :func:`load_trunk`.
    """
    output = Path(output_path)
    output.parent.mkdir(parents=True, exist_ok=True)
    tmp = output.with_suffix(output.suffix + ".tmp")
    torch.save({"trunk_spec": trunk.spec(), "state_dict": trunk.state_dict(), **extra}, tmp)
    os.replace(tmp, output)  # atomic: never a half-written export
    return output


def export_trunk(checkpoint_path: str | os.PathLike, output_path: str | os.PathLike) -> Path:
    """Write the trunk alone: ``{"trunk_spec": {...}, "state_dict": {...}}`` of plain tensors.

    The file loads with plain ``torch.load(weights_only=True)``; its ``state_dict`` fits
    ``ResNetV2(**trunk_spec["init_args"])`` without any of this package's training code.
    """
    trunk = load_trunk(checkpoint_path)
    assert isinstance(trunk, Trunk)
    return write_trunk_export(trunk, output_path)
