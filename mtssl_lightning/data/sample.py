"""The bundled sample data: real photos shipped inside installed PyPI packages (no network).

* scikit-image (``skimage.data``): astronaut, chelsea, coffee, rocket, hubble_deep_field,
  immunohistochemistry, retina, and the two views of ``stereo_motorcycle``;
* scikit-learn (``load_sample_images``): china, flower.

Eleven natural RGB photos; the DataModule makes many random crops of them per epoch. The
hold-out split used for validation is fixed (:data:`SAMPLE_VAL_NAMES`).
"""

from __future__ import annotations

import warnings

import numpy as np

SKIMAGE_NAMES = ("astronaut", "chelsea", "coffee", "rocket", "hubble_deep_field", "immunohistochemistry", "retina")
SAMPLE_NAMES = (*SKIMAGE_NAMES, "motorcycle_left", "motorcycle_right", "china", "flower")
#: held out for validation: two unrelated scenes, never seen in training
SAMPLE_VAL_NAMES = ("coffee", "china")


def load_sample_image(name: str) -> np.ndarray:
    """One sample photo as ``(H, W, 3)`` uint8 RGB, read from the installed package."""
    if name in SKIMAGE_NAMES or name.startswith("motorcycle"):
        import skimage.data

        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            if name.startswith("motorcycle"):
                left, right, _ = skimage.data.stereo_motorcycle()
                image = left if name == "motorcycle_left" else right
            else:
                image = getattr(skimage.data, name)()
    elif name in ("china", "flower"):
        from sklearn.datasets import load_sample_image as sk_load

        image = sk_load(f"{name}.jpg")
    else:
        raise ValueError(f"unknown sample image {name!r}; choose from {SAMPLE_NAMES}")
    image = np.ascontiguousarray(image[..., :3], dtype=np.uint8)
    if image.ndim != 3 or image.shape[2] != 3:
        raise RuntimeError(f"sample image {name!r} is not RGB (shape {image.shape}); the package changed")
    return image


def sample_images(split: str = "all") -> dict[str, np.ndarray]:
    """The sample photos of ``split`` (``"all"``, ``"train"`` or ``"val"``) by name."""
    if split not in ("all", "train", "val"):
        raise ValueError(f"split must be 'all', 'train' or 'val', got {split!r}")
    names = [
        n for n in SAMPLE_NAMES
        if split == "all" or (n in SAMPLE_VAL_NAMES) == (split == "val")
    ]
    return {n: load_sample_image(n) for n in names}
