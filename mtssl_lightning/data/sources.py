"""Image sources: where pictures come from (a folder tree, or the bundled sample photos).

A source is a list of named items with a ``load(i)`` that returns a PIL RGB image. Decoding
happens in DataLoader workers; unreadable files are skipped with a warning (see
:class:`~mtssl_lightning.data.datasets.CropDataset`). Video sources come with the
motion-segmentation task and follow the same pattern.
"""

from __future__ import annotations

import hashlib
import os
from pathlib import Path

from PIL import Image, ImageOps

from mtssl_lightning.data.sample import SAMPLE_VAL_NAMES, sample_images

IMAGE_EXTENSIONS = (".jpg", ".jpeg", ".png", ".webp", ".bmp", ".tif", ".tiff", ".gif", ".ppm", ".pgm")


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

