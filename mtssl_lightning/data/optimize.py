"""``mtssl optimize-data SRC DST``: an optimized, sharded copy of an image folder for streaming (LitData).

The folder is screened first — the same screen as training from it (``--image-check``), with
the same warnings, count and progress bar — and split into training and validation images
exactly as ``data.val_fraction`` splits a folder (a hash of each name). Each usable image is
stored as its original file bytes (no re-encoding: the copy is about the folder's size, and
workers decode it as they would the file) with its name and index, in LitData chunks under
``DST/train`` and ``DST/val`` (``litdata.optimize``). ``DST/mtssl-optimized.json`` records the
source, the counts and every file left out with its reason.

``DST`` may be a local folder or an object-store URL LitData can write (``s3://…``); then set
``data.image_root`` to it. See the README's "Data at scale".
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import sys
import time
from pathlib import Path
from typing import Any

from mtssl_lightning.data.screening import default_workers
from mtssl_lightning.data.sources import ImageFolder
from mtssl_lightning.data.streaming import MANIFEST, is_remote

log = logging.getLogger(__name__)


def _item(entry: tuple[int, str, str]) -> dict[str, Any]:
    """One image as a LitData item: its index in the split, its name and its file's bytes."""
    index, name, path = entry
    with open(path, "rb") as f:
        return {"index": index, "name": name, "image": f.read()}


def optimize_folder(
    src: str | os.PathLike,
    dst: str,
    image_check: str = "header",
    val_fraction: float = 0.02,
    workers: int | None = None,
    chunk_bytes: str = "64MB",
    cache_dir: str | os.PathLike | None = None,
    progress: bool = True,
) -> dict[str, Any]:
    """Screen ``src`` and write its usable images, split, as LitData chunks under ``dst``.

    Args:
        src: the image folder.
        dst: the optimized copy (``dst/train``, ``dst/val``; a local folder or a URL).
        image_check: ``header`` or ``decode`` (as ``data.image_check``).
        val_fraction: share held out for validation (as ``data.val_fraction``); 0 = no ``val`` split.
        workers: processes that screen and write (``None``: every core).
        chunk_bytes: LitData chunk size (a few tens of MB suit object stores).
        cache_dir: screening cache (``None``: none).
        progress: progress bars.

    Returns:
        The manifest written to ``dst/mtssl-optimized.json`` (source, counts, unusable files).

    Raises:
        ValueError: no usable image (the message names the folder and the fix).
    """
    from litdata import optimize

    start = time.perf_counter()
    workers = workers or default_workers()
    folder = ImageFolder(src)
    screening = folder.screen(image_check, cache_dir, workers, progress)
    usable = folder.usable(screening)  # the same warnings and count as training from the folder
    if val_fraction > 0:
        splits = dict(zip(("train", "val"), usable.split(val_fraction)))
    else:
        splits = {"train": usable}
    counts = {}
    for split, images in splits.items():
        entries = [(i, name, str(images.root / name)) for i, name in enumerate(images.names)]
        optimize(
            fn=_item, inputs=entries, output_dir=f"{dst.rstrip('/')}/{split}", chunk_bytes=chunk_bytes,
            num_workers=min(workers, len(entries)), mode="overwrite", verbose=progress, start_method="fork" if os.name == "posix" else None,
        )
        counts[split] = len(entries)
    manifest = {
        "source": str(folder.root),
        "image_check": image_check,
        "val_fraction": val_fraction,
        "listed": len(screening.names),
        "unusable": {screening.names[i]: reason for i, reason in sorted(screening.reasons.items())},
        "splits": counts,
        "seconds": round(time.perf_counter() - start, 1),
    }
    if not is_remote(dst):
        Path(dst, MANIFEST).write_text(json.dumps(manifest, indent=1))
    return manifest


def main(argv: list[str] | None = None) -> int:
    """``mtssl optimize-data SRC DST [--image-check header|decode] [--val-fraction F] [--workers N] [--chunk-bytes 64MB]``."""
    parser = argparse.ArgumentParser(
        prog="mtssl optimize-data",
        description="Screen an image folder and write its usable images as a sharded LitData copy for streaming "
        "(then set data.image_root to DST).",
    )
    parser.add_argument("src", help="the image folder (recursive, any layout)")
    parser.add_argument("dst", help="where the copy goes: a folder, or an object-store URL (s3://…)")
    parser.add_argument("--image-check", choices=("header", "decode"), default="header", help="how files are screened (as data.image_check)")
    parser.add_argument("--val-fraction", type=float, default=0.02, help="share held out for validation, as data.val_fraction (0: none)")
    parser.add_argument("--workers", type=int, default=None, help="processes (default: every core)")
    parser.add_argument("--chunk-bytes", default="64MB", help="LitData chunk size")
    parser.add_argument("--cache-dir", default=None, help="screening cache folder (reused by a second conversion)")
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    if not Path(args.src).expanduser().is_dir():
        print(f"mtssl optimize-data: {args.src!r} is not a folder; give the image folder to convert", file=sys.stderr)
        return 2
    manifest = optimize_folder(args.src, args.dst, args.image_check, args.val_fraction, args.workers, args.chunk_bytes, args.cache_dir)
    print(
        f"mtssl optimize-data: {sum(manifest['splits'].values())} of {manifest['listed']} images of {manifest['source']} written to "
        f"{args.dst} ({', '.join(f'{k}: {v}' for k, v in manifest['splits'].items())}; {len(manifest['unusable'])} unusable, "
        f"listed in {MANIFEST}) in {manifest['seconds']} s. Train from it with --data.image_root {args.dst}"
    )
    return 0
