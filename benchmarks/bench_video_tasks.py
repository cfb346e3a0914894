"""Throughput of the exemplar and motion-segmentation input builders on the device.

* **motion masks/s** — :func:`~mtssl_lightning.data.motion.motion_masks` on batches of clips of
  the sample street-scene video (5 frames, stride 2, decoded once before timing), batched on the
  device (phase correlation, warping, residuals, morphology, connected components);
* **exemplar views/s** — :meth:`~mtssl_lightning.tasks.Exemplar.build` (the task's own batched,
  sync-free augmentation over the repeated batch) on crops of the sample photos;
* **clips/s decoded** — :class:`~mtssl_lightning.data.clips.ClipDataset` in a ``DataLoader``
  with 2 workers (PyAV seek + decode + crop/resize on the CPU), the CPU side that feeds motion
  segmentation; side by side without and with ``data.video_frame_cache_mb`` (decoded frames kept
  per worker, :class:`~mtssl_lightning.data.frame_cache.FrameCache`), and their ratio.

Medians over repeats after a warm-up. Runs on CUDA when available (the device), else on the CPU.
Run from the repository root::

    .venv/bin/python benchmarks/bench_video_tasks.py

It prints a table and writes it to its section of ``docs/benchmarks.md``.
"""

from __future__ import annotations

import argparse
import statistics
import time
from collections.abc import Callable
from pathlib import Path

import torch
from torch.utils.data import DataLoader

from _report import DEFAULT_OUTPUT, bar_chart, command_line, machine, publish
from mtssl_lightning.data.batch import ClipBatch
from mtssl_lightning.data.datasets import CropDataset
from mtssl_lightning.data.motion import motion_masks
from mtssl_lightning.data.sources import SampleImages
from mtssl_lightning.data.clips import ClipDataset
from mtssl_lightning.data.video import SampleVideos
from mtssl_lightning.tasks import Exemplar

SECTION = "bench_video_tasks"


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def rate(fn: Callable[[], object], items: int, device: torch.device, warmup: int, repeats: int) -> list[float]:
    """Items per second of ``fn()`` (which handles ``items`` items) for each of ``repeats`` timed calls."""
    for _ in range(warmup):
        fn()
    rates = []
    for _ in range(repeats):
        _sync(device)
        start = time.perf_counter()
        fn()
        _sync(device)
        rates.append(items / (time.perf_counter() - start))
    return rates


def cell(rates: list[float]) -> str:
    return f"{statistics.median(rates):.0f} ({min(rates):.0f}–{max(rates):.0f})"


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--sizes", type=int, nargs="+", default=[96, 224], help="crop sides")
    parser.add_argument("--clips", type=int, default=16, help="clips per motion-mask batch")
    parser.add_argument("--images", type=int, default=32, help="images per exemplar batch (8 views each)")
    parser.add_argument("--frame-cache-mb", type=int, default=256, help="data.video_frame_cache_mb of the cached decoding rows")
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--warmup", type=int, default=1)
    parser.add_argument("--output", type=Path, default=DEFAULT_OUTPUT)
    parser.add_argument("--no-write", action="store_true")
    args = parser.parse_args(argv)
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    torch.manual_seed(0)
    rows = []  # (what, unit, rates, short label for the chart)
    speedups = []  # clip decoding with the frame cache / without, per size (medians of the same run)
    for size in args.sizes:
        clips = ClipDataset(SampleVideos("train"), size, clip_length=5, frame_stride=2, length=args.clips, train=False)
        batch = ClipBatch.collate([clips[i] for i in range(args.clips)])
        video = batch.clips.to(device).float() / 255
        r = rate(lambda v=video: motion_masks(v), args.clips, device, args.warmup, args.repeats)
        rows.append((f"motion masks, {args.clips} clips × 5 frames × {size}²", "masks/s", r, f"motion masks, {size}²"))

        task = Exemplar(batch_size=args.images, image_size=size).to(device)
        crops = CropDataset(SampleImages("train"), size, length=args.images, train=False)
        images = torch.stack([crops[i][0] for i in range(args.images)]).to(device).float() / 255
        r = rate(lambda t=task, x=images: t.build(x), args.images * task.sampler.views, device, args.warmup, args.repeats)
        rows.append((
            f"exemplar views, {args.images} images × {task.sampler.views} views of {task.sampler.view_size}² from {size}² crops", "views/s", r,
            f"exemplar views, {size}² crops",
        ))

        decoded = {}
        for cache_mb in (0, args.frame_cache_mb):  # side by side: every clip decoded, then with data.video_frame_cache_mb
            videos = SampleVideos("train")
            videos.cache_frames(cache_mb * 2**20)
            loader = DataLoader(
                ClipDataset(videos, size, 5, 2, length=8 * args.clips),
                batch_size=args.clips, num_workers=2, collate_fn=ClipBatch.collate, persistent_workers=True,
            )

            def decode(loader: DataLoader = loader) -> None:
                for _ in loader:
                    pass

            decoded[cache_mb] = r = rate(decode, 8 * args.clips, torch.device("cpu"), 1, max(2, args.repeats // 2))
            cached = f", frame cache {cache_mb} MiB/worker" if cache_mb else ""
            rows.append((
                f"clip decoding (CPU, 2 workers{cached}), 5 frames stride 2 → {size}², sample videos", "clips/s", r,
                f"clip decoding{' (cached)' if cache_mb else ''} → {size}²",
            ))
        speedups.append(f"{statistics.median(decoded[args.frame_cache_mb]) / statistics.median(decoded[0]):.1f}× at {size}²")

    where = torch.cuda.get_device_name(device) if device.type == "cuda" else "the CPU (no CUDA device)"
    lines = [
        "## Video tasks: motion masks, exemplar views, clip decoding",
        "",
        f"Command: `{command_line()}`",
        "",
        f"Machine: {machine()}. Device ops on {where}.",
        "",
        f"Median (min–max) over {args.repeats} timed calls after {args.warmup} warm-up.",
        "",
        "| what | unit | rate |",
        "|---|---|---:|",
    ]
    lines += [f"| {what} | {unit} | {cell(r)} |" for what, unit, r, _ in rows]
    lines += [
        "",
        (
            f"Clip decoding with the frame cache against without it (medians, same run; the cache fills during the "
            f"warm-up pass and the timed passes, {8 * args.clips} clips each): {', '.join(speedups)}."
        ),
    ]
    lines += ["", bar_chart(
        "video_tasks",
        [f"{short} ({unit})" for _, unit, _, short in rows],
        [statistics.median(r) for _, _, r, _ in rows],
        f"Video-task throughput on {where}",
        "items per second (median; bars: min–max), log scale",
        low=[min(r) for _, _, r, _ in rows], high=[max(r) for _, _, r, _ in rows], log=True, output=args.output, write=not args.no_write,
    )]
    body = "\n".join(lines) + "\n"
    publish(body, SECTION, args.output, write=not args.no_write)


if __name__ == "__main__":
    main()
