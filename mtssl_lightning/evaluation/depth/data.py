"""NYU depth frames as aligned tensors: samples, batches, the Dataset and the DataModule.

Frames come from a :class:`~mtssl_lightning.evaluation.depth.sources.DepthSource`. A depth of 0
(or non-finite) is invalid and masked out of the loss and the metrics. The validation loop runs
on the **test split** (NYU has no official validation split; do not select models on it if you
report its numbers).
"""

from __future__ import annotations

import logging
import warnings
from dataclasses import dataclass

import lightning.pytorch as pl
import numpy as np
import torch
import torch.nn.functional as F
from torch import Tensor
from torch.utils.data import DataLoader, Dataset

from mtssl_lightning.data.batch import pin_batch
from mtssl_lightning.data.loading import init_worker
from mtssl_lightning.evaluation.depth.sources import DepthSource, open_depth_sources

log = logging.getLogger(__name__)

#: Eigen et al.'s evaluation crop of a 480×640 NYU frame (rows 45:471, columns 41:601)
EIGEN_CROP = (45, 471, 41, 601)
EIGEN_FRAME = (480, 640)


@dataclass
class DepthSample:
    """One frame after cropping/resizing (what a worker returns).

    Attributes:
        image: ``(3, H, W)`` float32 RGB in [0, 1].
        depth: ``(1, h, w)`` float32 metres, 0 where invalid (``(h, w)`` = ``(H, W)``, or the
            frame's original size for full-resolution evaluation).
        valid: ``(1, h, w)`` bool.
        index: the frame's index in its source.
    """

    image: Tensor
    depth: Tensor
    valid: Tensor
    index: int


@dataclass
class DepthBatch:
    """A batch of NYU frames.

    Attributes:
        images: ``(B, 3, H, W)`` float32 RGB in [0, 1].
        depth: ``(B, 1, h, w)`` float32 ground-truth depth in metres (0 where invalid).
        valid: ``(B, 1, h, w)`` bool, the pixels that count in losses and metrics.
        index: ``(B,)`` int64 frame index in the source (for tracing samples).
    """

    images: Tensor
    depth: Tensor
    valid: Tensor
    index: Tensor

    @staticmethod
    def collate(samples: list[DepthSample]) -> DepthBatch:
        """Stack samples; a clear error when evaluation frames of different sizes meet in one batch."""
        sizes = {tuple(s.depth.shape[-2:]) for s in samples}
        if len(sizes) > 1:
            raise ValueError(
                f"depth maps of different sizes {sorted(sizes)} in one batch: full-resolution evaluation needs "
                "frames of one size; set `data.eval_full_resolution: false` to evaluate at `data.image_size`"
            )
        return DepthBatch(
            images=torch.stack([s.image for s in samples]),
            depth=torch.stack([s.depth for s in samples]),
            valid=torch.stack([s.valid for s in samples]),
            index=torch.tensor([s.index for s in samples], dtype=torch.int64),
        )

    def __len__(self) -> int:
        return self.images.shape[0]

    def pin_memory(self) -> DepthBatch:
        """The batch in pinned host memory (``DataLoader(pin_memory=True)`` calls it)."""
        return pin_batch(self)


def eigen_mask(height: int, width: int) -> Tensor:
    """``(height, width)`` bool: Eigen et al.'s crop of a 480×640 frame, scaled to this size."""
    top, bottom, left, right = EIGEN_CROP
    sy, sx = height / EIGEN_FRAME[0], width / EIGEN_FRAME[1]
    mask = torch.zeros(height, width, dtype=torch.bool)
    mask[round(top * sy) : round(bottom * sy), round(left * sx) : round(right * sx)] = True
    return mask


