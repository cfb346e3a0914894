"""Training from an optimized, sharded copy of an image folder, streamed with LitData.

``mtssl optimize-data SRC DST`` (:mod:`~mtssl_lightning.data.optimize`) screens ``SRC`` and writes
its usable images, as their original encoded bytes, into LitData chunks under ``DST/train`` and
``DST/val``. Pointing ``data.image_root`` at ``DST`` (a local folder, a shared file system, or an
object-store URL such as ``s3://bucket/imagenet-mtssl``) trains from those chunks:

* every image task reads a :class:`~mtssl_lightning.data.streaming_crops.StreamingCrops` (a
  LitData ``StreamingDataset``) through a
  ``StreamingDataLoader``: LitData shards the chunks across nodes, ranks and workers itself
  (no ``DistributedSampler``), downloads them ahead of use and shuffles chunk-wise;
* workers decode and crop exactly as from a folder (JPEG DCT scaling included); an image that
  fails to decode is skipped with a warning and counted in ``train/skipped_files`` once per
  loader (a folder's loaders count once per worker: the same with one worker per task), and
  later passes skip it unread;
* :class:`StreamingSteps` gives each task's loader the DataModule's fixed number of batches per
  epoch and saves the LitData loader's position in checkpoints, so a resumed run continues
  mid-epoch where it stopped.
"""

from __future__ import annotations

import json
import logging
import math
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:  # litdata is imported only when an optimized copy is used (it takes ~0.5 s)
    from mtssl_lightning.data.datasets import CropScale
    from mtssl_lightning.data.sources import ImageSource
    from mtssl_lightning.data.streaming_crops import StreamingCrops

log = logging.getLogger(__name__)

#: written at the top of an optimized copy by ``mtssl optimize-data`` (what it holds, what was left out)
MANIFEST = "mtssl-optimized.json"
#: LitData's index file, in each split's folder
INDEX = "index.json"


def is_remote(root: str) -> bool:
    """Whether ``root`` is an object-store URL (``s3://``, ``gs://``, ``azure://`` …) rather than a path."""
    return "://" in root


def is_optimized(root: str | None) -> bool:
    """Whether ``data.image_root`` names an optimized copy (a URL, a folder with ``train/index.json``
    or a split folder with ``index.json``) rather than a folder of image files."""
    if root is None:
        return False
    if is_remote(root):
        return True
    path = Path(root).expanduser()
    return (path / INDEX).is_file() or (path / "train" / INDEX).is_file()


def optimized_splits(root: str, val_root: str | None) -> tuple[str, str]:
    """The training and validation chunk folders of an optimized copy ``root``.

    ``root/train`` and ``root/val`` as ``mtssl optimize-data`` writes them; a split folder given
    directly (with its own ``index.json``) trains from itself and validates on ``val_root``.

    Raises:
        FileNotFoundError: there is no validation split and no ``val_root`` (the message says the fix).
    """
    if not is_remote(root) and (Path(root).expanduser() / INDEX).is_file():
        if val_root is None:
            raise FileNotFoundError(
                f"{root!r} is one split of an optimized copy (it holds {INDEX}) and `data.val_root` is not set: point "
                "`data.image_root` at the folder `mtssl optimize-data` wrote (with train/ and val/), or set `data.val_root`"
            )
        return root, val_root
    base = root.rstrip("/")
    return f"{base}/train", (val_root if val_root is not None else f"{base}/val")


def read_manifest(root: str) -> dict[str, Any] | None:
    """What ``mtssl optimize-data`` recorded about a local optimized copy (``None`` for URLs or other copies)."""
    if is_remote(root):
        return None
    path = Path(root).expanduser() / MANIFEST
    return json.loads(path.read_text()) if path.is_file() else None


