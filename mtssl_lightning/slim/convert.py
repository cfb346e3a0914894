"""TF-slim ``resnet_v2_{50,101,152}`` checkpoint -> ``ResNetV2`` trunk export (``mtssl convert-slim``).

The paper's only trained model is DeepMind's release of its RP+Col+Ex+MS trunk as a TF-slim
``resnet_v2_101`` checkpoint whose representation is slim's ``resnet_v2_101/block3``
end-point. This module maps slim's variable names onto :class:`~mtssl_lightning.trunks.ResNetV2`
and writes a trunk export that :func:`~mtssl_lightning.load_trunk` reads
(``torch.load(weights_only=True)``). The checkpoint is read by the pure-Python reader of
:mod:`.tf_checkpoint`: no TensorFlow needed.

Name mapping (``S`` = the network's scope, e.g. ``resnet_v2_101``; ``U`` =
``S/block{b}/unit_{u}/bottleneck_v2``; conv weights HWIO -> OIHW, BN
gamma/beta/moving_mean/moving_variance -> weight/bias/running_mean/running_var):

==========================================  ==========================================
slim                                        ResNetV2
==========================================  ==========================================
``S/conv1/{weights,biases}``                ``root.{weight,bias}``
``U/preact/*``                              ``blocks.{b-1}.{u-1}.preact.*``
``U/shortcut/{weights,biases}``             ``blocks.{b-1}.{u-1}.shortcut.{weight,bias}``
``U/conv1/weights``, ``U/conv1/BatchNorm``  ``….body.0.weight``, ``….body.1.*``
``U/conv2/weights``, ``U/conv2/BatchNorm``  ``….body.3.weight``, ``….body.4.*``
``U/conv3/{weights,biases}``                ``….body.6.{weight,bias}``
``S/postnorm/*`` (after block 4 only)       ``final_norm.0.*``
==========================================  ==========================================

Strides are not variables: ``ResNetV2`` puts them where slim does (last unit of blocks 1-3),
and ``output_stride`` follows slim's atrous scheme, so the same weights serve any output stride.
"""

from __future__ import annotations

import re
from collections import defaultdict
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch

from mtssl_lightning.checkpoint import write_trunk_export
from mtssl_lightning.slim.tf_checkpoint import TFCheckpoint
from mtssl_lightning.trunks.resnet_v2 import PRESETS, ResNetV2

#: the BN variables of slim's ``batch_norm`` -> the ``BatchNorm2d`` entries they fill
BN_NAMES = {"gamma": "weight", "beta": "bias", "moving_mean": "running_mean", "moving_variance": "running_var"}
#: optimizer slots and moving averages TF names "<variable>/<suffix>"
SLOT_SUFFIXES = ("RMSProp", "RMSProp_1", "Momentum", "Adam", "Adam_1", "Adagrad", "ExponentialMovingAverage")
_UNIT_NAME = re.compile(r"^(?P<scope>(?:.*/)?)block(?P<block>\d+)/unit_(?P<unit>\d+)/bottleneck_v(?P<version>\d)/")
#: slim's unit counts per block of its ResNet-v2 models (the 4th block always has 3 units)
SLIM_DEPTHS = {"v2_50": (3, 4, 6, 3), "v2_101": (3, 4, 23, 3), "v2_152": (3, 8, 36, 3)}


class SlimConversionError(ValueError):
    """The checkpoint cannot become a ``ResNetV2`` trunk; the message names what and how to fix it."""


@dataclass
class IgnoredVariable:
    """A checkpoint variable that is not part of the converted trunk, and why."""

    name: str
    dtype: str
    shape: tuple[int, ...]
    reason: str


@dataclass
class ConversionReport:
    """What :func:`convert_slim` did: the trunk built, the variables used, those left out and why."""

    checkpoint: str
    scope: str
    trunk_spec: dict[str, Any]
    converted: dict[str, str] = field(default_factory=dict)  # slim name -> ResNetV2 state-dict key
    ignored: list[IgnoredVariable] = field(default_factory=list)
    notes: list[str] = field(default_factory=list)

    def summary(self) -> str:
        """Human-readable report: every ignored variable is listed, grouped by reason."""
        args = self.trunk_spec["init_args"]
        lines = [
            f"checkpoint: {self.checkpoint}",
            f"network scope: {self.scope or '(none)'}",
            f"trunk: ResNetV2({', '.join(f'{k}={v!r}' for k, v in args.items())})",
            f"converted: {len(self.converted)} slim variables",
        ]
        lines += [f"note: {note}" for note in self.notes]
        groups: dict[str, list[IgnoredVariable]] = defaultdict(list)
        for var in self.ignored:
            groups[var.reason].append(var)
        lines.append(f"not part of the trunk: {len(self.ignored)} variables" + (":" if self.ignored else ""))
        for reason, variables in groups.items():
            lines.append(f"  {reason} ({len(variables)}):")
            lines += [f"    {v.name}  {v.dtype} {list(v.shape)}" for v in variables]
        return "\n".join(lines)


