"""Videos stored as folders of extracted frames, optionally with precomputed motion masks beside them
(a :class:`~mtssl_lightning.data.video.VideoSource`)."""

from __future__ import annotations

import os
import re
import warnings
from pathlib import Path

import numpy as np
from PIL import Image

from mtssl_lightning.data.sources import to_rgb
from mtssl_lightning.data.video import VideoSource, check_frame_range, frame_window

FRAME_EXTENSIONS = (".jpg", ".jpeg", ".png", ".bmp", ".webp")
#: file-name suffix of a precomputed mask stored beside its frame (``00012_mask.png``)
MASK_SUFFIX = "_mask.png"
#: sub-folder of a frame folder holding precomputed masks (``masks/00012.png``)
MASK_DIR = "masks"


def natural_key(name: str) -> list[str | int]:
    """Sort key that orders ``frame_2.jpg`` before ``frame_10.jpg`` (same order as plain sorting for zero-padded names)."""
    return [int(part) if part.isdigit() else part.lower() for part in re.split(r"(\d+)", name)]

def mask_to_binary(image: Image.Image) -> np.ndarray:
    """A mask image as ``(H, W)`` uint8 in {0, 1}: nonzero = moving.

    Palette images use the palette index (0 = background, as in DAVIS annotations); an alpha
    channel is ignored; colour masks count a pixel as moving when any channel is nonzero.
    """
    if image.mode in ("RGBA", "LA", "PA"):
        image = image.convert("RGB" if image.mode == "RGBA" else "L")
    array = np.asarray(image)
    if array.ndim == 3:
        array = array.any(axis=2)
    return (array != 0).astype(np.uint8)


class FrameFolder(VideoSource):
    """Videos stored as folders of frame images: every folder under ``root`` that directly holds
    image files (.jpg .jpeg .png .bmp .webp) is one video, its frames sorted by file name.

    Precomputed motion masks (nonzero = moving) are read from ``<frame stem>_mask.png`` beside
    the frame or from ``masks/<frame stem>.png`` inside the video's folder; they are not frames.

    Args:
        root: the folder of frame folders (searched recursively, so ``<class>/<video>/`` works).
        frame_range: fractions ``(start, end)`` of each video's frames to use (see :class:`VideoFolder`).
    """

    def __init__(self, root: str | os.PathLike, frame_range: tuple[float, float] = (0.0, 1.0)) -> None:
        self.root = Path(root).expanduser()
        if not self.root.is_dir():
            raise FileNotFoundError(f"frame folder {str(self.root)!r} does not exist or is not a folder; set `data.video_root` to a folder of frame folders")
        self.frame_range = check_frame_range(frame_range)
        self.names, self._files, self._masks = [], [], []
        for dirpath, dirnames, files in os.walk(self.root, followlinks=True):
            dirnames[:] = sorted(d for d in dirnames if d != MASK_DIR)
            frames = sorted(
                (f for f in files if f.lower().endswith(FRAME_EXTENSIONS) and not f.lower().endswith(MASK_SUFFIX)), key=natural_key
            )
            if not frames:
                continue
            masks = {f[: -len(MASK_SUFFIX)]: f for f in files if f.lower().endswith(MASK_SUFFIX)}
            mask_dir = Path(dirpath, MASK_DIR)
            if mask_dir.is_dir():
                masks.update({Path(f).stem: f"{MASK_DIR}/{f}" for f in os.listdir(mask_dir) if f.lower().endswith(".png")})
            self.names.append(str(Path(dirpath).relative_to(self.root)))
            self._files.append(frames)
            # a video has masks when every frame has one; otherwise none are used (batches need all or none)
            self._masks.append([masks[Path(f).stem] for f in frames] if all(Path(f).stem in masks for f in frames) else None)
        if not self.names:
            raise FileNotFoundError(f"no folders of frame images ({', '.join(FRAME_EXTENSIONS)}) found under {str(self.root)!r}")
        with_masks = sum(m is not None for m in self._masks)
        self.has_masks = with_masks == len(self.names)
        if 0 < with_masks < len(self.names):
            warnings.warn(
                f"only {with_masks} of the {len(self.names)} frame folders under {str(self.root)!r} have a mask for every frame; "
                "precomputed masks are ignored (motion masks will be computed from the frames)",
                stacklevel=2,
            )

    def _probe(self, i: int) -> int:
        lo, hi = frame_window(len(self._files[i]), self.frame_range)
        with Image.open(self.root / self.names[i] / self._files[i][0]) as image:  # header only: cheap
            image.size
        return hi - lo

    def _file_index(self, i: int, frame: int) -> int:
        return frame_window(len(self._files[i]), self.frame_range)[0] + frame

    def read_clip(self, i: int, start: int, length: int, stride: int = 1) -> np.ndarray:
        """Frames ``start, start + stride, …`` of video ``i`` as ``(length, H, W, 3)`` uint8 RGB.

        Raises:
            ValueError: the clip does not fit, or the frames differ in size.
        """
        self._check_clip(i, start, length, stride)
        folder = self.root / self.names[i]
        frames = []
        for k in range(length):
            with Image.open(folder / self._files[i][self._file_index(i, start + k * stride)]) as image:
                image.load()
                frames.append(np.asarray(to_rgb(image)))
        if len({f.shape for f in frames}) > 1:
            raise ValueError(f"frames of {self.names[i]!r} differ in size: {sorted({f.shape for f in frames})}")
        return np.stack(frames)

    def read_mask(self, i: int, frame: int) -> np.ndarray | None:
        """Precomputed mask of ``frame`` (in the window) of video ``i``: ``(H, W)`` uint8 in {0, 1}, or ``None``."""
        if self._masks[i] is None:
            return None
        with Image.open(self.root / self.names[i] / self._masks[i][self._file_index(i, frame)]) as image:
            image.load()
            return mask_to_binary(image)

    def describe(self) -> str:
        masks = " with precomputed masks" if self.has_masks else ""
        window = "" if self.frame_range == (0.0, 1.0) else f", frames {self.frame_range[0]:.0%}-{self.frame_range[1]:.0%} of each"
        return f"{len(self)} frame folders{masks} under {self.root}{window}"