class NYUDepthDataset(Dataset):
    """Frames of a :class:`DepthSource` as :class:`DepthSample`, image and depth kept aligned.

    Training: resize the frame to ``image_size`` (image bilinear with antialiasing, depth
    nearest so invalid zeros are never averaged into valid depths), random ``crop_size`` crop,
    random horizontal flip (torch's RNG, seeded per worker by Lightning). Evaluation: the whole
    frame resized to ``image_size``; the depth at the frame's own size when
    ``full_resolution`` (predictions are upsampled to it, the usual protocol), else resized like
    the image; ``eigen_crop`` marks pixels outside Eigen's crop invalid.

    A frame that fails to load is replaced by an all-invalid frame (a warning names the file;
    ``bad`` counts them per process), so it adds nothing to losses or metrics and never crashes a run.
    """

    def __init__(
        self,
        source: DepthSource,
        image_size: tuple[int, int],
        crop_size: tuple[int, int] | None = None,
        train: bool = False,
        flip: bool = True,
        full_resolution: bool = True,
        eigen_crop: bool = False,
    ) -> None:
        if len(source) == 0:
            raise ValueError(f"no frames in {source.describe()}")
        self.source, self.image_size, self.train, self.flip = source, tuple(image_size), train, flip
        self.crop_size = tuple(crop_size) if crop_size is not None else None
        if self.crop_size is not None and (self.crop_size[0] > self.image_size[0] or self.crop_size[1] > self.image_size[1]):
            raise ValueError(f"`crop_size` {list(self.crop_size)} is larger than `image_size` {list(self.image_size)}")
        self.full_resolution, self.eigen_crop = full_resolution, eigen_crop
        self.frame = source.frame_size()
        self.bad: set[int] = set()

    def __len__(self) -> int:
        return len(self.source)

    def _load(self, i: int) -> tuple[np.ndarray, np.ndarray]:
        try:
            return self.source.load(i)
        except Exception as err:  # noqa: BLE001 - a corrupt file is skipped, never fatal
            self.bad.add(i)
            warnings.warn(
                f"unreadable NYU frame {self.source.names[i]!r} ({type(err).__name__}: {err}); it counts as all-invalid "
                f"({len(self.bad)} bad frame(s) in this process so far)",
                stacklevel=2,
            )
            h, w = self.frame
            return np.zeros((h, w, 3), np.uint8), np.zeros((h, w), np.float32)

    def __getitem__(self, index: int) -> DepthSample:
        rgb, depth_np = self._load(index)
        image = torch.from_numpy(rgb).permute(2, 0, 1).float().div_(255.0)[None]  # (1, 3, H0, W0)
        depth = torch.from_numpy(depth_np).float()[None, None]  # (1, 1, H0, W0)
        depth = torch.where(torch.isfinite(depth) & (depth > 0), depth, torch.zeros_like(depth))
        if self.eigen_crop and not self.train:
            depth = depth * eigen_mask(*depth.shape[-2:])
        if tuple(image.shape[-2:]) != self.image_size:
            image = F.interpolate(image, size=self.image_size, mode="bilinear", align_corners=False, antialias=True).clamp_(0, 1)
            if self.train or not self.full_resolution:
                depth = F.interpolate(depth, size=self.image_size, mode="nearest-exact")
        if self.train:
            if self.crop_size is not None:
                (h, w), (ch, cw) = self.image_size, self.crop_size
                y0 = int(torch.randint(h - ch + 1, ()))
                x0 = int(torch.randint(w - cw + 1, ()))
                image, depth = image[..., y0 : y0 + ch, x0 : x0 + cw], depth[..., y0 : y0 + ch, x0 : x0 + cw]
            if self.flip and bool(torch.rand(()) < 0.5):
                image, depth = image.flip(-1), depth.flip(-1)
        image, depth = image[0].contiguous(), depth[0].contiguous()
        return DepthSample(image=image, depth=depth, valid=depth > 0, index=index)


