"""Decoded video frames kept in a worker's memory, up to a byte budget (``data.video_frame_cache_mb``).

A clip of a video file costs about one GOP of decoding (:class:`~mtssl_lightning.data.video.VideoFolder`
seeks to the keyframe before it). When the training videos are few and short — the sample clips,
a small lab set — the same frames are decoded again and again: in the quickstart, decoding took
more CPU than the model's step. Keeping the decoded frames lets a clip whose frames were all
decoded before come from memory. The frames returned are the arrays decoding gave, so training is
unchanged wherever decoding a frame does not depend on where the reader seeked: constant-frame-rate
files whose keyframes start a GOP, which :mod:`~mtssl_lightning.data.video` assumes anyway.

Why not ``functools.lru_cache``: it bounds the number of entries, and a frame's size depends on
the video; the budget here is in bytes, which is what a user can size against their memory.
"""

from __future__ import annotations

from collections import OrderedDict
from collections.abc import Hashable

import numpy as np


class FrameCache:
    """Frames by key (``(video, frame number)``), least recently used dropped first once the frames
    together exceed ``max_bytes``. Each DataLoader worker fills its own (nothing is shared).

    Args:
        max_bytes: budget for the frames' pixel data; a frame larger than it is not kept.
    """

    def __init__(self, max_bytes: int) -> None:
        if max_bytes < 1:
            raise ValueError(f"a frame cache needs a positive budget, got {max_bytes} bytes")
        self.max_bytes = max_bytes
        self.bytes = 0
        self._frames: OrderedDict[Hashable, np.ndarray] = OrderedDict()

    def __getstate__(self) -> dict[str, int]:
        # a process that receives the source by pickling (spawned workers, other ranks) starts empty:
        # sending the frames would cost more than decoding them again
        return {"max_bytes": self.max_bytes}

    def __setstate__(self, state: dict[str, int]) -> None:
        self.__init__(state["max_bytes"])

    def __len__(self) -> int:
        return len(self._frames)

    def get_all(self, keys: list[Hashable]) -> list[np.ndarray] | None:
        """The frames of every key (marked as recently used), or ``None`` when any is missing."""
        frames = [self._frames.get(key) for key in keys]
        if any(frame is None for frame in frames):
            return None
        for key in keys:
            self._frames.move_to_end(key)
        return frames  # type: ignore[return-value]

    def put(self, key: Hashable, frame: np.ndarray) -> None:
        """Keep ``frame`` (read-only from now on: a caller that wrote into it would change the cache).

        A key already kept counts as used now. One array kept under several keys (a frame repeated
        over a timestamp gap) is counted once per key: the budget errs on the safe side.
        """
        if key in self._frames:
            self._frames.move_to_end(key)
            return
        if frame.nbytes > self.max_bytes:
            return
        frame.flags.writeable = False
        self._frames[key] = frame
        self.bytes += frame.nbytes
        while self.bytes > self.max_bytes:
            _, dropped = self._frames.popitem(last=False)
            self.bytes -= dropped.nbytes