def _find_scope(ckpt: TFCheckpoint, scope: str | None) -> str:
    """The network's scope prefix (``"resnet_v2_101/"``), from the names of its units."""
    found: dict[str, set[str]] = defaultdict(set)
    for name in ckpt.entries:
        match = _UNIT_NAME.match(name)
        if match:
            found[match["scope"]].add(match["version"])
    if scope is not None:
        prefix = scope.rstrip("/") + "/" if scope else ""
        if prefix not in found:
            raise SlimConversionError(
                f"no variables under scope {scope!r} in {str(ckpt.prefix)!r}; scopes with ResNet units there: "
                f"{sorted(s.rstrip('/') for s in found) or 'none'}"
            )
        found = {prefix: found[prefix]}
    v2 = sorted(s for s, versions in found.items() if "2" in versions)
    if not v2:
        example = ", ".join(list(ckpt.entries)[:5])
        if found:
            raise SlimConversionError(
                f"{str(ckpt.prefix)!r} holds a TF-slim ResNet v1 (bottleneck_v1 units, post-activation); only "
                "resnet_v2 (pre-activation, the paper's trunk) converts to ResNetV2"
            )
        raise SlimConversionError(
            f"{str(ckpt.prefix)!r} holds no TF-slim resnet_v2 variables (names like "
            f"'resnet_v2_101/block1/unit_1/bottleneck_v2/conv1/weights'); its first names are: {example}"
        )
    if len(v2) > 1:
        raise SlimConversionError(
            f"{str(ckpt.prefix)!r} holds several ResNet-v2 networks (scopes {[s.rstrip('/') for s in v2]}); "
            "choose one with --scope"
        )
    return v2[0]


def _unit_counts(ckpt: TFCheckpoint, prefix: str) -> list[int]:
    """Units per block present in the checkpoint (blocks 1..n, in order)."""
    counts: dict[int, int] = defaultdict(int)
    for name in ckpt.entries:
        match = _UNIT_NAME.match(name)
        if match and match["scope"] == prefix:
            counts[int(match["block"])] = max(counts[int(match["block"])], int(match["unit"]))
    blocks = sorted(counts)
    if blocks != list(range(1, len(blocks) + 1)) or len(blocks) > 4:
        raise SlimConversionError(f"{str(ckpt.prefix)!r}: unexpected ResNet blocks {blocks} under {prefix!r} (slim has blocks 1-4)")
    return [counts[b] for b in blocks]


def _trunk_args(counts: list[int], depth: str | None, last_block: int) -> dict[str, Any]:
    """``ResNetV2`` depth arguments: a preset when the checkpoint's unit counts are one, else ``units``."""
    if last_block > len(counts):
        raise SlimConversionError(
            f"--last-block {last_block} asks for block {last_block}, but the checkpoint holds blocks 1-{len(counts)} only "
            f"(it was trained through block {len(counts)}); use --last-block {len(counts)} or less"
        )
    if depth is not None:
        if depth not in SLIM_DEPTHS:
            raise SlimConversionError(f"unknown --depth {depth!r}; TF-slim's ResNet-v2 depths are {sorted(SLIM_DEPTHS)}")
        expected = SLIM_DEPTHS[depth][: len(counts)]
        if tuple(counts) != expected:
            guess = [n for n, c in SLIM_DEPTHS.items() if c[: len(counts)] == tuple(counts)]
            raise SlimConversionError(
                f"--depth {depth} expects units per block {list(expected)}, but the checkpoint has {counts}"
                + (f" (a resnet_{guess[0]}); use --depth {guess[0]} or leave --depth out" if guess else "; leave --depth out")
            )
        return {"depth": depth}
    for name, (kind, preset) in PRESETS.items():
        if kind == "bottleneck" and tuple(preset[: len(counts)]) == tuple(counts) and (name in SLIM_DEPTHS or len(counts) == 4):
            return {"depth": name}
    units = [*counts, *SLIM_DEPTHS["v2_101"][len(counts) :]]  # blocks beyond the checkpoint: slim's counts
    return {"depth": "custom", "units": units}


