"""JPEG decoding on the device (``data.decode: device``): workers send encoded bytes, the GPU decodes.

With ``decode: cpu`` (the default) a DataLoader worker decodes every image, crops and resizes it
(:class:`~mtssl_lightning.data.datasets.CropDataset`). With ``decode: device`` a worker only
reads the file and its JPEG header: it draws the random crop box from the header's size (the same
draws, in the same order, as the CPU path) and delivers the encoded bytes, the box and the flip
(:class:`EncodedCropDataset`); the DataModule's ``on_after_batch_transfer`` then decodes the
batch's JPEGs in one batched call on the batch's device (``torchvision.io.decode_jpeg(list,
device=…)``: nvJPEG on a GPU, libjpeg-turbo in the main process on a CPU), crops and resizes them
there (:func:`decode_batch`) and hands ``uint8`` crops to the task samplers as before.

Files a GPU decoder might read differently from Pillow are decoded in the worker as with ``decode:
cpu`` (:func:`device_decodable`): anything not a JPEG (PNG, WebP, …), CMYK and grey JPEGs,
progressive JPEGs, JPEGs with an EXIF rotation, and images of in-memory sources (the sample photos).

Equal to the worker path within JPEG-decoder tolerance: Pillow and torchvision both decode with
libjpeg-turbo on the CPU, and the crop is resized with Pillow's own bilinear weights (two small
matrix products on the device, :func:`resized_crop`), so the crops differ by at most one grey level,
in under 1 % of the values (measured and tested in ``tests/data/test_device_decode.py``); nvJPEG's
IDCT and chroma upsampling differ a little more from libjpeg-turbo (``make gpu-check`` measures it).
"""

from __future__ import annotations

import dataclasses
import warnings
from dataclasses import dataclass
from pathlib import Path
from typing import Literal

import numpy as np
import torch
from PIL import Image
from torch import Tensor

from mtssl_lightning.data.batch import ImageBatch
from mtssl_lightning.data.datasets import CropDataset, random_resized_box

__all__ = ["Decode", "EncodedBytes", "EncodedCropDataset", "EncodedImageBatch", "check_decode", "decode_batch", "device_decodable"]

#: where images are decoded: in the DataLoader workers (``cpu``) or in batches on the device (``device``)
Decode = Literal["cpu", "device"]

_EXIF_ORIENTATION = 0x0112


def check_decode(decode: str) -> Decode:
    """``decode`` if it is ``cpu`` or ``device``, else a ``ValueError`` naming both."""
    if decode not in ("cpu", "device"):
        raise ValueError(f"`decode` must be 'cpu' (in the DataLoader workers) or 'device' (JPEGs in batches on the device), got {decode!r}")
    return decode  # type: ignore[return-value]


def device_decodable(path: Path) -> tuple[int, int] | None:
    """``(width, height)`` from the header when the file is a JPEG that the device path decodes
    exactly like the worker path (3-channel YCbCr/RGB, baseline, no EXIF rotation), else ``None``.

    Raises what Pillow raises for an unreadable file (the caller skips it like a bad file).
    """
    with Image.open(path) as image:
        if image.format != "JPEG" or image.mode != "RGB":  # PNG, WebP …; grey (L) and CMYK JPEGs
            return None
        if image.info.get("progressive") or image.info.get("progression"):
            return None
        if image.getexif().get(_EXIF_ORIENTATION, 1) not in (0, 1):  # the worker path rotates it upright
            return None
        return image.size


class EncodedBytes:
    """The encoded files of a batch, concatenated in one host tensor (one pinned buffer, one pin).

    Not a dataclass and without a ``to`` method on purpose: Lightning's batch transfer leaves it on
    the host, where ``decode_jpeg`` wants its input, whatever the device it decodes on.
    """

    def __init__(self, flat: Tensor, offsets: list[int]) -> None:
        self.flat, self.offsets = flat, offsets

    @staticmethod
    def join(files: list[Tensor]) -> EncodedBytes:
        offsets = np.cumsum([0, *(f.numel() for f in files)]).tolist()
        flat = torch.cat(files) if files else torch.empty(0, dtype=torch.uint8)
        return EncodedBytes(flat, offsets)

    def __len__(self) -> int:
        return len(self.offsets) - 1

    def files(self) -> list[Tensor]:
        """One contiguous 1-D ``uint8`` view per file."""
        return [self.flat[a:b] for a, b in zip(self.offsets[:-1], self.offsets[1:])]

    def pin_memory(self) -> EncodedBytes:
        return EncodedBytes(self.flat.pin_memory(), self.offsets)


