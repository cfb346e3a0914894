"""The clip dataset that feeds the motion-segmentation task: clips of a video source, cropped and resized
alike in DataLoader workers."""

from __future__ import annotations

import numpy as np
import torch
from PIL import Image
from torch.utils.data import Dataset

from mtssl_lightning.data.batch import ClipBatch
from mtssl_lightning.data.datasets import BadFiles, CropScale, crop_scale_range, random_resized_box
from mtssl_lightning.data.video import VideoSource

class ClipDataset(Dataset):
    """Clips of a video source, cropped and resized alike, as ``ClipBatch`` samples.

    Every sample is a clip drawn uniformly over all the clips of the usable videos (a video with
    twice the frames is drawn about twice as often; drawing videos uniformly would give a short
    video's frames many times the weight of a long one's). With ``train`` the draws come from
    torch's RNG (with replacement); otherwise from a generator seeded by ``seed`` and the index.

    A sample is ``(clip uint8 (T, 3, size, size), video index, start frame, mask)`` where the
    mask is the source's precomputed mask of the key frame ``start + (T // 2) * frame_stride``
    as uint8 ``(1, size, size)`` in {0, 1}, or ``None`` when the source has no masks. All frames
    and the mask share one random resized crop box and one horizontal flip. ``start`` counts in
    the source's frame numbering (relative to its ``frame_range`` window, if any).

    Args:
        source: the videos; :meth:`VideoSource.check` runs here, so unusable videos are dropped
            (with a warning each) before any worker starts.
        size: output side in pixels.
        clip_length: frames per clip ``T``.
        frame_stride: frames between consecutive clip frames in the video.
        length: samples per epoch; ``None`` = one per usable video.
        train: random starts, crops and flips from torch's RNG (seeded per worker by Lightning);
            otherwise start and crop are random but fixed per index (seeded by ``seed`` and
            the index) and there is no flip, so validation sees the same clips every epoch.
        min_scale: smallest crop area as a fraction of the frame, or a range (smallest, largest).
        seed: base seed of the fixed (validation) clips.
    """

    def __init__(
        self,
        source: VideoSource,
        size: int,
        clip_length: int,
        frame_stride: int = 1,
        length: int | None = None,
        train: bool = True,
        min_scale: CropScale = 0.2,
        seed: int = 0,
    ) -> None:
        if size < 1:
            raise ValueError(f"`size` must be >= 1 pixel, got {size}")
        if clip_length < 1:
            raise ValueError(f"`clip_length` must be >= 1 frame, got {clip_length}")
        if frame_stride < 1:
            raise ValueError(f"`frame_stride` must be >= 1, got {frame_stride}")
        crop_scale_range(min_scale)
        if length is not None and length < 1:
            raise ValueError(f"`length` must be >= 1 or None, got {length}")
        if len(source) == 0:
            raise ValueError(f"no videos in {source.describe()}")
        self.source, self.size, self.train = source, size, train
        self.clip_length, self.frame_stride = clip_length, frame_stride
        self.span = (clip_length - 1) * frame_stride + 1  # frames of the video one clip covers
        self.videos = source.check(self.span)  # in the main process: bad files never reach workers
        self.length = length if length is not None else len(self.videos)
        # clips (start frames) per usable video, cumulated: a uniform draw over them picks the video
        self._clip_ends = np.cumsum([source.num_frames(j) - self.span + 1 for j in self.videos])
        self.min_scale, self.seed = min_scale, seed
        self.bad_files = BadFiles("video")

    def __len__(self) -> int:
        return self.length

    def collate(self, samples: list[tuple[torch.Tensor, int, int, torch.Tensor | None]]) -> ClipBatch:
        """:meth:`ClipBatch.collate` plus the count of videos found bad for this batch (in the worker)."""
        batch = ClipBatch.collate(samples)
        batch.skipped = self.bad_files.take_count()
        return batch

    def _read(self, k: int, generator: torch.Generator | None) -> tuple[np.ndarray, np.ndarray | None, int, int]:
        """A random clip of usable video ``k`` (uniform start), or of the next readable one, warning once per bad video.

        Returns ``(frames (T, H, W, 3), key-frame mask (H, W) or None, source index, start)``.
        """

        def read(j: int) -> tuple[np.ndarray, np.ndarray | None, int]:
            frames_in_video = self.source.num_frames(j)
            start = int(torch.randint(0, frames_in_video - self.span + 1, (1,), generator=generator).item())
            frames = self.source.read_clip(j, start, self.clip_length, self.frame_stride)
            mask = None
            if self.source.has_masks:
                mask = self.source.read_mask(j, start + (self.clip_length // 2) * self.frame_stride)
                if mask is None:
                    raise RuntimeError("the source has masks but none was found for the key frame")
            return frames, mask, start

        (frames, mask, start), j = self.bad_files.first_readable(
            self.videos, k, read, self.source.names.__getitem__, f"the usable videos of {self.source.describe()}"
        )
        return frames, mask, j, start

    def __getitem__(self, index: int) -> tuple[torch.Tensor, int, int, torch.Tensor | None]:
        """Sample ``index``: ``(clip uint8 (T, 3, size, size), video index, start frame, mask uint8 (1, size, size) or None)``."""
        generator = None if self.train else torch.Generator().manual_seed(self.seed * 1_000_003 + index)
        clip = int(torch.randint(0, int(self._clip_ends[-1]), (1,), generator=generator).item())
        k = int(np.searchsorted(self._clip_ends, clip, side="right"))  # the usable video holding that clip
        frames, mask, j, start = self._read(k, generator)
        height, width = frames.shape[1:3]
        box = random_resized_box(width, height, self.min_scale, generator)
        out = np.empty((len(frames), self.size, self.size, 3), dtype=np.uint8)
        for t, frame in enumerate(frames):
            out[t] = np.asarray(Image.fromarray(frame).resize((self.size, self.size), Image.BILINEAR, box=box))
        mask_out = None
        if mask is not None:
            mask_image = Image.fromarray(mask)
            if mask.shape != (height, width):  # masks stored at another resolution: align to the frame first
                mask_image = mask_image.resize((width, height), Image.NEAREST)
            mask_out = np.asarray(mask_image.resize((self.size, self.size), Image.NEAREST, box=box))[None]
        if self.train and torch.rand(1).item() < 0.5:
            out = out[:, :, ::-1]
            if mask_out is not None:
                mask_out = mask_out[:, :, ::-1]
        clip = torch.from_numpy(np.ascontiguousarray(out)).permute(0, 3, 1, 2).contiguous()
        return clip, j, start, None if mask_out is None else torch.from_numpy(np.array(mask_out))  # a writable copy