def _expected(trunk: ResNetV2, prefix: str, last_block: int, final_norm: bool) -> dict[str, str]:
    """Every ``ResNetV2`` state-dict key with a slim counterpart -> that slim variable name."""
    names = {"root.weight": f"{prefix}conv1/weights", "root.bias": f"{prefix}conv1/biases"}
    slim_of_module = {"preact": "preact", "body.1": "conv1/BatchNorm", "body.4": "conv2/BatchNorm"}
    for b in range(last_block):
        for u, unit in enumerate(trunk.blocks[b]):
            base, key = f"{prefix}block{b + 1}/unit_{u + 1}/bottleneck_v2/", f"blocks.{b}.{u}."
            for module, slim in slim_of_module.items():
                names.update({f"{key}{module}.{torch_name}": f"{base}{slim}/{tf_name}" for tf_name, torch_name in BN_NAMES.items()})
            names[f"{key}body.0.weight"] = f"{base}conv1/weights"
            names[f"{key}body.3.weight"] = f"{base}conv2/weights"
            names[f"{key}body.6.weight"], names[f"{key}body.6.bias"] = f"{base}conv3/weights", f"{base}conv3/biases"
            if unit.shortcut is not None:
                names[f"{key}shortcut.weight"], names[f"{key}shortcut.bias"] = f"{base}shortcut/weights", f"{base}shortcut/biases"
    if final_norm:
        names.update({f"final_norm.0.{torch_name}": f"{prefix}postnorm/{tf_name}" for tf_name, torch_name in BN_NAMES.items()})
    return names


def _to_torch(value: np.ndarray, torch_shape: torch.Size) -> torch.Tensor:
    """slim layout -> PyTorch layout: conv kernels HWIO -> OIHW; vectors as they are."""
    if value.ndim == 4:
        value = value.transpose(3, 2, 0, 1)
    return torch.from_numpy(np.ascontiguousarray(value, dtype=np.float32)).reshape(torch_shape)


def _slim_shape(torch_shape: torch.Size) -> tuple[int, ...]:
    shape = tuple(torch_shape)
    return (shape[2], shape[3], shape[1], shape[0]) if len(shape) == 4 else shape


def _ignore_reason(name: str, prefix: str, used: set[str], last_block: int) -> str:
    """Why a checkpoint variable is not converted (the report's grouping)."""
    head, _, tail = name.rpartition("/")
    if tail in SLOT_SUFFIXES or re.fullmatch(r"(RMSProp|Momentum|Adam|Adagrad)(_\d+)?", tail):
        owner = "trunk" if head in used else "non-trunk"
        return f"optimizer slot / moving average of a {owner} variable"
    match = _UNIT_NAME.match(name)
    if match and match["scope"] == prefix and int(match["block"]) > last_block:
        return f"block {match['block']}: beyond the cut after block {last_block}"
    if name.startswith(f"{prefix}postnorm/"):
        return "slim's postnorm (the BN+ReLU after block 4; not part of a trunk cut earlier, nor with --no-final-norm)"
    if name.startswith(f"{prefix}logits/"):
        return "slim's classifier (logits)"
    if tail in ("global_step",) or name == "global_step":
        return "training step counter"
    return "not part of the trunk (task heads, lasso weights, other networks …)"


