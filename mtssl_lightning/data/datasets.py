"""Per-sample CPU work (in DataLoader workers): decode, crop, resize to a fixed square.

Everything after that — patches, Lab, augmentations, masks — is batched on the device by the
tasks. Keeping the worker side this thin is what lets two CPU workers feed a GPU.
"""

from __future__ import annotations

import math
import warnings
from collections.abc import Callable, Sequence
from typing import TypeVar, Union

import numpy as np
import torch
from PIL import Image
from torch.utils.data import Dataset

from mtssl_lightning.data.batch import ImageBatch
from mtssl_lightning.data.sources import ImageSource

T = TypeVar("T")


class BadFiles:
    """Per worker process: the items that failed to load, and how many failed since the last batch.

    Shared by every file-backed dataset (crops, clips, labelled images), so "skip it, warn once,
    count it" means the same everywhere.

    Args:
        kind: what an item is, for the messages (``"image"``, ``"video"``).
    """

    def __init__(self, kind: str) -> None:
        self.kind = kind
        self.bad: set[int] = set()
        self.newly_bad = 0

    def first_readable(self, items: Sequence[int], start: int, load: Callable[[int], T], name: Callable[[int], str], where: str) -> tuple[T, int]:
        """``(load(j), j)`` for the first ``j`` of ``items`` from position ``start`` on (wrapping)
        that loads; each item that raises is warned about once, remembered and counted.

        Raises:
            RuntimeError: no item loads (``where`` names the collection).
        """
        n = len(items)
        for k in range(n):
            j = items[(start + k) % n]
            loaded = self.try_load(j, load, name)
            if loaded is not None:
                return loaded[0], j
        raise RuntimeError(f"none of the {n} {self.kind}s of {where} could be decoded (see the warnings)")

    def try_load(self, j: int, load: Callable[[int], T], name: Callable[[int], str]) -> tuple[T] | None:
        """``(load(j),)``, or ``None`` when item ``j`` is known bad or raises now (then it is
        warned about, remembered and counted: once per worker process)."""
        if j in self.bad:
            return None
        try:
            return (load(j),)
        except Exception as err:  # noqa: BLE001 - any decoder error means "skip this file"
            self.bad.add(j)
            self.newly_bad += 1
            warnings.warn(f"skipping unreadable {self.kind} {name(j)!r}: {err}", stacklevel=4)
            return None

    def take_count(self) -> int:
        """Items found bad since the last call (a collate function reports them per batch)."""
        count, self.newly_bad = self.newly_bad, 0
        return count


#: a crop's area as a fraction of the image: the smallest (the largest is then 1), or (smallest, largest)
CropScale = Union[float, tuple[float, float]]


def crop_scale_range(scale: CropScale, name: str = "min_scale") -> tuple[float, float]:
    """``scale`` as ``(smallest, largest)`` area fractions; a ``ValueError`` naming ``name`` unless
    ``0 < smallest <= largest <= 1``."""
    low, high = (float(scale), 1.0) if isinstance(scale, (int, float)) else (float(scale[0]), float(scale[1]))
    if not 0.0 < low <= high <= 1.0:
        raise ValueError(f"`{name}` must be an area fraction in (0, 1] or a range (smallest, largest) within it, got {scale}")
    return low, high


def random_resized_box(
    width: int, height: int, min_scale: CropScale, generator: torch.Generator | None = None
) -> tuple[int, int, int, int]:
    """A random crop box ``(x0, y0, x1, y1)`` covering ``min_scale``–1 of the area (or the range
    ``min_scale = (smallest, largest)``), aspect 3/4–4/3.

    Like Inception-style RandomResizedCrop; falls back to the largest centred square-ish box.
    """
    low, high = crop_scale_range(min_scale)
    area = width * height
    for _ in range(10):
        u = torch.rand(3, generator=generator).tolist()
        target = area * (low + (high - low) * u[0])
        aspect = math.exp(math.log(3 / 4) + (math.log(4 / 3) - math.log(3 / 4)) * u[1])
        w = int(round(math.sqrt(target * aspect)))
        h = int(round(math.sqrt(target / aspect)))
        if 0 < w <= width and 0 < h <= height:
            v = torch.rand(2, generator=generator).tolist()
            x0 = int(v[0] * (width - w + 1))
            y0 = int(v[1] * (height - h + 1))
            return x0, y0, x0 + w, y0 + h
    side = min(width, height)
    x0, y0 = (width - side) // 2, (height - side) // 2
    return x0, y0, x0 + side, y0 + side


