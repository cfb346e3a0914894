"""Sample photos as tensors, for the learning tests of the image tasks."""

from __future__ import annotations

import numpy as np
import torch
import torch.nn.functional as F

from mtssl_lightning.data.sample import sample_images


def photo_tensors(split: str, short_side: int) -> list[torch.Tensor]:
    """The sample photos of ``split`` as ``(1, 3, h, w)`` float, resized once (antialiased) so
    that the short side is ``short_side`` (same content scale for all photos, cheap crops)."""
    photos = []
    for array in sample_images(split).values():
        photo = torch.from_numpy(np.array(array)).permute(2, 0, 1)[None].float() / 255.0
        scale = short_side / min(photo.shape[-2:])
        size = (round(photo.shape[-2] * scale), round(photo.shape[-1] * scale))
        photos.append(F.interpolate(photo, size=size, mode="bilinear", antialias=True, align_corners=False))
    return photos
