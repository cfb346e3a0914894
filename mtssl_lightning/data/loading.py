"""The loaders' plumbing: worker budget, worker start-up, task seeds, and the loader wrappers the
DataModule uses (batch positions, validation workers released after the last batch, idle loaders
for the tasks a rank does not train)."""

from __future__ import annotations

import os
import signal
from collections.abc import Iterator
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np
from lightning.fabric.utilities.seed import pl_worker_init_function
from lightning.pytorch.utilities import CombinedLoader
import torch
from torch.utils.data import DataLoader, Dataset, IterableDataset

from mtssl_lightning.data.batch import ClipBatch, ImageBatch
from mtssl_lightning.data.clips import ClipDataset
from mtssl_lightning.data.datasets import CropDataset
from mtssl_lightning.data.frames import FrameFolder
from mtssl_lightning.data.video import VIDEO_EXTENSIONS, VideoFolder, VideoSource

if TYPE_CHECKING:
    from mtssl_lightning.data.streaming import StreamingSteps
    from mtssl_lightning.data.streaming_crops import StreamingCrops

__all__ = [
    "IdleLoader",
    "Positions",
    "ReleasingCombinedLoader",
    "init_worker",
    "open_video_source",
    "split_workers",
    "task_loader",
    "task_seed",
]

#: what the loaders deliver for one task
RawBatch = ImageBatch | ClipBatch


def split_workers(total: int, work: list[float]) -> list[int]:
    """Share ``total`` DataLoader workers among loaders in proportion to their ``work`` per batch.

    Each loader gets about ``total · work / Σ work`` workers, at least one while there are enough to
    go round (else the busiest loaders get one each and the others load in the main process, 0
    workers); rounding goes to the largest remainders. The shares add up to exactly ``total``.
    """
    if total <= 0 or not work:
        return [0] * len(work)
    if total < len(work):  # not one each: the busiest loaders get one
        busiest = sorted(range(len(work)), key=lambda i: -work[i])[:total]
        return [1 if i in busiest else 0 for i in range(len(work))]
    weights = [max(float(w), 0.0) for w in work]
    ideal = [total * w / sum(weights) for w in weights] if sum(weights) > 0 else [total / len(work)] * len(work)
    counts = [max(1, int(x)) for x in ideal]
    while sum(counts) > total:  # the minimum of one pushed the sum over: take from the most over-served
        i = max((i for i in range(len(counts)) if counts[i] > 1), key=lambda i: counts[i] - ideal[i])
        counts[i] -= 1
    while sum(counts) < total:  # hand out the rest by largest remainder
        i = max(range(len(counts)), key=lambda i: ideal[i] - counts[i])
        counts[i] += 1
    return counts


def task_seed(*keys: int) -> int:
    """A 63-bit seed mixed from integer ``keys`` (run seed, rank, batch number …) by NumPy's SeedSequence."""
    return int(np.random.SeedSequence([int(k) % 2**63 for k in keys]).generate_state(1, np.uint64)[0] >> np.uint64(1))


class Positions(Dataset):
    """A crop or clip dataset whose batches record where they start in it (``batch.position``).

    Validation task inputs are seeded by that position (see
    :meth:`MultiTaskDataModule.on_after_batch_transfer`), so they are the same every epoch
    without any counter to reset.
    """

    def __init__(self, dataset: CropDataset | ClipDataset) -> None:
        self.dataset = dataset

    def __len__(self) -> int:
        return len(self.dataset)

    def __getitem__(self, index: int) -> tuple[object, int]:
        return self.dataset[index], index

    def collate(self, samples: list[tuple[object, int]]) -> RawBatch:
        """The dataset's own collate (which counts skipped files), plus the first sample's position."""
        batch = self.dataset.collate([sample for sample, _ in samples])
        batch.position = samples[0][1]
        return batch


