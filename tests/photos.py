"""Sample photos as tensors, for the learning tests of the image tasks."""

from __future__ import annotations

import numpy as np
import torch
import torch.nn.functional as F

from mtssl_lightning.data.sample import sample_images

#: the held-out photos the learning tests measure on: the sample set's three unrelated validation
#: photos, on which their seeds' spreads were measured (the DataModule's validation split also
#: holds three held-out clip frames, see mtssl_lightning.data.sample)
LEARNING_VAL_PHOTOS = ("coffee", "china", "grace_hopper")


def learning_photos(split: str) -> list[np.ndarray]:
    """The sample photos of ``split`` (``"train"`` or ``"val"``) the learning tests use:
    :data:`LEARNING_VAL_PHOTOS` for ``"val"``, every training photo for ``"train"``."""
    photos = sample_images(split)
    return [photos[name] for name in LEARNING_VAL_PHOTOS] if split == "val" else list(photos.values())


def photo_tensors(split: str, short_side: int) -> list[torch.Tensor]:
    """The photos of :func:`learning_photos` as ``(1, 3, h, w)`` float, resized once (antialiased) so
    that the short side is ``short_side`` (same content scale for all photos, cheap crops)."""
    photos = []
    for array in learning_photos(split):
        photo = torch.from_numpy(np.array(array)).permute(2, 0, 1)[None].float() / 255.0
        scale = short_side / min(photo.shape[-2:])
        size = (round(photo.shape[-2] * scale), round(photo.shape[-1] * scale))
        photos.append(F.interpolate(photo, size=size, mode="bilinear", antialias=True, align_corners=False))
    return photos