@dataclass
class EncodedImageBatch:
    """What a worker delivers with ``decode: device``: crops of the files it decoded itself, and the
    encoded bytes, crop boxes and flips of the JPEGs left to the device.

    Attributes:
        images: ``(B, 3, S, S)`` ``uint8``: the worker's crops where it decoded (fallback files), zeros
            at the ``encoded`` positions.
        index: ``(B,)`` ``int64`` index of each image in its source.
        data: the encoded JPEGs, in the order of ``encoded``.
        encoded: positions in the batch of the JPEGs to decode on the device.
        boxes: crop box ``(x0, y0, x1, y1)`` of each of those, in the file's pixels.
        flips: whether each of those is flipped horizontally.
        names: file names of those (for the warning when one fails to decode).
        skipped: files found unreadable while making this batch (as in :class:`ImageBatch`).
        position: index in its dataset of the batch's first sample (as in :class:`ImageBatch`).
    """

    images: Tensor
    index: Tensor
    data: EncodedBytes
    encoded: list[int]
    boxes: list[tuple[int, int, int, int]]
    flips: list[bool]
    names: list[str]
    skipped: int = 0
    position: int = -1

    def __len__(self) -> int:
        return self.images.shape[0]

    def pin_memory(self) -> EncodedImageBatch:
        """Pinned images, indices and encoded bytes (``DataLoader(pin_memory=True)`` calls it)."""
        return dataclasses.replace(self, images=self.images.pin_memory(), index=self.index.pin_memory(), data=self.data.pin_memory())


#: a sample of :class:`EncodedCropDataset`: ``(crop or None, image index, encoded bytes or None, box, flip)``
EncodedSample = tuple[Tensor | None, int, Tensor | None, tuple[int, int, int, int] | None, bool]


class EncodedCropDataset(CropDataset):
    """:class:`CropDataset` for ``decode: device``: JPEGs the device can decode (:func:`device_decodable`)
    come as encoded bytes plus the crop box and flip drawn exactly as :class:`CropDataset` draws them;
    every other image is decoded, cropped and resized here as by :class:`CropDataset`."""

    def __init__(self, *args, **kwargs) -> None:
        super().__init__(*args, **kwargs)
        root = getattr(self.source, "root", None)
        self._root = Path(root) if root is not None else None  # in-memory sources have no files

    def _read_encoded(self, j: int) -> tuple[Tensor, tuple[int, int]] | None:
        """``(bytes, (width, height))`` of source image ``j`` when the device can decode it, else ``None``."""
        path = self._root / self.source.names[j]
        size = device_decodable(path)
        if size is None:
            return None
        return torch.from_numpy(np.fromfile(path, dtype=np.uint8)), size

    def __getitem__(self, index: int) -> EncodedSample:  # type: ignore[override]
        if self._root is None:
            crop, j = super().__getitem__(index)
            return crop, j, None, None, False
        (encoded, j) = self.bad_files.first_readable(
            range(len(self.source)), index % len(self.source), self._read_encoded, self.source.names.__getitem__, self.source.describe()
        )
        if encoded is None:  # not for the device: decoded here, with the same draws as CropDataset
            crop, j = super().__getitem__(index)
            return crop, j, None, None, False
        data, (width, height) = encoded
        generator = None if self.train else torch.Generator().manual_seed(self.seed * 1_000_003 + index)
        box = random_resized_box(width, height, self.min_scale, generator)
        flip = self.train and torch.rand(1).item() < 0.5
        return None, j, data, box, flip

    def collate(self, samples: list[EncodedSample]) -> EncodedImageBatch:  # type: ignore[override]
        """Stack the worker's crops (zeros where the device decodes) and gather the encoded files."""
        size = self.size
        images = torch.zeros(len(samples), 3, size, size, dtype=torch.uint8)
        encoded, boxes, flips, files, names = [], [], [], [], []
        for k, (crop, j, data, box, flip) in enumerate(samples):
            if crop is not None:
                images[k] = crop
            else:
                assert data is not None and box is not None
                encoded.append(k)
                boxes.append(box)
                flips.append(flip)
                files.append(data)
                names.append(self.source.names[j])
        return EncodedImageBatch(
            images=images,
            index=torch.tensor([s[1] for s in samples], dtype=torch.int64),
            data=EncodedBytes.join(files),
            encoded=encoded,
            boxes=boxes,
            flips=flips,
            names=names,
            skipped=self.bad_files.take_count(),
        )


def _decode_jpegs(files: list[Tensor], device: torch.device) -> list[Tensor | None]:
    """``decode_jpeg`` of every file on ``device``, in one batched call; when that call fails, file by
    file, with ``None`` for each file that does not decode (a corrupt file that passed the header)."""
    from torchvision.io import ImageReadMode, decode_jpeg

    with warnings.catch_warnings():  # torchvision >= 0.29 deprecates its decoders in favour of TorchCodec
        warnings.simplefilter("ignore", DeprecationWarning)
        try:
            return list(decode_jpeg(files, mode=ImageReadMode.RGB, device=device))
        except RuntimeError:
            out: list[Tensor | None] = []
            for data in files:
                try:
                    out.append(decode_jpeg(data, mode=ImageReadMode.RGB, device=device))
                except RuntimeError:
                    out.append(None)
            return out