class ReleasingCombinedLoader(CombinedLoader):
    """A ``CombinedLoader`` that lets its loaders' worker processes go as soon as its last batch is out.

    Lightning stops a validation run after ``len()`` batches without asking for one more, so the
    loaders' iterators are never exhausted and their (non-persistent) workers would sit idle
    through the training epochs until the next validation. ``reset()`` is ``CombinedLoader``'s own
    public "shut the workers down and forget the iterators".
    """

    _length: int | None = None

    def __iter__(self) -> ReleasingCombinedLoader:
        iterator = super().__iter__()
        self._served, self._length = 0, super().__len__()
        return iterator

    def __len__(self) -> int:
        return self._length if self._length is not None else super().__len__()

    def __next__(self) -> Any:
        if self._length is not None and self._served >= self._length:
            raise StopIteration  # a plain for loop asks once more; Lightning does not
        out = super().__next__()
        self._served += 1
        if self._served == self._length:
            self.reset()  # the batch is in hand; nobody asks for another
        return out


class IdleLoader:
    """Stands in for the loader of a task this rank does not train: ``length`` batches of ``None``."""

    def __init__(self, length: int) -> None:
        self.length = length

    def __len__(self) -> int:
        return self.length

    def __iter__(self) -> Iterator[None]:
        return iter([None] * self.length)


def init_worker(worker_id: int) -> None:
    """DataLoader worker start-up: ignore SIGTERM, and seed like Lightning when it is asked to.

    A pre-emption (SLURM, Kubernetes) sends SIGTERM to every process of the job. Workers that
    died of it would make the main process fail while it saves its pre-emption checkpoint; so
    they ignore it, and the main process shuts them down after saving. Setting a
    ``worker_init_fn`` stops Lightning from adding its own, so its seeding
    (``seed_everything(workers=True)``, which LightningCLI uses) is done here.
    """
    signal.signal(signal.SIGTERM, signal.SIG_IGN)
    if int(os.environ.get("PL_SEED_WORKERS", "0")):
        pl_worker_init_function(worker_id)


def open_video_source(root: str, frame_range: tuple[float, float] = (0.0, 1.0)) -> VideoSource:
    """A :class:`VideoFolder` if ``root`` holds video files (recursively), else a :class:`FrameFolder`."""
    path = Path(root).expanduser()
    if not path.is_dir():
        raise FileNotFoundError(
            f"video folder {root!r} does not exist or is not a folder; set `data.video_root` to a folder of "
            "video files or of frame folders"
        )
    for _, _, files in os.walk(path, followlinks=True):
        if any(f.lower().endswith(VIDEO_EXTENSIONS) for f in files):
            return VideoFolder(path, frame_range=frame_range)
    return FrameFolder(path, frame_range=frame_range)


def task_loader(
    dataset: CropDataset | ClipDataset | StreamingCrops, batch_size: int, train: bool, workers: int, pin_memory: bool | None, world: int = 1
) -> DataLoader | StreamingSteps:
    """One task's loader: a ``DataLoader`` (shuffled, full batches when training) of a folder's
    crops or clips, or the LitData loader of an optimized copy's crops (:func:`~mtssl_lightning.data.streaming.streaming_loader`).

    Training workers stay for the next epoch; validation's exist only while it runs.
    ``pin_memory`` ``None`` pins only when CUDA is available.
    """
    pin = torch.cuda.is_available() if pin_memory is None else pin_memory
    if isinstance(dataset, IterableDataset):  # an optimized copy's StreamingCrops
        from mtssl_lightning.data.streaming import streaming_loader

        return streaming_loader(dataset, batch_size, train, workers, pin, world, init_worker)
    positioned = Positions(dataset)
    return DataLoader(
        positioned,
        batch_size=batch_size,
        shuffle=train,
        drop_last=train,
        num_workers=workers,
        persistent_workers=train and workers > 0,
        pin_memory=pin,
        collate_fn=positioned.collate,  # counts the files the worker had to skip
        worker_init_fn=init_worker,
    )