class CropDataset(Dataset):
    """Square crops of a source's images as ``(uint8 (3, size, size), image index)``.

    Args:
        source: the images.
        size: output side in pixels.
        length: samples per epoch (indices wrap around the source, so a handful of photos can
            give many random crops); ``None`` = one per image.
        train: random resized crops and horizontal flips from torch's RNG (seeded per worker by
            Lightning); otherwise crops are still random but fixed per index (seeded by
            ``seed`` and the index), so validation sees the same crops every epoch.
        min_scale: smallest crop area as a fraction of the image, or a range (smallest, largest).
        seed: base seed of the fixed (validation) crops.
        reduce: let the source decode at reduced size when the crop is shrunk ≥ 2× (JPEG DCT
            scaling, see :func:`~mtssl_lightning.data.sources.crop_file`); ``False`` decodes
            every image fully.
    """

    def __init__(
        self,
        source: ImageSource,
        size: int,
        length: int | None = None,
        train: bool = True,
        min_scale: CropScale = 0.2,
        seed: int = 0,
        reduce: bool = True,
    ) -> None:
        if len(source) == 0:
            raise ValueError(f"no images in {source.describe()}")
        crop_scale_range(min_scale)
        self.source, self.size, self.train = source, size, train
        self.length = length if length is not None else len(source)
        self.min_scale, self.seed, self.reduce = min_scale, seed, reduce
        self.bad_files = BadFiles("image")

    def __len__(self) -> int:
        return self.length

    def collate(self, samples: list[tuple[torch.Tensor, int]]) -> ImageBatch:
        """:meth:`ImageBatch.collate` plus the count of files found bad for this batch.

        Runs in the worker that loaded ``samples`` (right after them), so the counter it reads
        and resets covers exactly this batch.
        """
        batch = ImageBatch.collate(samples)
        batch.skipped = self.bad_files.take_count()
        return batch

    def __getitem__(self, index: int) -> tuple[torch.Tensor, int]:
        box_of = crop_boxes(self.train, self.min_scale, self.seed, index)
        # image `index`, or the next decodable one (a warning once per bad file)
        crop, j = self.bad_files.first_readable(
            range(len(self.source)), index % len(self.source), lambda k: self.source.crop(k, self.size, box_of, self.reduce),
            self.source.names.__getitem__, self.source.describe(),
        )
        return crop_tensor(crop, self.train), j


def crop_boxes(train: bool, min_scale: CropScale, seed: int, index: int) -> Callable[[int, int], tuple[int, int, int, int]]:
    """The crop box of sample ``index`` as a function of the image's size: random from torch's
    RNG when training, else fixed by ``seed`` and ``index`` (validation sees the same crops)."""
    generator = None if train else torch.Generator().manual_seed(seed * 1_000_003 + index)

    def box_of(width: int, height: int) -> tuple[int, int, int, int]:
        return random_resized_box(width, height, min_scale, generator)

    return box_of


def crop_tensor(crop: Image.Image, train: bool) -> torch.Tensor:
    """A resized crop as ``uint8 (3, H, W)``, flipped left-right with probability 1/2 when training."""
    array = np.array(crop, dtype=np.uint8)  # a writable copy
    if train and torch.rand(1).item() < 0.5:
        array = array[:, ::-1]
    return torch.from_numpy(np.ascontiguousarray(array)).permute(2, 0, 1).contiguous()