class StreamingSteps:
    """A ``StreamingDataLoader`` seen as a loader of exactly ``steps`` batches per epoch, resumable.

    The DataModule gives every task the same number of batches per epoch; the stream goes on
    across epochs (a new LitData epoch, reshuffled, starts when it runs out), so epochs shorter
    than a pass see different images. Lightning saves :meth:`state_dict` in checkpoints (a
    "stateful" loader) and calls :meth:`load_state_dict` on resume.

    Lightning fetches no batch ahead from a loader with a length (its ``_PrefetchDataFetcher``
    prefetches only when the length is unknown), so a checkpoint written mid-epoch holds the
    stream's position right after the last batch trained on, and a resumed run continues there.

    Args:
        loader: the ``litdata.StreamingDataLoader``.
        steps: batches per epoch.
        persistent: keep the stream across epochs (training); ``False`` starts each epoch from the
            beginning of the split and lets its workers go at the end (validation).
        min_batch: batches with fewer samples (a worker's last of a pass) are dropped, their bad
            images still counted: the batch size when training (full batches only), 2 for
            validation (a batch of one has no negatives for the exemplar loss); ``None`` keeps all.
    """

    def __init__(self, loader: Any, steps: int, persistent: bool = True, min_batch: int | None = None) -> None:
        self.loader, self.steps, self.persistent, self.min_batch = loader, steps, persistent, min_batch
        self.known_bad: set[int] = set()  # images found undecodable by this loader's workers so far
        self._carried = 0  # bad images reported by a dropped incomplete batch
        self._iterator: Iterator[Any] | None = None
        self._served = 0  # batches handed out this epoch

    def __len__(self) -> int:
        return self.steps

    def __iter__(self) -> Iterator[Any]:
        if self._served >= self.steps:
            self._served = 0
        if not self.persistent:
            self._iterator, self._served = None, 0
        restarts = 0
        while self._served < self.steps:
            if self._iterator is None:
                self._hand_known_bad()
                self._iterator = iter(self.loader)
            try:
                batch = next(self._iterator)
            except StopIteration:
                self._iterator = None
                restarts += 1
                if restarts > 1:
                    raise RuntimeError(
                        f"the optimized copy {self.loader.dataset.where!r} gave no batch of {self.min_batch or 1} or more images in a "
                        "whole pass: a stream does not wrap around as a folder's crops do, and each worker batches its own share "
                        "of the split. Use a copy with more images, smaller batches or fewer `data.num_workers`"
                    ) from None
                continue
            batch = self._count_bad(batch)
            if self.min_batch is not None and len(batch) < self.min_batch:
                self._carried += getattr(batch, "skipped", 0)  # reported with the next batch
                continue
            if self._carried:
                batch.skipped, self._carried = batch.skipped + self._carried, 0
            restarts = 0
            self._served += 1
            yield batch
        if not self.persistent:
            self._iterator = None  # the workers go

    def _hand_known_bad(self) -> None:
        """Give the workers about to start the images earlier passes found bad: they skip them
        unread and uncounted, as a folder's persistent workers do."""
        bad_files = getattr(getattr(self.loader, "dataset", None), "bad_files", None)
        if bad_files is not None:
            bad_files.bad = set(self.known_bad)

    def _count_bad(self, batch: Any) -> Any:
        """``batch`` with ``skipped`` = the images it reports bad that this loader had not met before."""
        bad = getattr(batch, "bad", None)
        if bad:
            new = set(bad) - self.known_bad
            self.known_bad |= new
            batch.skipped = len(new)
        return batch

    def state_dict(self) -> dict[str, Any]:
        """The stream's position and the batches served this epoch."""
        return {"loader": self.loader.state_dict(), "served": self._served}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.loader.load_state_dict(state["loader"])
        self._served, self._iterator = int(state["served"]), None


def count_items(input_dir: str) -> int:
    """Images in an optimized split: from its local ``index.json``, or (a URL) as LitData counts them."""
    if not is_remote(input_dir):
        index = json.loads((Path(input_dir).expanduser() / INDEX).read_text())
        return sum(int(chunk["chunk_size"]) for chunk in index["chunks"])
    from litdata import StreamingDataset

    dataset = StreamingDataset(input_dir)
    return dataset.get_len(1, 1) * dataset.distributed_env.world_size


