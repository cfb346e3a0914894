"""Probing a video file once: what decoding it needs (frame count, timestamps), or why it is unusable.

:func:`video_probe` is what :func:`~mtssl_lightning.data.screening.screen_folder` runs in its
processes for a folder of videos; :class:`~mtssl_lightning.data.video.VideoFolder` keeps the
results as :class:`StreamInfo` and decodes with them.
"""

from __future__ import annotations

import os
from dataclasses import dataclass


def import_av():  # noqa: ANN202 - the PyAV module
    """PyAV, imported when a video file is first opened: the package (and frame folders, which need
    no PyAV) imports without it, e.g. on a GPU machine where it is not installed (``make gpu-check``)."""
    try:
        import av
    except ImportError as err:  # pragma: no cover - PyAV is a dependency; only bare machines lack it
        raise ImportError(
            "decoding video files needs PyAV (`pip install av`); without it, use folders of extracted "
            "frames as `data.video_root` (mtssl_lightning.data.frames.FrameFolder)"
        ) from err
    return av


@dataclass(frozen=True)
class StreamInfo:
    """What decoding one video file needs, probed once."""

    total: int  # frames in the whole file
    first_pts: int | None  # pts of the first decoded frame (frame 0)
    ticks_per_frame: float | None  # pts units per frame; None = no usable timestamps, count frames
    reorder: int  # largest pts - dts seen (pts units): how far a dts-indexed seek can land late
    window: tuple[int, int]  # frames [lo, hi) of the file that this source uses


class UnusableVideo(Exception):
    """A video found unusable by a screening (the message is the reason, as reported)."""


def stream_info(path: str) -> tuple[int, int | None, float | None, int]:
    """``(frames, first pts, pts per frame, reorder)`` of the video file at ``path`` (see :class:`StreamInfo`).

    Decodes the first frame (proves the codec works) and reads the first packets' timestamps.

    Raises:
        ValueError: the file is empty, has no video stream or no decodable frame.
        av.FFmpegError: the file cannot be opened or demuxed.
    """
    if os.stat(path).st_size == 0:
        raise ValueError("empty file (0 bytes)")
    with import_av().open(path) as container:
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
        with import_av().open(path) as container:
            total = sum(1 for packet in container.demux(video=0) if packet.size > 0)
    first_pts = first.pts if tpf is not None else None
    return int(total), first_pts, tpf, int(reorder)


def video_probe(path: str) -> tuple[str | None, list | None]:
    """:func:`stream_info` in the form :func:`~mtssl_lightning.data.screening.screen_folder` runs in its
    processes: ``(reason, None)`` for an unusable file, ``(None, [frames, first pts, pts per frame, reorder])``."""
    try:
        return None, list(stream_info(path))
    except Exception as err:  # noqa: BLE001 - any failure means "unusable", and the reason is reported
        return f"unreadable ({type(err).__name__}: {err})", None
