"""Image sources: where pictures come from (a folder tree, or the bundled sample photos).

A source is a list of named items with a ``load(i)`` that returns a PIL RGB image. Bad files
are dealt with twice: :meth:`ImageSource.check` screens every file in the main process before
training (one warning per unusable file, one count in the log, an error naming the folder when
nothing is usable), and the DataLoader workers skip any file that still fails to decode (a
warning each, counted in ``train/skipped_files``; see
:class:`~mtssl_lightning.data.datasets.CropDataset`). Video sources follow the same pattern.
"""

from __future__ import annotations

import hashlib
import logging
import os
import warnings
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Literal

from PIL import Image, ImageOps

from mtssl_lightning.data.sample import SAMPLE_VAL_NAMES, sample_images

log = logging.getLogger(__name__)

#: how :meth:`ImageSource.check` screens files: ``header`` opens each file and parses its header
#: (catches empty files, non-images, unknown formats; fast), ``decode`` decodes every image fully
#: (also catches truncated and corrupt pixel data; slow on large folders), ``none`` skips the check
ImageCheck = Literal["header", "decode", "none"]

IMAGE_EXTENSIONS = (".jpg", ".jpeg", ".png", ".webp", ".bmp", ".tif", ".tiff", ".gif", ".ppm", ".pgm")


def screen(
    names: list[str],
    reasons: dict[int, str],
    kind: str,
    where: str,
    fix: str,
    warned: set[int] | None = None,
    log_count: bool = True,
) -> list[int]:
    """Report the unusable items of a source and return the indices of the usable ones.

    One ``UserWarning`` per unusable item (naming it and the reason; items already in
    ``warned`` are not warned about again), one log line with the count, and a ``ValueError``
    naming the source, the first reasons and ``fix`` when nothing is usable.

    Args:
        names: every item's name.
        reasons: ``{index: why it is unusable}``.
        kind: ``"images"`` or ``"videos"`` (used in the messages).
        where: the source, as :meth:`describe` says it.
        fix: what the user should do when nothing is usable.
        warned: indices already warned about (updated in place).
        log_count: log the count (off when the same source was already reported).
    """
    warned = set() if warned is None else warned
    for i, reason in reasons.items():
        if i not in warned:
            warned.add(i)
            warnings.warn(f"skipping {kind[:-1]} {names[i]!r} of {where}: {reason}", stacklevel=3)
    usable = [i for i in range(len(names)) if i not in reasons]
    if not usable:
        shown = "; ".join(f"{names[i]!r}: {r}" for i, r in list(reasons.items())[:5])
        more = f" (and {len(reasons) - 5} more)" if len(reasons) > 5 else ""
        raise ValueError(f"none of the {len(names)} {kind} of {where} is usable: {shown}{more}. {fix}")
    if reasons and log_count:
        log.warning("%d of %d %s of %s skipped as unusable; training on %d", len(reasons), len(names), kind, where, len(usable))
    return usable


def probe_image(path: Path, mode: ImageCheck = "header") -> str | None:
    """Why the image file at ``path`` is unusable, or ``None`` when it is fine.

    ``header`` parses the header only (size and format); ``decode`` also decodes the pixels and
    converts them to RGB, as training would.
    """
    try:
        if path.stat().st_size == 0:
            return "empty file (0 bytes)"
        with Image.open(path) as image:
            width, height = image.size
            if width < 1 or height < 1:
                return f"image has no pixels ({width}x{height})"
            if mode == "decode":
                image.load()
                to_rgb(image)
    except Exception as err:  # noqa: BLE001 - any failure means "unusable", and the reason is reported
        return f"unreadable ({type(err).__name__}: {err})"
    return None


class ImageSource:
    """A sequence of images: ``len(source)``, ``source.names[i]``, ``source.load(i)``."""

    names: list[str]

    def __len__(self) -> int:
        return len(self.names)

    def load(self, i: int) -> Image.Image:  # pragma: no cover - abstract
        raise NotImplementedError

    def describe(self) -> str:  # pragma: no cover - abstract
        raise NotImplementedError


def to_rgb(image: Image.Image) -> Image.Image:
    """Apply the EXIF orientation and convert grey, palette, RGBA, CMYK, 16-bit… to 8-bit RGB."""
    image = ImageOps.exif_transpose(image)
    if image.mode in ("I;16", "I;16B", "I;16L", "I"):
        # 16/32-bit greyscale: scale to 8 bits instead of letting convert() clip at 255
        image = image.point(lambda v: v / 256).convert("L")
    return image.convert("RGB")


