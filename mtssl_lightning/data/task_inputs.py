"""Each task's inputs and targets, built on the device from the loaders' raw batches by the tasks'
samplers, with the task randomness (patch positions, views …) seeded per batch."""

from __future__ import annotations

from collections.abc import Mapping

import torch

from mtssl_lightning.data.batch import ClipBatch, ImageBatch, TaskBatch
from mtssl_lightning.data.device_decode import EncodedImageBatch
from mtssl_lightning.data.loading import task_seed
from mtssl_lightning.data.sampler import TaskSampler

#: what the loaders deliver for one task, and what its sampler makes of it on the device
RawBatch = ImageBatch | ClipBatch | EncodedImageBatch
TaskBatches = dict[str, TaskBatch | None]


class TaskInputs:
    """Builds task batches on the device for a DataModule: one generator per device, reseeded per
    batch; counts the training batches built (saved in checkpoints, so a resumed run draws the
    same task inputs)."""

    def __init__(self) -> None:
        self.train_batches = 0  # training batches built (seeds the next one's task randomness)
        self._generators: dict[torch.device, torch.Generator] = {}

    def generator(self, device: torch.device, seed: int) -> torch.Generator:
        """The generator on ``device``, reseeded (a host-side call: nothing waits)."""
        generator = self._generators.get(device)
        if generator is None:
            generator = self._generators[device] = torch.Generator(device=device)
        return generator.manual_seed(seed)

    def build(
        self, samplers: Mapping[str, TaskSampler], batch: dict[str, RawBatch | None], training: bool, rank: int, run_seed: int, val_seed: int
    ) -> TaskBatches:
        """Each task's inputs and targets from the loaders' ``{task: raw batch}``, on the batch's device.

        All task randomness comes from one generator on that device, seeded per batch: training
        batches from ``run_seed``, ``rank`` and the number of training batches built so far;
        evaluation batches (``training=False``) from ``val_seed``, ``rank`` and the batch's
        position in the validation set. Tasks whose loader is exhausted (``None``) stay ``None``.
        Never runs under autocast (the inputs are built in float32).

        Raises:
            RuntimeError: called under autocast.
        """
        present = [(name, raw) for name, raw in batch.items() if raw is not None]
        if not present:
            return dict.fromkeys(batch)
        name, first = present[0]
        device = first.images.device if isinstance(first, ImageBatch) else first.clips.device
        if torch.is_autocast_enabled(device.type):
            raise RuntimeError("task inputs must not be built under autocast (float32 targets and inputs)")
        if training:
            seed = task_seed(run_seed, rank, self.train_batches)
            self.train_batches += 1
        else:
            seed = task_seed(val_seed, rank, max(first.position, 0) // samplers[name].batch_size)
        generator = self.generator(device, seed)
        # in task order (the samplers'), so that the random streams do not depend on the loaders' order
        return {
            task: None if batch.get(task) is None else sampler.prepare(batch[task], generator)
            for task, sampler in samplers.items()
            if task in batch
        }
