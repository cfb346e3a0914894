"""``MultiTaskDataModule``: one named sub-batch per task, decoded and resized on CPU workers."""

from __future__ import annotations

import logging
import math
import os
import signal
from collections.abc import Iterator
from pathlib import Path

import lightning.pytorch as pl
import torch
from lightning.fabric.utilities.seed import pl_worker_init_function
from lightning.pytorch.utilities import CombinedLoader
from torch.utils.data import DataLoader

from mtssl_lightning.data.batch import DataRequest
from mtssl_lightning.data.datasets import CropDataset
from mtssl_lightning.data.sources import ImageCheck, ImageFolder, ImageSource, SampleImages
from mtssl_lightning.data.video import (
    VIDEO_EXTENSIONS,
    ClipDataset,
    FrameFolder,
    SampleVideos,
    VideoFolder,
    VideoSource,
)

log = logging.getLogger(__name__)


#: default clips per validation video (and per training video for the default epoch length)
CLIPS_PER_VIDEO = 8


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


class MultiTaskDataModule(pl.LightningDataModule):
    """Feeds every task of a :class:`~mtssl_lightning.MultiTaskSSL` its own sub-batch.

    Each training batch is ``{task_name: ImageBatch | ClipBatch}``: image tasks get ``uint8
    (B_task, 3, S_task, S_task)`` crops, video tasks ``uint8 (B_task, T, 3, S_task, S_task)``
    clips (and precomputed masks when the source has them), made by CPU workers; the tasks then
    build their inputs on the device (in ``MultiTaskSSL.on_after_batch_transfer``). What each
    task needs (source, batch size, crop size, clip length) comes from the model's tasks
    (``requests``), so it is configured once, on the task.

    Args:
        image_root: folder of images (recursive, any layout, ImageNet's included); ``None``
            uses the bundled sample photos (scikit-image + scikit-learn, no download).
        val_root: separate validation folder; ``None`` splits ``val_fraction`` of
            ``image_root`` off deterministically (the sample photos have a fixed split).
        val_fraction: share of ``image_root`` held out when ``val_root`` is not given.
        video_root: folder of videos (files PyAV can decode: .mp4 .avi .mov .mkv .webm .m4v) or
            of frame folders (optionally with precomputed masks, see
            :class:`~mtssl_lightning.data.video.FrameFolder`), for video tasks; ``None`` uses the
            sample street-scene clip when ``image_root`` is also ``None``.
        video_val_root: separate validation videos; ``None`` holds out the last
            ``video_val_fraction`` of every video's frames (a split in time).
        video_val_fraction: share of each video's frames held out when ``video_val_root`` is not given.
        image_check: how image folders are screened before training (main process, every
            file): ``header`` (default: opens each file's header — catches empty files,
            non-images, unknown formats), ``decode`` (decodes every image — also catches
            truncated or corrupt pixel data; slow on large folders) or ``none``. Files that pass
            and still fail to decode are skipped by the workers (a warning each, counted in
            ``train/skipped_files``). Videos are always probed (frame counts are needed).
        steps_per_epoch: training batches per epoch (every task gets that many); ``None`` =
            one pass over the training images at the largest task batch size.
        val_samples: validation crops (or clips) per task (fixed crops of the validation images,
            the same every epoch); ``None`` = one per validation image, and 8 clips per
            validation video.
        min_scale: smallest random-crop area as a fraction of the image.
        num_workers: DataLoader worker processes per task loader.
        pin_memory: pin host memory; ``None`` = only when CUDA is available.
        seed: seed of the fixed validation crops.
        requests: ``{task: DataRequest}``; ``None`` = ask the attached model's tasks.
    """

    def __init__(
        self,
        image_root: str | None = None,
        val_root: str | None = None,
        val_fraction: float = 0.02,
        video_root: str | None = None,
        video_val_root: str | None = None,
        video_val_fraction: float = 0.2,
        image_check: ImageCheck = "header",
        steps_per_epoch: int | None = None,
        val_samples: int | None = None,
        min_scale: float = 0.2,
        num_workers: int = 2,
        pin_memory: bool | None = None,
        seed: int = 0,
        requests: dict[str, DataRequest] | None = None,
    ) -> None:
        super().__init__()
        if num_workers < 0:
            raise ValueError(f"`num_workers` must be >= 0, got {num_workers}")
        if steps_per_epoch is not None and steps_per_epoch < 1:
            raise ValueError(f"`steps_per_epoch` must be >= 1, got {steps_per_epoch}")
        if not 0.0 < video_val_fraction < 1.0:
            raise ValueError(f"`video_val_fraction` must be in (0, 1), got {video_val_fraction}")
        if image_check not in ("header", "decode", "none"):
            raise ValueError(f"`image_check` must be 'header', 'decode' or 'none', got {image_check!r}")
        self.image_check = image_check
        self.image_root, self.val_root, self.val_fraction = image_root, val_root, val_fraction
        self.video_root, self.video_val_root, self.video_val_fraction = video_root, video_val_root, video_val_fraction
        self.steps_per_epoch, self.val_samples = steps_per_epoch, val_samples
        self.min_scale, self.num_workers, self.pin_memory, self.seed = min_scale, num_workers, pin_memory, seed
        self._requests = requests
        self.train_images: ImageSource | None = None
        self.val_images: ImageSource | None = None
        self.train_videos: VideoSource | None = None
        self.val_videos: VideoSource | None = None

    # ------------------------------------------------------------------ set-up
    @property
    def requests(self) -> dict[str, DataRequest]:
        """What each task needs, from the constructor or from the attached model's tasks."""
        return self._requests_for(training=False)

    def _requests_for(self, training: bool) -> dict[str, DataRequest]:
        """All tasks' requests, or (``training``) those of the tasks this rank trains."""
        if self._requests is not None:
            return self._requests
        model = getattr(self.trainer, "lightning_module", None) if self.trainer is not None else None
        if model is None or not hasattr(model, "data_requests"):
            raise RuntimeError(
                "MultiTaskDataModule does not know the tasks: attach it to a Trainer with a "
                "MultiTaskSSL model, or pass `requests={name: DataRequest(...)}`"
            )
        return model.data_requests(training=training)

    def setup(self, stage: str | None = None) -> None:
        """Open the sources the tasks need (images and/or videos); unusable videos are reported here."""
        if self.train_images is not None or self.train_videos is not None:
            return
        requests = self.requests
        if any(r.source == "images" for r in requests.values()):
            self._setup_images()
        video_tasks = [name for name, request in requests.items() if request.source == "videos"]
        if video_tasks:
            self._setup_videos(video_tasks)

    def _setup_images(self) -> None:
        if self.image_root is None:
            self.train_images, self.val_images = SampleImages("train"), SampleImages("val")
        elif self.val_root is not None:
            # screened before any worker starts: unusable files are warned about and counted here
            self.train_images = ImageFolder(self.image_root).check(self.image_check)
            self.val_images = ImageFolder(self.val_root).check(self.image_check)
        else:
            # the split hashes names, so screening first never moves a good image between the splits
            self.train_images, self.val_images = ImageFolder(self.image_root).check(self.image_check).split(self.val_fraction)
        log.info("training on %s; validating on %s", self.train_images.describe(), self.val_images.describe())

    def _setup_videos(self, video_tasks: list[str]) -> None:
        if self.video_root is None:
            if self.image_root is not None:
                raise ValueError(
                    f"task(s) {video_tasks} need videos, but `data.video_root` is not set: point it to a folder "
                    "of videos or of frame folders (only the sample data pairs photos with the sample video)"
                )
            self.train_videos, self.val_videos = SampleVideos("train"), SampleVideos("val")
        elif self.video_val_root is not None:
            self.train_videos, self.val_videos = open_video_source(self.video_root), open_video_source(self.video_val_root)
        else:
            split = 1.0 - self.video_val_fraction
            self.train_videos = open_video_source(self.video_root, (0.0, split))
            self.val_videos = open_video_source(self.video_root, (split, 1.0))
        log.info("video tasks %s train on %s; validate on %s", video_tasks, self.train_videos.describe(), self.val_videos.describe())

    # ------------------------------------------------------------ dataloaders
    def _source(self, request: DataRequest, train: bool) -> ImageSource | VideoSource:
        """The training or validation images or videos a task reads."""
        if request.source == "videos":
            source = self.train_videos if train else self.val_videos
        else:
            source = self.train_images if train else self.val_images
        assert source is not None, "call setup() first"
        return source

    @staticmethod
    def _samples_in(source: ImageSource | VideoSource) -> int:
        """Default samples per pass: one crop per image, :data:`CLIPS_PER_VIDEO` clips per video."""
        return len(source) * (CLIPS_PER_VIDEO if isinstance(source, VideoSource) else 1)

    def _dataset(self, request: DataRequest, length: int | None, train: bool) -> CropDataset | ClipDataset:
        """Crops of the images, or clips of the videos, for one task (``length`` ``None`` = :meth:`_samples_in`).

        A validation set whose last batch would hold a single sample loses that sample: a batch
        of one has no negatives for the exemplar loss (training batches are always full).
        """
        source = self._source(request, train)
        if length is None:
            length = self._samples_in(source)
        if not train and length > 1 and length % request.batch_size == 1:
            length -= 1
        if isinstance(source, VideoSource):
            return ClipDataset(
                source, request.image_size, request.clip_length, request.frame_stride, length, train, self.min_scale, self.seed
            )
        return CropDataset(source, request.image_size, length, train, self.min_scale, self.seed)

    def _loader(self, dataset: CropDataset | ClipDataset, batch_size: int, train: bool) -> DataLoader:
        return DataLoader(
            dataset,
            batch_size=batch_size,
            shuffle=train,
            drop_last=train,
            num_workers=self.num_workers,
            persistent_workers=self.num_workers > 0,
            pin_memory=torch.cuda.is_available() if self.pin_memory is None else self.pin_memory,
            collate_fn=dataset.collate,  # counts the files the worker had to skip
            worker_init_fn=init_worker,
        )

    def train_dataloader(self) -> CombinedLoader:
        """``{task: loader}`` of every task; under a task-parallel strategy the tasks this rank
        does not train get an :class:`IdleLoader` (no data read; same number of batches), because
        Lightning checks the loaders' lengths with one collective per loader on every rank."""
        requests = self.requests
        active = self._requests_for(training=True)
        # default epoch: one pass over the training images (or 8 clips per training video)
        first = self.train_images if self.train_images is not None else self.train_videos
        assert first is not None, "call setup() first"
        items = self._samples_in(first)
        steps = self.steps_per_epoch or max(1, items // max(r.batch_size for r in requests.values()))
        world = self.trainer.world_size if self.trainer is not None else 1
        loaders: dict[str, object] = {}
        for name, r in requests.items():
            if name in active:
                loaders[name] = self._loader(self._dataset(r, steps * r.batch_size, train=True), r.batch_size, train=True)
            else:
                # what a DistributedSampler (padded to ceil(N / world)) + drop_last gives the others
                loaders[name] = IdleLoader(math.ceil(steps * r.batch_size / world) // r.batch_size)
        # all loaders have exactly `steps` batches, so "max_size_cycle" never cycles
        return CombinedLoader(loaders, mode="max_size_cycle")

    def val_dataloader(self) -> CombinedLoader:
        loaders = {
            name: self._loader(self._dataset(r, self.val_samples, train=False), r.batch_size, train=False)
            for name, r in self.requests.items()
        }
        # tasks with larger batches run out first: "max_size" gives them None afterwards
        return CombinedLoader(loaders, mode="max_size")

    def test_dataloader(self) -> CombinedLoader:
        """The validation crops (the sample data and image folders have no separate test split)."""
        return self.val_dataloader()

    def predict_dataloader(self) -> CombinedLoader:
        """The validation crops, for ``mtssl predict``; one task after the other (Lightning's
        prediction loop only takes "sequential"), in the order of ``requests``."""
        loaders = self.val_dataloader().iterables
        return CombinedLoader(loaders, mode="sequential")