def pil_bilinear_weights(in_size: int, b0: int, b1: int, out_size: int, device: torch.device) -> tuple[Tensor, int]:
    """The resampling matrix of Pillow's ``resize(BILINEAR, box=…)`` along one axis: ``(W, first)``
    with ``W`` ``(out_size, n)`` float32 such that output ``i`` is ``Σ_k W[i, k] · input[first + k]``.

    Pillow's ``precompute_coeffs``: a triangle filter widened by the scale when shrinking
    (antialiasing), centred at ``b0 + (i + 0.5) · scale``, over the source pixels whose rounded
    bounds fall within the image, normalised to sum 1. The filter reads pixels outside the box when
    the image has them (cropping first, then resizing, would not: it differs at the crop's edges).
    """
    scale = (b1 - b0) / out_size
    filterscale = max(scale, 1.0)
    support = filterscale  # bilinear's support (1) times the filter scale
    first = max(int(b0 + 0.5 * scale - support + 0.5), 0)
    last = min(int(b0 + (out_size - 0.5) * scale + support + 0.5), in_size)
    centre = b0 + (torch.arange(out_size, device=device, dtype=torch.float64) + 0.5) * scale
    pixel = torch.arange(first, last, device=device, dtype=torch.float64)
    lo = torch.floor(centre - support + 0.5).clamp(min=0)[:, None]
    hi = torch.floor(centre + support + 0.5).clamp(max=in_size)[:, None]
    weights = (1.0 - ((pixel[None] - centre[:, None] + 0.5) / filterscale).abs()).clamp(min=0)
    weights = torch.where((pixel[None] >= lo) & (pixel[None] < hi), weights, torch.zeros_like(weights))
    return (weights / weights.sum(1, keepdim=True)).float(), first


def resized_crop(image: Tensor, box: tuple[int, int, int, int], size: int, flip: bool) -> Tensor:
    """``(1, 3, size, size)`` ``uint8``: the ``box`` of a ``(3, H, W)`` ``uint8`` image resized as
    Pillow's ``Image.resize((size, size), BILINEAR, box=box)`` does it (horizontal pass, rounding to
    ``uint8``, vertical pass: two small matrix products), flipped horizontally when ``flip``."""
    x0, y0, x1, y1 = box
    height, width = image.shape[-2:]
    wx, fx = pil_bilinear_weights(width, x0, x1, size, image.device)
    wy, fy = pil_bilinear_weights(height, y0, y1, size, image.device)
    region = image[:, fy : fy + wy.shape[1], fx : fx + wx.shape[1]].float()
    rows = torch.floor(region @ wx.T + 0.5).clamp_(0, 255)  # Pillow rounds to 8 bits between its passes
    crop = torch.floor(wy @ rows + 0.5).clamp_(0, 255).to(torch.uint8).unsqueeze(0)
    return crop.flip(-1) if flip else crop


def decode_batch(batch: EncodedImageBatch) -> ImageBatch:
    """The :class:`ImageBatch` of ``batch``: its JPEGs decoded on the device of ``batch.images`` (one
    batched call), cropped and resized there, and put between the worker's own crops.

    A file that fails to decode on the device (corrupt data behind a good header) is replaced by
    another image of the batch, with a warning, and counted in ``skipped``, like a bad file in a worker.
    """
    images = batch.images
    if not batch.encoded:
        return ImageBatch(images, batch.index, skipped=batch.skipped, position=batch.position)
    size, device = images.shape[-1], images.device
    decoded = _decode_jpegs(batch.data.files(), device)
    crops: dict[int, Tensor] = {}
    failed = []
    for k, image, box, flip, name in zip(batch.encoded, decoded, batch.boxes, batch.flips, batch.names):
        if image is None:
            failed.append(k)
            warnings.warn(f"skipping image {name!r}: its JPEG data does not decode on {device}", stacklevel=2)
            continue
        crops[k] = resized_crop(image, box, size, flip)
    if failed:
        good = [k for k in range(len(batch)) if k not in failed]
        if not good:
            raise RuntimeError(f"no image of the batch decodes on {device}: {batch.names}")
        for k in failed:  # the next good image of the batch stands in, as the workers do
            stand_in = min(good, key=lambda g: (g - k) % len(batch))
            crops[k] = crops[stand_in] if stand_in in crops else images[stand_in : stand_in + 1]
    # slices and one cat: no index tensor made from Python data (no host-to-device copy to wait for)
    rows = [crops[k] if k in crops else images[k : k + 1] for k in range(len(batch))]
    return ImageBatch(torch.cat(rows), batch.index, skipped=batch.skipped + len(failed), position=batch.position)
