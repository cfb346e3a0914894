"""Worker decode + crop throughput per core, today's loader against the new one, on ImageNet-like JPEGs.

The files: the sample photos (scikit-image, scikit-learn) as JPEGs at ImageNet's typical size
(longer side 500, e.g. 500×375) and quality 90, each photo also as a few random rescaled crops so
that there are enough distinct files (written to a temporary folder, deleted after).

For each task's crop size (the paper's: relative position 398 px, colorization and exemplar
224 px; and ``configs/tiny.yaml``'s ×0.25 sizes) and random resized crops at ``min_scale`` 0.2,
in one process with one thread (images/s **per core**; a worker is one process):

* **today** — the loader before this change: ``Image.open`` + ``load`` + ``ImageOps.exif_transpose``
  + ``convert("RGB")`` (two full-image copies), then the bilinear resize of the box;
* **new** — :class:`~mtssl_lightning.data.datasets.CropDataset` as it is now: no copies for upright
  RGB files, and JPEG DCT scaling (Pillow's ``draft``) when the box is shrunk ≥ 2× (with a margin:
  see :func:`~mtssl_lightning.data.sources.crop_file`);
* **torchvision** — ``torchvision.io.decode_jpeg`` of the file's bytes, then crop and an
  antialiased bilinear ``resize`` in torch (the other decoder this project already installs);
* **simplejpeg** — only when it is installed (not a dependency): libjpeg-turbo with its own DCT
  scaling (``min_height``/``min_width``), then Pillow's resize.

Every loader crops the same boxes (validation-style crops, seeded per index); the table gives
the largest and mean absolute pixel difference of each loader's crops from today's. Run from
the repository root::

    .venv/bin/python benchmarks/bench_decode.py

It prints a table and writes it to its section of ``docs/benchmarks.md``.
"""

from __future__ import annotations

import argparse
import math
import shutil
import statistics
import tempfile
import time
from collections.abc import Callable
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image, ImageOps

from _report import DEFAULT_OUTPUT, bar_chart, command_line, machine, publish
from mtssl_lightning.data.datasets import CropDataset, random_resized_box
from mtssl_lightning.data.sample import sample_images
from mtssl_lightning.data.sources import ImageFolder

SECTION = "bench_decode"

#: (what, crop side): the tasks' image sizes in the paper configs and in configs/tiny.yaml
SIZES = [
    ("relative position (paper: 3×96 + 2×48 + 2×7)", 398),
    ("colorization / exemplar (paper)", 224),
    ("relative position (tiny ×0.25)", 100),
    ("colorization / exemplar (tiny ×0.25)", 56),
]


def make_jpegs(folder: Path, per_photo: int, seed: int = 0) -> list[Path]:
    """The sample photos as ~500×375 quality-90 JPEGs: each whole, plus ``per_photo - 1`` random
    rescaled crops of it (longer side 500)."""
    rng = np.random.default_rng(seed)
    paths = []
    for name, array in sample_images("all").items():
        photo = Image.fromarray(array)
        for k in range(per_photo):
            image = photo
            if k:
                w, h = photo.size
                side = rng.uniform(0.6, 1.0)
                cw, ch = int(w * side), int(h * side)
                x, y = int(rng.integers(0, w - cw + 1)), int(rng.integers(0, h - ch + 1))
                image = photo.crop((x, y, x + cw, y + ch))
            scale = 500 / max(image.size)
            image = image.resize((round(image.width * scale), round(image.height * scale)), Image.BICUBIC)
            path = folder / f"{name}_{k}.jpg"
            image.save(path, quality=90)
            paths.append(path)
    return paths


def _box(index: int, width: int, height: int, min_scale: float) -> tuple[int, int, int, int]:
    """The crop box of sample ``index``, as ``CropDataset(train=False, seed=0)`` draws it."""
    return random_resized_box(width, height, min_scale, torch.Generator().manual_seed(index))