class OptimizedImages:
    """The images of one split of an optimized copy, as a DataModule source: a count and a description;
    :meth:`crops` makes the task's :class:`~mtssl_lightning.data.streaming_crops.StreamingCrops`.

    Args:
        input_dir: the split (folder or URL).
        cache_dir: where LitData keeps downloaded chunks (``None``: its default).
    """

    def __init__(self, input_dir: str, cache_dir: str | None = None) -> None:
        if not is_remote(input_dir) and not (Path(input_dir).expanduser() / INDEX).is_file():
            raise FileNotFoundError(
                f"{input_dir!r} is not an optimized split (no {INDEX}); write one with `mtssl optimize-data SRC DST`"
            )
        self.input_dir, self.cache_dir = input_dir, cache_dir
        self.length = count_items(input_dir)

    def __len__(self) -> int:
        return self.length

    def describe(self) -> str:
        return f"{self.length} images of the optimized copy {self.input_dir} (streamed)"

    def crops(self, size: int, length: int, train: bool, min_scale: CropScale, seed: int) -> StreamingCrops:
        """The task's crops; ``length`` (samples per epoch over all ranks) is kept for the loader."""
        from mtssl_lightning.data.streaming_crops import StreamingCrops

        dataset = StreamingCrops(self.input_dir, size, train, min_scale, seed, cache_dir=self.cache_dir)
        dataset.length = length
        return dataset


def open_optimized(image_root: str, val_root: str | None, open_folder: Callable[[str], ImageSource]) -> tuple[OptimizedImages, OptimizedImages | ImageSource]:
    """The training and validation images of the optimized copy ``image_root`` (``data.image_root``);
    a ``val_root`` that is a folder of images is opened with ``open_folder``. Logs what the copy left out.

    Raises:
        ValueError: the optimized validation split holds fewer than 2 images (the message says the fix).
    """
    train_dir, val_dir = optimized_splits(image_root, val_root)
    train, val = OptimizedImages(train_dir), OptimizedImages(val_dir) if is_optimized(val_dir) else open_folder(val_dir)
    if isinstance(val, OptimizedImages) and len(val) < 2:  # a stream does not wrap around as a folder's crops do
        raise ValueError(
            f"the validation split {val_dir!r} of the optimized copy holds {len(val)} image(s); validation batches need at "
            "least 2: write the copy again with a larger `--val-fraction`, or set `data.val_root` to a folder of images"
        )
    manifest = read_manifest(image_root)
    if manifest is not None and manifest["unusable"]:
        log.info(
            "the optimized copy %s left out %d of the %d files of %s as unusable when it was written (listed in its %s)",
            image_root, len(manifest["unusable"]), manifest["listed"], manifest["source"], MANIFEST,
        )
    return train, val


def streaming_loader(
    dataset: StreamingCrops, batch_size: int, train: bool, workers: int, pin_memory: bool, world: int, worker_init_fn: Callable[[int], None]
) -> StreamingSteps:
    """A task's LitData loader of ``dataset``: LitData shards it over nodes, ranks and workers (no
    ``DistributedSampler``); this rank gets its share (of ``world``) of ``dataset.length`` samples per epoch."""
    from litdata import StreamingDataLoader

    loader = StreamingDataLoader(
        dataset,
        batch_size=batch_size,
        num_workers=workers,
        # LitData's drop_last would leave the same last images of a split unseen every pass;
        # StreamingSteps drops the incomplete batches instead
        drop_last=False,
        collate_fn=dataset.collate,  # reports the images the worker could not decode
        pin_memory=pin_memory,
        worker_init_fn=worker_init_fn,
    )
    steps = max(1, math.ceil(dataset.length / world) // batch_size)  # as a DistributedSampler + drop_last
    if not train:  # one pass at most: a stream in order has nothing new after that
        steps = min(steps, max(1, len(loader)))
    return StreamingSteps(loader, steps, persistent=train, min_batch=batch_size if train else 2)