def find_files(root: Path, extensions: tuple[str, ...], kind: str) -> list[str]:
    """Sorted paths relative to ``root`` of the files under it (recursively, following links)
    whose suffix is one of ``extensions`` (case-insensitive); a clear error when there is none."""
    exts = tuple(e.lower() for e in extensions)
    names = sorted(
        str(Path(dirpath, f).relative_to(root))
        for dirpath, _, files in os.walk(root, followlinks=True)
        for f in files
        if f.lower().endswith(exts)
    )
    if not names:
        raise FileNotFoundError(f"no {kind} files ({', '.join(exts)}) found under {str(root)!r}")
    return names


class ImageFolder(ImageSource):
    """Every image file under ``root``, recursively (ImageNet's ``train/<class>/*.JPEG`` works).

    Args:
        root: the folder.
        names: relative paths to use (as produced by a split); ``None`` scans the folder.
        extensions: file suffixes that count as images (case-insensitive).
    """

    def __init__(self, root: str | os.PathLike, names: list[str] | None = None, extensions: tuple[str, ...] = IMAGE_EXTENSIONS) -> None:
        self.root = Path(root).expanduser()
        if not self.root.is_dir():
            raise FileNotFoundError(f"image folder {str(self.root)!r} does not exist or is not a folder; set `data.image_root` to a folder of images")
        self.names = names if names is not None else find_files(self.root, extensions, "image")

    def load(self, i: int) -> Image.Image:
        with Image.open(self.root / self.names[i]) as image:
            image.load()
            return to_rgb(image)

    def describe(self) -> str:
        return f"{len(self)} images under {self.root}"

    def check(self, mode: ImageCheck = "header") -> ImageFolder:
        """This folder without its unusable files (screened in the main process, before training).

        Warns once per unusable file (name and reason) and logs the count; ``mode`` says how
        hard to look (:data:`ImageCheck`).

        Raises:
            ValueError: no file is usable (the message names the folder, the reasons and the fix).
        """
        if mode == "none":
            return self
        if mode not in ("header", "decode"):
            raise ValueError(f"`image_check` must be 'header', 'decode' or 'none', got {mode!r}")
        # threads: opening files is I/O bound (network file systems), and PIL decodes without the GIL
        with ThreadPoolExecutor(max_workers=min(16, (os.cpu_count() or 1) * 4)) as pool:
            found = list(pool.map(lambda name: probe_image(self.root / name, mode), self.names))
        reasons = {i: reason for i, reason in enumerate(found) if reason is not None}
        if not reasons:
            return self
        fix = "Add readable images (JPEG, PNG, WebP, …) to the folder, or point `data.image_root` elsewhere."
        usable = screen(self.names, reasons, "images", self.describe(), fix)
        return ImageFolder(self.root, [self.names[i] for i in usable])

    def split(self, val_fraction: float) -> tuple[ImageFolder, ImageFolder]:
        """Deterministic train/val split by a hash of each relative path.

        Stable across machines and when files are added (an image never moves between the
        splits); about ``val_fraction`` of the images go to validation, at least one.
        """
        if not 0.0 < val_fraction < 1.0:
            raise ValueError(f"`val_fraction` must be in (0, 1), got {val_fraction}")
        if len(self.names) < 2:
            raise ValueError(f"need at least 2 images under {str(self.root)!r} to split off validation images, found {len(self.names)}")

        def bucket(name: str) -> float:
            return int(hashlib.sha1(name.encode()).hexdigest()[:8], 16) / 0xFFFFFFFF

        val = [n for n in self.names if bucket(n) < val_fraction]
        if not val:  # tiny folders: hold out the image with the smallest hash
            val = [min(self.names, key=bucket)]
        val_set = set(val)
        train = [n for n in self.names if n not in val_set]
        return ImageFolder(self.root, train), ImageFolder(self.root, val)


class SampleImages(ImageSource):
    """The sample photos shipped in scikit-image and scikit-learn, kept in memory (11 small images)."""

    def __init__(self, split: str = "all") -> None:
        self.split = split
        images = sample_images(split)
        self.names = list(images)
        self._images = [Image.fromarray(a) for a in images.values()]

    def load(self, i: int) -> Image.Image:
        return self._images[i]

    def describe(self) -> str:
        held_out = ", ".join(SAMPLE_VAL_NAMES)
        return f"{len(self)} sample photos ({self.split}; held out for validation: {held_out})"