class NYUDepthDataModule(pl.LightningDataModule):
    """NYU depth v2 train / test frames as :class:`DepthBatch` (layouts: see :mod:`~.sources`).

    Args:
        root: ``nyu_depth_v2_labeled.mat``, or a folder with ``train/`` + ``test/`` sub-folders
            (``<name>.png|jpg`` + ``<name>_depth.png``) or ``nyu2_train.csv`` + ``nyu2_test.csv``.
        split_file: the official ``splits.mat`` (labelled file only); ``None``: ``splits.mat``
            beside the labelled file when it exists, else the contiguous fraction split.
        test_fraction: share of the frames in the test split of the fraction split.
        image_size: ``[H, W]`` every frame is resized to (default 240×320, half of NYU's 480×640,
            as in Laina et al.).
        crop_size: ``[H, W]`` random training crop of the resized frame (default 228×304, Laina et
            al.'s input); ``None``: no crop. Evaluation always sees the whole resized frame.
        flip: random horizontal flips in training.
        eval_full_resolution: evaluate against the depth at the frame's original size
            (predictions upsampled bilinearly); otherwise against depth resized to ``image_size``.
        eigen_crop: evaluate only inside Eigen et al.'s crop (rows 45–470, columns 41–600 of a 480×640 frame).
        png_depth_scale: metres per unit of 16-bit depth PNGs (0.001 = millimetres).
        png_depth_scale_8bit: metres per unit of 8-bit depth PNGs (10/255 = DenseDepth's training export).
        batch_size: training frames per step.
        eval_batch_size: frames per validation/test batch (``None``: ``batch_size``).
        num_workers: DataLoader worker processes (decoding and resizing happen there).
        pin_memory: pin host memory; ``None`` = only when CUDA is available.
    """

    def __init__(
        self,
        root: str = "data/nyu_depth_v2_labeled.mat",
        split_file: str | None = None,
        test_fraction: float = 0.45,
        image_size: tuple[int, int] = (240, 320),
        crop_size: tuple[int, int] | None = (228, 304),
        flip: bool = True,
        eval_full_resolution: bool = True,
        eigen_crop: bool = False,
        png_depth_scale: float = 0.001,
        png_depth_scale_8bit: float = 10 / 255,
        batch_size: int = 16,
        eval_batch_size: int | None = None,
        num_workers: int = 4,
        pin_memory: bool | None = None,
    ) -> None:
        super().__init__()
        if batch_size < 1 or (eval_batch_size is not None and eval_batch_size < 1):
            raise ValueError(f"batch sizes must be >= 1, got {batch_size} / {eval_batch_size}")
        if len(image_size) != 2 or min(image_size) < 1:
            raise ValueError(f"`image_size` must be [H, W] with positive sides, got {image_size}")
        if crop_size is not None and (len(crop_size) != 2 or min(crop_size) < 1):
            raise ValueError(f"`crop_size` must be [H, W] with positive sides or null, got {crop_size}")
        self.root, self.split_file, self.test_fraction = root, split_file, test_fraction
        self.image_size = (int(image_size[0]), int(image_size[1]))
        self.crop_size = None if crop_size is None else (int(crop_size[0]), int(crop_size[1]))
        self.flip, self.eval_full_resolution, self.eigen_crop = flip, eval_full_resolution, eigen_crop
        self.png_depth_scale, self.png_depth_scale_8bit = png_depth_scale, png_depth_scale_8bit
        self.batch_size = batch_size
        self.eval_batch_size = eval_batch_size or batch_size
        self.num_workers, self.pin_memory = num_workers, pin_memory
        self.train_set: NYUDepthDataset | None = None
        self.test_set: NYUDepthDataset | None = None

    def setup(self, stage: str | None = None) -> None:
        if self.test_set is not None:
            return
        train, test = open_depth_sources(
            self.root, self.split_file, self.test_fraction, self.png_depth_scale, self.png_depth_scale_8bit
        )
        self.train_set = NYUDepthDataset(train, self.image_size, self.crop_size, train=True, flip=self.flip)
        self.test_set = NYUDepthDataset(
            test, self.image_size, train=False, full_resolution=self.eval_full_resolution, eigen_crop=self.eigen_crop
        )
        log.info("NYU depth: train %s; test %s", train.describe(), test.describe())

    def _loader(self, dataset: NYUDepthDataset | None, train: bool) -> DataLoader:
        assert dataset is not None, "call setup() first"
        batch = self.batch_size if train else self.eval_batch_size
        return DataLoader(
            dataset,
            batch_size=batch,
            shuffle=train,
            drop_last=train and len(dataset) >= batch,  # a tiny training set still gives one batch
            num_workers=self.num_workers,
            persistent_workers=self.num_workers > 0,
            pin_memory=torch.cuda.is_available() if self.pin_memory is None else self.pin_memory,
            collate_fn=DepthBatch.collate,
            worker_init_fn=init_worker,  # workers ignore SIGTERM: the pre-emption checkpoint is saved first
        )

    def train_dataloader(self) -> DataLoader:
        return self._loader(self.train_set, train=True)

    def val_dataloader(self) -> DataLoader:
        """The test split (NYU has no official validation split)."""
        return self._loader(self.test_set, train=False)

    def test_dataloader(self) -> DataLoader:
        return self._loader(self.test_set, train=False)

    def predict_dataloader(self) -> DataLoader:
        return self._loader(self.test_set, train=False)
