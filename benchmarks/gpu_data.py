"""The GPU check's data, made at its start from what the GPU machine has (scikit-image's photos; no
network, no PyAV, no scikit-learn or scikit-video there):

* ``images/`` and ``images_val/``: JPEGs at ImageNet-like sizes (short side 300-500 px on a GPU),
  random crops and rescales of scikit-image's sample photos, 2 % of them PNG (decoded by the workers
  under ``decode: device`` too, as any non-JPEG file);
* ``frames/`` and ``frames_val/``: synthetic videos as folders of JPEG frames (what
  :class:`~mtssl_lightning.data.frames.FrameFolder` reads, without PyAV): a background photo panned
  by a camera motion, and one or two photo patches moving over it on their own paths, so that the
  motion-segmentation task has real motion masks to find.

Written by a pool of forked processes (all cores); a few thousand files take seconds.
"""

from __future__ import annotations

import math
import multiprocessing
import os
import zlib
from concurrent.futures import ProcessPoolExecutor
from pathlib import Path

import numpy as np
from PIL import Image

#: scikit-image's photos (the GPU machine has scikit-image; not scikit-learn, scikit-video or PyAV)
PHOTOS = ("astronaut", "chelsea", "coffee", "rocket", "hubble_deep_field", "immunohistochemistry", "retina", "motorcycle_left", "motorcycle_right")


def _photos() -> list[np.ndarray]:
    from mtssl_lightning.data.sample import load_sample_image

    return [load_sample_image(name) for name in PHOTOS]


_CACHE: list[np.ndarray] = []


def _photo(k: int) -> np.ndarray:
    if not _CACHE:
        _CACHE.extend(_photos())
    return _CACHE[k % len(_CACHE)]


def _write_image(args: tuple[Path, int, int, int, bool]) -> None:
    path, seed, short_lo, short_hi, png = args
    rng = np.random.default_rng(seed)
    photo = _photo(int(rng.integers(len(PHOTOS))))
    h, w = photo.shape[:2]
    area = h * w * rng.uniform(0.3, 1.0)
    aspect = math.exp(rng.uniform(math.log(3 / 4), math.log(4 / 3)))
    cw, ch = min(w, int(math.sqrt(area * aspect))), min(h, int(math.sqrt(area / aspect)))
    x, y = int(rng.integers(0, w - cw + 1)), int(rng.integers(0, h - ch + 1))
    crop = Image.fromarray(photo[y : y + ch, x : x + cw])
    short = int(rng.integers(short_lo, short_hi + 1))
    scale = short / min(cw, ch)
    image = crop.resize((max(1, round(cw * scale)), max(1, round(ch * scale))), Image.BILINEAR)
    if rng.random() < 0.5:
        image = image.transpose(Image.FLIP_LEFT_RIGHT)
    if png:
        image.save(path)
    else:
        image.save(path, quality=90)


def _write_video(args: tuple[Path, int, int, tuple[int, int]]) -> None:
    folder, seed, frames, (width, height) = args
    rng = np.random.default_rng(seed)
    folder.mkdir(parents=True, exist_ok=True)
    background = _photo(int(rng.integers(len(PHOTOS))))
    pan = rng.uniform(-2.0, 2.0, 2)  # camera motion, px per frame (removed by the task as global motion)
    bw, bh = width + int(abs(pan[0]) * frames) + 2, height + int(abs(pan[1]) * frames) + 2
    scale = max(bw / background.shape[1], bh / background.shape[0], 1.0)
    bg = np.asarray(Image.fromarray(background).resize((math.ceil(background.shape[1] * scale), math.ceil(background.shape[0] * scale))))
    objects = []
    for _ in range(int(rng.integers(1, 3))):
        source = _photo(int(rng.integers(len(PHOTOS))))
        side = int(rng.integers(height // 5, height // 2))
        patch = np.asarray(Image.fromarray(source).resize((side, side)))
        yy, xx = np.mgrid[:side, :side]
        mask = ((yy - side / 2) ** 2 + (xx - side / 2) ** 2) < (side / 2) ** 2  # a disc
        start = rng.uniform([0, 0], [width - side, height - side])
        speed = rng.uniform(3.0, 8.0) * np.array([math.cos(a := rng.uniform(0, 2 * math.pi)), math.sin(a)])
        objects.append((patch, mask, start, speed))
    ox, oy = (bw - width) / 2, (bh - height) / 2
    for t in range(frames):
        x0, y0 = int(ox + pan[0] * (t - frames / 2)), int(oy + pan[1] * (t - frames / 2))
        frame = bg[y0 : y0 + height, x0 : x0 + width].copy()
        for patch, mask, start, speed in objects:
            side = patch.shape[0]
            span = np.array([width - side, height - side], dtype=float)
            px, py = (span - np.abs((start + speed * t) % (2 * span) - span)).astype(int)  # bouncing off the edges
            region = frame[py : py + side, px : px + side]
            region[mask] = patch[mask]
        Image.fromarray(frame).save(folder / f"{t:05d}.jpg", quality=90)


def make_data(root: Path, images: int, image_sides: tuple[int, int], videos: int, frames: int, frame_size: tuple[int, int], workers: int | None = None) -> dict[str, int]:
    """Write the images and frame folders under ``root`` (skipped when already there); returns counts."""
    done = root / "done"
    if done.exists():
        return {k: int(v) for k, v in (line.split("=") for line in done.read_text().split())}
    val_images, val_videos = max(4, images // 50), max(2, videos // 8)
    jobs_images = []
    for split, count in (("images", images), ("images_val", val_images)):
        (root / split).mkdir(parents=True, exist_ok=True)
        for i in range(count):
            png = i % 50 == 49  # 2 %: files the device path leaves to the workers
            jobs_images.append((root / split / f"{i:05d}.{'png' if png else 'jpg'}", zlib.crc32(f"{split}/{i}".encode()), *image_sides, png))
    jobs_videos = [
        (root / split / f"video_{i:03d}", zlib.crc32(f"{split}/{i}".encode()), frames, frame_size)
        for split, count in (("frames", videos), ("frames_val", val_videos))
        for i in range(count)
    ]
    workers = workers or os.cpu_count() or 1
    _photo(0)  # loaded once here; the forked writers inherit them
    with ProcessPoolExecutor(max_workers=workers, mp_context=multiprocessing.get_context("fork")) as pool:
        list(pool.map(_write_image, jobs_images, chunksize=16))
        list(pool.map(_write_video, jobs_videos))
    counts = {"images": images, "images_val": val_images, "videos": videos, "videos_val": val_videos, "frames": frames}
    done.write_text(" ".join(f"{k}={v}" for k, v in counts.items()))
    return counts
