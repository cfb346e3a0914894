"""Named batch structures passed between the DataModule, the tasks and the LightningModule."""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field
from typing import Any, Literal, TypeVar

import torch
from torch import Tensor


B = TypeVar("B")


def pin_batch(batch: B) -> B:
    """A copy of a batch dataclass whose tensors (also those in list fields) are in pinned host memory.

    ``DataLoader(pin_memory=True)`` calls a batch's ``pin_memory()`` method; a dataclass without
    one stays pageable, and the ``non_blocking`` copies to the GPU then gain nothing.
    """

    def pin(value: Any) -> Any:
        if isinstance(value, Tensor):
            return value.pin_memory()
        if isinstance(value, list):
            return [pin(v) for v in value]
        return value

    return dataclasses.replace(batch, **{f.name: pin(getattr(batch, f.name)) for f in dataclasses.fields(batch) if f.init})


@dataclass
class ImageBatch:
    """What a CPU worker delivers for one task: decoded, cropped, resized images.

    Attributes:
        images: ``(B, 3, H, W)`` ``uint8`` RGB (cheap to move to the device; tasks turn it
            into float in [0, 1] there).
        index: ``(B,)`` ``int64`` index of each image in its source (for tracing samples).
        skipped: files the worker found undecodable while making this batch (each was replaced
            by the next good image, warned about once and is avoided from then on).
        position: index in its dataset of the batch's first sample (set by the DataModule's
            loaders, -1 otherwise); validation task inputs are seeded by it.
        bad: indices of the images found undecodable while making this batch, when the loader
            keeps them across passes (streamed copies, :class:`~mtssl_lightning.data.streaming.StreamingSteps`).
    """

    images: Tensor
    index: Tensor
    skipped: int = 0
    position: int = -1
    bad: tuple[int, ...] = ()

    @staticmethod
    def collate(samples: list[tuple[Tensor, int]]) -> ImageBatch:
        """Stack ``(image (3, H, W) uint8, index)`` samples into one batch."""
        return ImageBatch(
            images=torch.stack([s[0] for s in samples]),
            index=torch.tensor([s[1] for s in samples], dtype=torch.int64),
        )

    def __len__(self) -> int:
        return self.images.shape[0]

    def pin_memory(self) -> ImageBatch:
        """The batch in pinned host memory (``DataLoader(pin_memory=True)`` calls it)."""
        return pin_batch(self)


@dataclass
class ClipBatch:
    """What a CPU worker delivers for a video task: short clips, cropped and resized alike.

    Attributes:
        clips: ``(B, T, 3, H, W)`` ``uint8`` RGB frames ``start, start + stride, …`` of each clip
            (the same crop box and flip for all frames of a clip).
        index: ``(B,)`` ``int64`` index of each clip's video in its source.
        start: ``(B,)`` ``int64`` frame number of each clip's first frame, counted from the start of the
            source's frame window (the video's first frame unless the source uses a ``frame_range``).
        masks: ``(B, 1, H, W)`` ``uint8`` (0/1) precomputed motion masks of each clip's key frame
            (frame ``T // 2``), cropped like the frames, when the source provides masks; else ``None``.
        skipped: videos the worker found undecodable while making this batch (replaced by the
            next good one, warned about once and avoided from then on).
        position: index in its dataset of the batch's first clip (see :class:`ImageBatch`).
    """

    clips: Tensor
    index: Tensor
    start: Tensor
    masks: Tensor | None = None
    skipped: int = 0
    position: int = -1

    @property
    def key_frame(self) -> int:
        """Position in ``T`` of the frame the task predicts for (the middle one)."""
        return self.clips.shape[1] // 2

    @staticmethod
    def collate(samples: list[tuple[Tensor, int, int, Tensor | None]]) -> ClipBatch:
        """Stack ``(clip (T, 3, H, W) uint8, video index, start frame, mask (1, H, W) uint8 or None)``."""
        masks = [s[3] for s in samples]
        has = [m is not None for m in masks]
        if any(has) and not all(has):
            raise ValueError("some clips of the batch have precomputed masks and some do not; a source must give all or none")
        return ClipBatch(
            clips=torch.stack([s[0] for s in samples]),
            index=torch.tensor([s[1] for s in samples], dtype=torch.int64),
            start=torch.tensor([s[2] for s in samples], dtype=torch.int64),
            masks=torch.stack(masks) if all(has) else None,  # type: ignore[arg-type]
        )

    def __len__(self) -> int:
        return self.clips.shape[0]

    def pin_memory(self) -> ClipBatch:
        """The batch in pinned host memory (``DataLoader(pin_memory=True)`` calls it)."""
        return pin_batch(self)


@dataclass
class TaskBatch:
    """A task's inputs and targets, built on the device from an :class:`ImageBatch` or :class:`ClipBatch`
    by the task's :class:`~mtssl_lightning.data.sampler.TaskSampler`.

    Every task subclasses this with its own targets. ``inputs`` is always what the trunk sees:
    ``(N, 3, h, w)`` float in [0, 1] (N may differ from B, e.g. N = B × patches).

    Attributes:
        inputs: the trunk's input.
        samples: images (or clips) the batch was built from (keyword-only; for throughput).
        skipped: files the workers skipped while making those (keyword-only; for the bad-file count).
    """

    inputs: Tensor
    samples: int = field(default=0, kw_only=True)
    skipped: int = field(default=0, kw_only=True)


@dataclass
class DataRequest:
    """What a task needs from the DataModule: which source, how many, how large.

    Attributes:
        source: ``"images"`` (any image folder / the sample photos; :class:`ImageBatch`) or
            ``"videos"`` (clips of a video source; :class:`ClipBatch`).
        batch_size: images (or clips) per training step for this task.
        image_size: side of the square crop the CPU workers deliver, in pixels.
        clip_length: frames per clip (videos only).
        frame_stride: frames between consecutive clip frames in the video (videos only).
        crop_area: ``(smallest, largest)`` area of this task's crops as fractions of the image
            (or frame); ``None`` = the DataModule's ``(min_scale, 1)``.
    """

    source: Literal["images", "videos"] = "images"
    batch_size: int = 32
    image_size: int = 224
    clip_length: int = 1
    frame_stride: int = 1
    crop_area: tuple[float, float] | None = None
