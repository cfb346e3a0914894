"""The DataModule's folders, screened by one process and shared with every rank.

How a job of many ranks screens once (:class:`SharedScreenings`, used by
:class:`~mtssl_lightning.data.datamodule.MultiTaskDataModule`):

1. ``prepare_data`` — Lightning runs it on **global rank 0 only** (the DataModule sets
   ``prepare_data_per_node = False``) while every other rank waits at a barrier without timeout.
   Rank 0 lists each folder, probes what the cache does not cover (in processes, with a progress
   bar) and writes the cache file (atomically). Data problems (a missing folder, no usable file)
   are kept, not raised, so that no rank is left waiting for one that failed.
2. ``setup`` — rank 0 broadcasts each folder's listing key (or its error); every other rank
   reads the cache file and checks the key, so no other rank lists or probes anything. A rank
   that cannot see the file (a cache folder that is not on a file system shared by all nodes)
   screens the folder itself, with a warning saying how to avoid it. Errors are raised on every
   rank alike. Only rank 0 reports the unusable files (a warning each, one count).

The cache is keyed by the listing, so a resumed or repeated run starts from it at once, and a
changed folder is screened again (only its new or changed files).
"""

from __future__ import annotations

import logging
import os
import warnings
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from mtssl_lightning.data.screening import Screening, load_screening
from mtssl_lightning.data.sources import ImageCheck, ImageFolder
from mtssl_lightning.data.streaming import is_optimized
from mtssl_lightning.data.video import VIDEO_EXTENSIONS, VideoFolder

log = logging.getLogger(__name__)

#: ``(kind, root)``: ``("images", folder)`` or ``("videos", folder)``
FolderId = tuple[str, str]


def holds_video_files(root: str | os.PathLike) -> bool:
    """Whether any file under ``root`` (recursively) is a video file (else it is a folder of frame folders)."""
    for _, _, files in os.walk(Path(root).expanduser(), followlinks=True):
        if any(f.lower().endswith(VIDEO_EXTENSIONS) for f in files):
            return True
    return False


def folders_to_screen(
    sources: set[str], image_roots: list[str | None], video_roots: list[str | None], image_check: ImageCheck
) -> list[FolderId]:
    """The folders a DataModule's tasks read that need a screen: image folders (``sources`` holds
    ``images``, ``image_check`` is not ``none``; not optimized copies: they were screened when
    written) and folders of video files (frame folders are probed cheaply when opened)."""
    folders: list[FolderId] = []
    if "images" in sources and image_check != "none":
        folders += [("images", root) for root in image_roots if root is not None and not is_optimized(root)]
    if "videos" in sources:
        folders += [("videos", root) for root in video_roots if root is not None and holds_video_files(root)]
    return folders


@dataclass
class SharedScreenings:
    """Screenings of a DataModule's image and video folders, made in one process, used by all.

    Args:
        folders: the folders to screen.
        image_check: how images are probed (``none``: image folders are only listed, on every rank).
        cache_dir: where the cache files live (``None``: no cache; the ranks then screen alone).
        workers: screening processes (``None``: every core).
    """

    folders: list[FolderId]
    image_check: ImageCheck
    cache_dir: Path | None
    workers: int | None = None
    #: ``{folder: (the folder object listed here or None, its screening or the error it raised)}``
    results: dict[FolderId, tuple[ImageFolder | VideoFolder | None, Screening | BaseException]] = field(default_factory=dict)
    #: whether this process screened (and so reports the unusable files)
    screened_here: bool = False

    def _mode(self, kind: str) -> str:
        return self.image_check if kind == "images" else "probe"

    def screen(self, progress: bool = True) -> None:
        """Screen every folder in this process (``prepare_data``, or a single process's ``setup``)."""
        for kind, root in self.folders:
            self.results[(kind, root)] = self._screen_one(kind, root, self.cache_dir, progress)
        self.screened_here = True

    def _screen_one(
        self, kind: str, root: str, cache_dir: Path | None, progress: bool
    ) -> tuple[ImageFolder | VideoFolder | None, Screening | BaseException]:
        """``(the folder, its screening)``, or ``(None or the folder, the error raised)`` (raised on every rank in setup)."""
        folder: ImageFolder | VideoFolder | None = None
        try:
            folder = ImageFolder(root) if kind == "images" else VideoFolder(root)
            if isinstance(folder, ImageFolder):
                return folder, folder.screen(self.image_check, cache_dir, self.workers, progress)
            return folder, folder.screen(cache_dir, self.workers, progress)
        except Exception as err:  # noqa: BLE001 - see the module doc
            return folder, err

    def announce(self) -> dict[FolderId, str | BaseException]:
        """What rank 0 broadcasts: each folder's listing key, or the error screening it raised."""
        return {fid: result.key if isinstance(result, Screening) else result for fid, (_, result) in self.results.items()}

    def receive(self, announced: dict[FolderId, str | BaseException], rank: int) -> None:
        """On a rank that did not screen: take each folder's screening from the cache file rank 0
        wrote (checked against the key it ``announced``), else screen it here."""
        for (kind, root), key in announced.items():
            if isinstance(key, BaseException):
                self.results[(kind, root)] = (None, key)
                continue
            cached = load_screening(self.cache_dir, root, kind, self._mode(kind), key) if self.cache_dir is not None else None
            if cached is None:
                warnings.warn(
                    f"rank {rank} cannot read the screening of {kind} under {root!r} that rank 0 wrote to "
                    f"{str(self.cache_dir)!r}; screening them again here. Set `data.cache_dir` to a folder every "
                    "node sees (a shared file system) so that only rank 0 screens.",
                    stacklevel=2,
                )
                self.results[(kind, root)] = (None, self._screen_one(kind, root, None, progress=False)[1])
                continue
            self.results[(kind, root)] = (None, cached)

    def share(self, trainer: Any) -> None:
        """Make every rank hold every folder's screening (called in ``setup`` on every rank).

        Without a trainer, or with one process, this process screens unless ``prepare_data`` did.
        """
        world = trainer.world_size if trainer is not None else 1
        rank = trainer.global_rank if trainer is not None else 0
        if rank == 0 and not self.screened_here:  # prepare_data was not called (e.g. a DataModule used alone)
            self.screen()
        if world > 1:
            announced = trainer.strategy.broadcast(self.announce() if rank == 0 else None, src=0)
            if not self.screened_here:
                self.receive(announced, rank)

    def _result(self, kind: str, root: str) -> tuple[ImageFolder | VideoFolder | None, Screening]:
        folder, result = self.results[(kind, root)]
        if isinstance(result, BaseException):
            raise result
        return folder, result

    def images(self, root: str) -> ImageFolder:
        """The usable images of ``root`` (rank 0 warns about the others and logs their count).

        Raises:
            ValueError: no image is usable; FileNotFoundError: the folder is missing or has no image files.
        """
        folder, screening = self._result("images", root)
        folder = folder if isinstance(folder, ImageFolder) else ImageFolder(root, screening.names)
        return folder.usable(screening, report=self.screened_here)

    def videos(self, root: str, frame_range: tuple[float, float]) -> VideoFolder:
        """The videos of ``root`` in the window ``frame_range``, probed by the screening (no file is opened here).

        Raises:
            FileNotFoundError: the folder is missing or has no video files.
        """
        _, screening = self._result("videos", root)
        source = VideoFolder(root, names=screening.names, frame_range=frame_range)
        source.use_screening(screening)
        return source