def slim_trunk(
    checkpoint: str | Path,
    *,
    last_block: int = 3,
    output_stride: int | None = None,
    final_norm: bool | None = None,
    depth: str | None = None,
    scope: str | None = None,
) -> tuple[ResNetV2, ConversionReport]:
    """A ``ResNetV2`` holding a TF-slim ``resnet_v2`` checkpoint's weights, and the report of the conversion.

    Args:
        checkpoint: the TF checkpoint prefix (``…/model.ckpt``; its ``.index``, a ``.data-*``
            file or its folder also work).
        last_block: cut after this block (3: the paper's representation, slim's ``block3``).
        output_stride: ``None`` = slim's native stride (32 after block 3: slim's ``block3``
            end-point exactly); 16 or 8 = slim's atrous variant (same weights, dilated later units).
        final_norm: BN+ReLU after the last block. Slim has one only after block 4
            (``postnorm``), so the default is ``last_block == 4``; slim's ``block3`` end-point is
            the raw (pre-activation) output of block 3's last unit.
        depth: ``v2_50``/``v2_101``/``v2_152``, checked against the checkpoint (default: read
            from the checkpoint's unit counts).
        scope: the network's variable scope (default: found from the names, e.g. ``resnet_v2_101``).

    Returns:
        The trunk in eval mode, ``(B, 3, H, W)`` RGB in [0, 1] -> ``TrunkOutput``, and the report.

    Raises:
        FileNotFoundError: no checkpoint at ``checkpoint``.
        SlimConversionError: not a slim ResNet-v2 checkpoint, a wrong ``depth``/``last_block``,
            a trunk variable missing, of the wrong shape or not a float (all named).
    """
    ckpt = TFCheckpoint(checkpoint)
    prefix = _find_scope(ckpt, scope)
    counts = _unit_counts(ckpt, prefix)
    if final_norm is None:
        final_norm = last_block == 4
    if final_norm and last_block != 4:
        raise SlimConversionError(
            f"--final-norm with --last-block {last_block}: slim has no BN+ReLU after block {last_block} (its postnorm "
            "follows block 4), so there are no weights for one; convert without --final-norm"
        )
    root = ckpt.entries.get(f"{prefix}conv1/weights")
    width = root.shape[-1] / 64 if root is not None and len(root.shape) == 4 else 1.0
    args = {
        **_trunk_args(counts, depth, last_block),
        "width": width,
        "last_block": last_block,
        "output_stride": output_stride,
        "final_norm": final_norm,
    }
    try:
        trunk = ResNetV2(**args)
    except ValueError as err:
        raise SlimConversionError(f"cannot build ResNetV2({args}): {err}") from err
    expected = _expected(trunk, prefix, last_block, final_norm)
    report = ConversionReport(str(ckpt.prefix), prefix.rstrip("/"), trunk.spec())

    gammas = [slim for key, slim in expected.items() if slim.endswith("/gamma")]
    if gammas and not any(g in ckpt for g in gammas):  # resnet_arg_scope(batch_norm_scale=False): no γ at all
        report.notes.append("no BN gamma in the checkpoint (built with batch_norm_scale=False): gamma = 1")
        expected = {key: slim for key, slim in expected.items() if not slim.endswith("/gamma")}

    state = trunk.state_dict()
    missing, wrong, converted = [], [], {}
    for key, slim in expected.items():
        entry = ckpt.entries.get(slim)
        want = _slim_shape(state[key].shape)
        if entry is None:
            missing.append(slim)
        elif not entry.dtype.startswith(("float", "bfloat")) or entry.why_not:
            wrong.append(f"{slim}: {entry.dtype}{'' if entry.why_not is None else ', ' + entry.why_not}, a float tensor expected")
        elif entry.shape != want:
            wrong.append(f"{slim}: shape {list(entry.shape)} in the checkpoint, {list(want)} expected")
        else:
            converted[key] = slim
    if missing or wrong:
        shown = missing[:20] + wrong[:20]
        more = len(missing) + len(wrong) - len(shown)
        raise SlimConversionError(
            f"{str(ckpt.prefix)!r} does not fit ResNetV2({args}): "
            + (f"{len(missing)} trunk variable(s) missing; " if missing else "")
            + (f"{len(wrong)} of the wrong shape or type; " if wrong else "")
            + "; ".join(shown)
            + (f"; … and {more} more" if more else "")
            + ". Is this a TF-slim resnet_v2 checkpoint built with resnet_arg_scope (check --depth, --last-block, --scope)?"
        )
    converted_dtypes = set()
    for key, slim in converted.items():
        state[key] = _to_torch(ckpt.read(slim), state[key].shape)
        converted_dtypes.add(ckpt.entries[slim].dtype)
    if converted_dtypes - {"float32"}:
        report.notes.append(f"trunk variables stored as {sorted(converted_dtypes)}: converted to float32")
    for key, value in state.items():
        if key.endswith("num_batches_tracked"):
            state[key] = torch.zeros_like(value)
    trunk.load_state_dict(state, strict=True)
    report.converted = {slim: key for key, slim in converted.items()}
    used = set(report.converted)
    for name, entry in ckpt.entries.items():
        if name not in used:
            report.ignored.append(IgnoredVariable(name, entry.dtype, entry.shape, _ignore_reason(name, prefix, used, last_block)))
    return trunk.eval(), report


def convert_slim(
    checkpoint: str | Path,
    output: str | Path,
    *,
    last_block: int = 3,
    output_stride: int | None = None,
    final_norm: bool | None = None,
    depth: str | None = None,
    scope: str | None = None,
) -> ConversionReport:
    """Convert a TF-slim ``resnet_v2`` checkpoint into a trunk export at ``output`` (see :func:`slim_trunk`).

    The export is ``{"trunk_spec", "state_dict", "conversion"}`` of plain values (``conversion``:
    the source checkpoint, scope and the names of the variables left out), so
    ``load_trunk(output)`` and ``torch.load(output, weights_only=True)`` read it.
    """
    trunk, report = slim_trunk(
        checkpoint, last_block=last_block, output_stride=output_stride, final_norm=final_norm, depth=depth, scope=scope
    )
    provenance = {
        "source": "tf-slim resnet_v2 checkpoint",
        "checkpoint": report.checkpoint,
        "scope": report.scope,
        "ignored_variables": [v.name for v in report.ignored],
        "notes": list(report.notes),
    }
    write_trunk_export(trunk, output, conversion=provenance)
    return report