def _as_sample(array: np.ndarray) -> torch.Tensor:
    """What a crop dataset returns: ``uint8 (3, S, S)``."""
    return torch.from_numpy(np.ascontiguousarray(array)).permute(2, 0, 1).contiguous()


def today(paths: list[Path], size: int, min_scale: float) -> Callable[[int], torch.Tensor]:
    """The loader before this change (``CropDataset.__getitem__`` and ``ImageFolder.load`` at the parent commit)."""

    def crop(index: int) -> torch.Tensor:
        with Image.open(paths[index % len(paths)]) as image:
            image.load()
            image = ImageOps.exif_transpose(image)
            image = image.convert("RGB")
        box = _box(index, image.width, image.height, min_scale)
        return _as_sample(np.array(image.resize((size, size), Image.BILINEAR, box=box), dtype=np.uint8))

    return crop


def new(folder: Path, paths: list[Path], size: int, min_scale: float) -> Callable[[int], torch.Tensor]:
    source = ImageFolder(folder, [p.name for p in paths])
    dataset = CropDataset(source, size, length=10**9, train=False, min_scale=min_scale, seed=0)
    return lambda index: dataset[index][0]


def torchvision_loader(paths: list[Path], size: int, min_scale: float) -> Callable[[int], torch.Tensor]:
    from torchvision.io import decode_jpeg, read_file

    def crop(index: int) -> torch.Tensor:
        image = decode_jpeg(read_file(str(paths[index % len(paths)])))
        x0, y0, x1, y1 = _box(index, image.shape[2], image.shape[1], min_scale)
        patch = image[None, :, y0:y1, x0:x1].float()
        out = F.interpolate(patch, size=(size, size), mode="bilinear", antialias=True, align_corners=False)
        return out[0].round().clamp(0, 255).to(torch.uint8)

    return crop


