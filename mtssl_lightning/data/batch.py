"""Named batch structures passed between the DataModule, the tasks and the LightningModule."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal

import torch
from torch import Tensor


@dataclass
class ImageBatch:
    """What a CPU worker delivers for one task: decoded, cropped, resized images.

    Attributes:
        images: ``(B, 3, H, W)`` ``uint8`` RGB (cheap to move to the device; tasks turn it
            into float in [0, 1] there).
        index: ``(B,)`` ``int64`` index of each image in its source (for tracing samples).
    """

    images: Tensor
    index: Tensor

    @staticmethod
    def collate(samples: list[tuple[Tensor, int]]) -> ImageBatch:
        """Stack ``(image (3, H, W) uint8, index)`` samples into one batch."""
        return ImageBatch(
            images=torch.stack([s[0] for s in samples]),
            index=torch.tensor([s[1] for s in samples], dtype=torch.int64),
        )

    def __len__(self) -> int:
        return self.images.shape[0]


@dataclass
class TaskBatch:
    """A task's inputs and targets, built on the device from an :class:`ImageBatch`.

    Every task subclasses this with its own targets. ``inputs`` is always what the trunk sees:
    ``(N, 3, h, w)`` float in [0, 1] (N may differ from B, e.g. N = B × patches).
    """

    inputs: Tensor


@dataclass
class DataRequest:
    """What a task needs from the DataModule: which source, how many, how large.

    Attributes:
        source: ``"images"`` (any image folder / the sample photos) or ``"videos"`` (clips,
            added with the motion-segmentation task).
        batch_size: images (or clips) per training step for this task.
        image_size: side of the square crop the CPU workers deliver, in pixels.
    """

    source: Literal["images", "videos"] = "images"
    batch_size: int = 32
    image_size: int = 224
