"""The crops of an optimized copy as a LitData ``StreamingDataset`` (see :mod:`~mtssl_lightning.data.streaming`)."""

from __future__ import annotations

import io
import warnings
from typing import Any

import torch
from litdata import StreamingDataset

from mtssl_lightning.data.batch import ImageBatch
from mtssl_lightning.data.datasets import BadFiles, CropScale, crop_boxes, crop_tensor
from mtssl_lightning.data.sources import crop_file


class StreamingCrops(StreamingDataset):
    """Square crops of the images of an optimized split, as ``(uint8 (3, size, size), image index)``.

    A LitData ``StreamingDataset``: iterate it through a ``litdata.StreamingDataLoader`` (which
    shards it across nodes, ranks and workers). Each item holds one image's original file bytes;
    the worker decodes and crops it like :class:`~mtssl_lightning.data.datasets.CropDataset`.

    Args:
        input_dir: the split (a folder or URL holding ``index.json`` and chunks).
        size: output side in pixels.
        train: random crops and flips from torch's RNG (seeded per worker), chunks shuffled;
            otherwise crops fixed per image (seeded by ``seed`` and the image's index), in order.
        min_scale: smallest crop area as a fraction of the image, or a range (smallest, largest).
        seed: base seed of the fixed crops, and of LitData's shuffle.
        reduce: JPEG DCT scaling when the crop is shrunk ≥ 2× (see :func:`~mtssl_lightning.data.sources.crop_file`).
        cache_dir: where LitData keeps downloaded chunks of a remote copy (``None``: its default).
    """

    def __init__(
        self,
        input_dir: str,
        size: int,
        train: bool = True,
        min_scale: CropScale = 0.2,
        seed: int = 0,
        reduce: bool = True,
        cache_dir: str | None = None,
    ) -> None:
        # drop_last=False: LitData would otherwise leave the same last images unseen every pass;
        # StreamingSteps drops the incomplete batches instead (other images each pass, shuffled)
        with warnings.catch_warnings():
            warnings.filterwarnings("ignore", message=".*disabled the `drop_last` option.*")
            super().__init__(input_dir, cache_dir=cache_dir, shuffle=train, drop_last=False, seed=seed)
        self.size, self.train, self.min_scale, self.seed, self.reduce = size, train, min_scale, seed, reduce
        self.where = input_dir
        # per worker: warned once and skipped from then on; StreamingSteps (main process) counts
        # each once per loader and hands the known ones to the next pass's workers
        self.bad_files = BadFiles("image")
        self._reported: set[int] = set()

    def __getitem__(self, index: Any) -> tuple[torch.Tensor, int] | None:
        """The crop of item ``index``, or ``None`` when its image does not decode (warned and counted once)."""
        item = super().__getitem__(index)
        position = int(item["index"])
        box_of = crop_boxes(self.train, self.min_scale, self.seed, position)
        loaded = self.bad_files.try_load(
            position, lambda _: crop_file(io.BytesIO(item["image"]), self.size, box_of, self.reduce), lambda _: str(item["name"])
        )
        return None if loaded is None else (crop_tensor(loaded[0], self.train), position)

    def __next__(self) -> tuple[torch.Tensor, int]:
        """The next crop of this worker's share; images that do not decode are skipped."""
        while True:
            sample = super().__next__()
            if sample is not None:
                return sample

    def collate(self, samples: list[tuple[torch.Tensor, int]]) -> ImageBatch:
        """:meth:`ImageBatch.collate` plus the images this worker found bad since its last batch
        (``bad``; the loader turns them into ``skipped``); the batch's position is its first
        image's index (validation task inputs are seeded by it)."""
        batch = ImageBatch.collate(samples)
        self.bad_files.take_count()
        batch.bad = tuple(sorted(self.bad_files.bad - self._reported))
        self._reported |= self.bad_files.bad
        batch.position = int(samples[0][1])
        return batch