def simplejpeg_loader(paths: list[Path], size: int, min_scale: float) -> Callable[[int], torch.Tensor] | None:
    try:
        import simplejpeg
    except ImportError:
        return None
    data = {}

    def crop(index: int) -> torch.Tensor:
        path = paths[index % len(paths)]
        blob = data.get(path) or path.read_bytes()
        height, width, _, _ = simplejpeg.decode_jpeg_header(blob)
        x0, y0, x1, y1 = _box(index, width, height, min_scale)
        shorter = min(x1 - x0, y1 - y0) / size  # the same rule as crop_file
        scale = 8 if shorter >= 8 else 4 if shorter >= 4 else 2 if shorter >= 2 else 1
        array = simplejpeg.decode_jpeg(blob, min_width=math.ceil(width / scale), min_height=math.ceil(height / scale))
        # libjpeg-turbo scales by M/8 (the smallest that keeps min_width): ceil(width * M / 8) pixels
        m = next(m for m in range(1, 17) if -(-width * m // 8) == array.shape[1])
        box = (x0 * m / 8, y0 * m / 8, min(x1 * m / 8, array.shape[1]), min(y1 * m / 8, array.shape[0]))
        return _as_sample(np.array(Image.fromarray(array).resize((size, size), Image.BILINEAR, box=box), dtype=np.uint8))

    return crop


def interleaved_rates(loaders: dict[str, Callable[[int], torch.Tensor]], items: int, repeats: int) -> dict[str, list[float]]:
    """Images/s of each loader, timed in turn within every repeat (a busy machine's drift then
    hits them alike)."""
    for fn in loaders.values():
        for i in range(min(items, 20)):  # warm-up: files in the page cache, code paths loaded
            fn(i)
    out: dict[str, list[float]] = {name: [] for name in loaders}
    for _ in range(repeats):
        for name, fn in loaders.items():
            start = time.perf_counter()
            for i in range(items):
                fn(i)
            out[name].append(items / (time.perf_counter() - start))
    return out


def differences(reference: Callable[[int], torch.Tensor], fn: Callable[[int], torch.Tensor], items: int) -> tuple[int, float]:
    """Largest and mean absolute pixel difference over ``items`` crops."""
    largest, total = 0, 0.0
    for i in range(items):
        d = (reference(i).to(torch.int16) - fn(i).to(torch.int16)).abs()
        largest, total = max(largest, int(d.max())), total + float(d.float().mean())
    return largest, total / items


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--per-photo", type=int, default=6, help="JPEGs made from each sample photo")
    parser.add_argument("--items", type=int, default=300, help="crops per timed repeat")
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--min-scale", type=float, default=0.2)
    parser.add_argument("--output", type=Path, default=DEFAULT_OUTPUT)
    parser.add_argument("--no-write", action="store_true")
    args = parser.parse_args(argv)
    torch.set_num_threads(1)  # per core: a DataLoader worker is one process
    folder = Path(tempfile.mkdtemp(prefix="mtssl-bench-decode-"))
    try:
        paths = make_jpegs(folder, args.per_photo)
        sizes = sorted({Image.open(p).size for p in paths})
        rows, chart = [], ([], [], [], [])
        for what, size in SIZES:
            base = today(paths, size, args.min_scale)
            loaders = {"today": base, "new": new(folder, paths, size, args.min_scale), "torchvision": torchvision_loader(paths, size, args.min_scale)}
            sj = simplejpeg_loader(paths, size, args.min_scale)
            if sj is not None:
                loaders["simplejpeg"] = sj
            timed = interleaved_rates(loaders, args.items, args.repeats)
            reference = statistics.median(timed["today"])
            rows.append(f"| {what} | {size} | today | {reference:.0f} ({min(timed['today']):.0f}–{max(timed['today']):.0f}) | 1.00× | – |")
            for name, fn in loaders.items():
                if name == "today":
                    continue
                got = timed[name]
                largest, mean = differences(base, fn, args.items)
                ratio = statistics.median(got) / reference
                rows.append(
                    f"| {what} | {size} | {name} | {statistics.median(got):.0f} ({min(got):.0f}–{max(got):.0f}) | "
                    f"{ratio:.2f}× | {largest} / {mean:.3f} |"
                )
                if name == "new":
                    chart[0].append(f"{size} px: new / today")
                    chart[1].append(ratio)
                    chart[2].append(min(got) / reference)
                    chart[3].append(max(got) / reference)
        markdown = bar_chart(
            "bench_decode", chart[0], chart[1], "Decode + crop per core: new loader / today's", "speed-up (×)",
            low=chart[2], high=chart[3], reference=1.0, reference_label="today", output=args.output, write=not args.no_write,
        )
    finally:
        shutil.rmtree(folder, ignore_errors=True)
    body = "\n".join([
        "## Decode + crop per worker core (`bench_decode.py`)",
        "",
        f"Command: `{command_line()}`.  ",
        f"Machine: {machine()}.  ",
        f"{len(paths)} JPEGs made from the sample photos, quality 90, sizes {sizes[0][0]}×{sizes[0][1]} to "
        f"{sizes[-1][0]}×{sizes[-1][1]}; random resized crops (min_scale {args.min_scale}, the same boxes for every "
        f"loader), one process, one thread; {args.items} crops per repeat, median of {args.repeats} (min–max).",
        "",
        "| crop | side (px) | loader | images/s per core | vs today | max / mean abs. pixel difference from today |",
        "|---|---:|---|---:|---:|---:|",
        *rows,
        "",
        "DCT scaling only applies when the crop box is at least twice the output side; at the paper's sizes "
        "(224–398 px crops from ~500×375 photos) it seldom is (only large crops of the squarer photos, at 224 px), and the gain is mostly the copies saved. "
        "torchvision's `decode_jpeg` decodes the whole image and resizes in torch.",
        "",
        markdown,
    ])
    publish(body, SECTION, args.output, write=not args.no_write)


if __name__ == "__main__":
    main()
