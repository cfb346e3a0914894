"""``mtssl convert-slim CHECKPOINT_PREFIX OUTPUT.pt``: the command line of :func:`~mtssl_lightning.slim.convert_slim`.

A plain command (argparse), dispatched by ``mtssl``'s ``main`` before the LightningCLI is built:
converting needs no trainer, model or data.
"""

from __future__ import annotations

import argparse
import sys
from collections.abc import Sequence

from mtssl_lightning.slim.convert import SLIM_DEPTHS, SlimConversionError, convert_slim
from mtssl_lightning.slim.tf_checkpoint import CheckpointFormatError


def _output_stride(text: str) -> int | None:
    if text.lower() in ("none", "null", "native"):
        return None
    try:
        return int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"output stride must be 8, 16, 32 or none, got {text!r}") from None


def main(argv: Sequence[str] | None = None) -> int:
    """``mtssl convert-slim CHECKPOINT_PREFIX OUTPUT.pt [options]``; returns the exit status."""
    parser = argparse.ArgumentParser(
        prog="mtssl convert-slim",
        description=(
            "Convert a TF-slim resnet_v2_{50,101,152} checkpoint (e.g. the paper's released model) into a "
            "ResNetV2 trunk export for load_trunk and the configs/eval/ configs. No TensorFlow needed."
        ),
    )
    parser.add_argument("checkpoint", help="TF checkpoint prefix, e.g. model_release/model.ckpt (the path without .index)")
    parser.add_argument("output", help="trunk export to write, e.g. released_rp_col_ex_ms.pt")
    parser.add_argument("--last-block", type=int, default=3, choices=(1, 2, 3, 4), help="cut after this block (default 3: slim's block3, the paper's representation)")
    parser.add_argument(
        "--output-stride", type=_output_stride, default=None,
        help="none (default): slim's native stride, 32 after block 3 (exactly slim's end-point); 16 or 8: slim's atrous variant",
    )
    norm = parser.add_mutually_exclusive_group()
    norm.add_argument("--final-norm", dest="final_norm", action="store_true", default=None, help="BN+ReLU after the last block (slim's postnorm; needs --last-block 4)")
    norm.add_argument("--no-final-norm", dest="final_norm", action="store_false", help="raw output of the last unit (default below block 4)")
    parser.add_argument("--depth", choices=sorted(SLIM_DEPTHS), help="check the checkpoint is this depth (default: read from it)")
    parser.add_argument("--scope", help="variable scope of the network (default: found from the names, e.g. resnet_v2_101)")
    args = parser.parse_args(argv)
    try:
        report = convert_slim(
            args.checkpoint, args.output, last_block=args.last_block, output_stride=args.output_stride,
            final_norm=args.final_norm, depth=args.depth, scope=args.scope,
        )
    except (FileNotFoundError, SlimConversionError, CheckpointFormatError) as err:
        print(f"mtssl convert-slim: error: {err}", file=sys.stderr)
        return 2
    print(report.summary())
    print(f"wrote {args.output}: load it with mtssl_lightning.load_trunk({str(args.output)!r}) or --model.checkpoint {args.output}")
    return 0
