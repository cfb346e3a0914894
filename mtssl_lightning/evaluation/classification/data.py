"""Labelled images for classification transfer: the batch type and the DataModule (transforms, loaders).

The images come from :mod:`~mtssl_lightning.evaluation.classification.datasets`.
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Literal

import lightning.pytorch as pl
import torch
from PIL import Image
from torch import Tensor
from torch.utils.data import DataLoader, Dataset
from torchvision.transforms import v2 as T

from mtssl_lightning.data.batch import pin_batch
from mtssl_lightning.data.loading import init_worker
from mtssl_lightning.evaluation.classification.datasets import (
    DIGITS_SPLIT_SEED,
    DIGITS_VAL_FRACTION,
    TORCHVISION_SETS,
    GreyArrayDataset,
    LabelledImageFolder,
    PILDatasetAdapter,
    digits_split,
    open_torchvision_dataset,
    scan_class_folders,
)

log = logging.getLogger(__name__)

DatasetName = Literal["folder", "cifar10", "cifar100", "stl10", "digits"]
Augment = Literal["auto", "crop_flip", "crop", "none"]

#: ImageNet-style evaluation: resize the shorter side to size / 0.875 (256 for 224), centre crop
CENTRE_CROP_FRACTION = 0.875


@dataclass
class LabelledBatch:
    """A batch of labelled images.

    Attributes:
        images: ``(B, 3, H, W)`` float32 RGB in ``[0, 1]``.
        labels: ``(B,)`` int64 class indices.
    """

    images: Tensor
    labels: Tensor

    @staticmethod
    def collate(samples: Sequence[tuple[Tensor, int]]) -> LabelledBatch:
        """Stack ``(image (3, H, W) uint8 or float in [0, 1], label)`` samples into one batch."""
        images = torch.stack([s[0] for s in samples])
        if images.dtype == torch.uint8:
            images = images.to(torch.float32).div_(255.0)
        return LabelledBatch(images=images, labels=torch.tensor([int(s[1]) for s in samples], dtype=torch.int64))

    def __len__(self) -> int:
        return self.labels.shape[0]

    def pin_memory(self) -> LabelledBatch:
        """Called by ``DataLoader(pin_memory=True)`` (a dataclass is not pinned otherwise)."""
        return pin_batch(self)


class ClassificationDataModule(pl.LightningDataModule):
    """Labelled images for classification transfer, as :class:`LabelledBatch` batches.

    Args:
        dataset: ``"folder"`` (``train_root``/``val_root`` class-folder trees), ``"cifar10"``,
            ``"cifar100"``, ``"stl10"`` (torchvision's files under ``root``, never downloaded)
            or ``"digits"`` (scikit-learn's bundled 8×8 digits, a fixed stratified 2/3–1/3
            train/val split, see :func:`digits_split`).
        train_root: ``folder``: ``<train_root>/<class>/**/<image>``; classes are the sorted
            subfolder names.
        val_root: ``folder``: the same layout; its classes must be among the training ones.
        test_root: ``folder``: data for ``mtssl test``; ``None`` uses ``val_root``.
        root: ``cifar10``/``cifar100``/``stl10``: the folder holding ``cifar-10-batches-py/``,
            ``cifar-100-python/`` or ``stl10_binary/``. Validation and test both use the
            official test split (these sets have no separate validation split).
        image_size: side of the square images the model sees.
        val_resize: validation/test: shorter side resized to this, then a centre crop of
            ``image_size``. ``None``: ``image_size / 0.875`` (256 for 224, the ImageNet habit)
            for ``folder``/``stl10``; ``image_size`` (the whole image) for CIFAR and digits.
        augment: training augmentation: ``"crop_flip"`` (random resized crop + horizontal
            flip), ``"crop"``, ``"none"`` (the validation transform) or ``"auto"``:
            ``crop_flip``, except ``none`` for digits (a flipped digit is another symbol).
        min_scale: smallest area fraction of the random resized crop (0.08: Inception's).
        batch_size: training batch size; ``val_batch_size`` (default: the same) for val/test.
        num_workers: DataLoader worker processes.
        pin_memory: pin batches (helps CUDA transfers).
        verify_checksums: torchvision sets: check the files' MD5 sums.
        digits_val_fraction: digits: share held out for validation (and test).
        seed: digits: seed of the split.

    An unreadable image file is skipped with a warning (once per worker): its place is taken by
    the next readable file, with that file's label.
    """

    def __init__(
        self,
        dataset: DatasetName = "folder",
        train_root: str | None = None,
        val_root: str | None = None,
        test_root: str | None = None,
        root: str | None = None,
        image_size: int = 224,
        val_resize: int | None = None,
        augment: Augment = "auto",
        min_scale: float = 0.08,
        batch_size: int = 256,
        val_batch_size: int | None = None,
        num_workers: int = 8,
        pin_memory: bool = True,
        verify_checksums: bool = True,
        digits_val_fraction: float = DIGITS_VAL_FRACTION,
        seed: int = DIGITS_SPLIT_SEED,
    ) -> None:
        super().__init__()
        if dataset not in ("folder", "cifar10", "cifar100", "stl10", "digits"):
            raise ValueError(f"`data.dataset` must be one of folder, cifar10, cifar100, stl10, digits; got {dataset!r}")
        if dataset == "folder" and (train_root is None or val_root is None):
            raise ValueError(
                "`data.dataset: folder` needs `data.train_root` and `data.val_root` (class-folder trees such as "
                "ImageNet's train/ and val/); or choose dataset cifar10, cifar100, stl10 or digits"
            )
        if dataset in TORCHVISION_SETS and root is None:
            raise ValueError(
                f"`data.dataset: {dataset}` needs `data.root`: the folder that holds "
                f"{TORCHVISION_SETS[dataset].folder}/ ({TORCHVISION_SETS[dataset].get})"
            )
        if augment not in ("auto", "crop_flip", "crop", "none"):
            raise ValueError(f"`data.augment` must be auto, crop_flip, crop or none; got {augment!r}")
        if image_size < 1 or batch_size < 1 or num_workers < 0:
            raise ValueError("`data.image_size` and `data.batch_size` must be positive, `data.num_workers` >= 0")
        if not 0.0 < min_scale <= 1.0:
            raise ValueError(f"`data.min_scale` must be in (0, 1], got {min_scale}")
        self.dataset = dataset
        self.train_root, self.val_root, self.test_root, self.root = train_root, val_root, test_root, root
        self.image_size, self.min_scale = image_size, min_scale
        if val_resize is None:
            val_resize = round(image_size / CENTRE_CROP_FRACTION) if dataset in ("folder", "stl10") else image_size
        if val_resize < image_size:
            raise ValueError(f"`data.val_resize` ({val_resize}) must be >= `data.image_size` ({image_size})")
        self.val_resize = val_resize
        self.augment: Augment = ("none" if dataset == "digits" else "crop_flip") if augment == "auto" else augment
        self.batch_size, self.val_batch_size = batch_size, val_batch_size or batch_size
        self.num_workers, self.pin_memory = num_workers, pin_memory
        self.verify_checksums = verify_checksums
        self.digits_val_fraction, self.seed = digits_val_fraction, seed
        self.classes: list[str] | None = None
        self.train_set: Dataset | None = None
        self.train_eval_set: Dataset | None = None
        self.val_set: Dataset | None = None
        self.test_set: Dataset | None = None

    # ----------------------------------------------------------------- transforms
    def val_transform(self) -> Callable[[Image.Image], Tensor]:
        """PIL RGB -> ``(3, S, S)`` uint8: shorter side to ``val_resize``, centre crop ``image_size``."""
        return T.Compose([T.Resize(self.val_resize, antialias=True), T.CenterCrop(self.image_size), T.PILToTensor()])

    def train_transform(self) -> Callable[[Image.Image], Tensor]:
        """PIL RGB -> ``(3, S, S)`` uint8 with the configured augmentation."""
        if self.augment == "none":
            return self.val_transform()
        steps: list[Callable] = [T.RandomResizedCrop(self.image_size, scale=(self.min_scale, 1.0), antialias=True)]
        if self.augment == "crop_flip":
            steps.append(T.RandomHorizontalFlip())
        return T.Compose([*steps, T.PILToTensor()])

    # ---------------------------------------------------------------------- setup
    @property
    def num_classes(self) -> int:
        """Number of classes (for ``folder``, scans ``train_root``'s class folders)."""
        if self.dataset in TORCHVISION_SETS:
            return TORCHVISION_SETS[self.dataset].num_classes
        if self.dataset == "digits":
            return 10
        self.setup("fit")
        assert self.classes is not None
        return len(self.classes)

    def setup(self, stage: str | None = None) -> None:
        """Build the datasets (once; cheap to call again)."""
        if self.train_set is not None:
            return
        train_tf, val_tf = self.train_transform(), self.val_transform()
        if self.dataset == "folder":
            assert self.train_root is not None and self.val_root is not None
            classes, train = scan_class_folders(self.train_root, "data.train_root")
            _, val = scan_class_folders(self.val_root, "data.val_root", classes)
            if not val:
                raise FileNotFoundError(f"`data.val_root` = {self.val_root!r} holds no images in its class folders")
            test_root = self.test_root or self.val_root
            test = val if test_root == self.val_root else scan_class_folders(test_root, "data.test_root", classes)[1]
            train_root, val_root = Path(self.train_root).expanduser(), Path(self.val_root).expanduser()
            self.train_set = LabelledImageFolder(train_root, train, classes, train_tf)
            self.train_eval_set = LabelledImageFolder(train_root, train, classes, val_tf)
            self.val_set = LabelledImageFolder(val_root, val, classes, val_tf)
            self.test_set = LabelledImageFolder(Path(test_root).expanduser(), test, classes, val_tf)
        elif self.dataset == "digits":
            classes = [str(d) for d in range(10)]
            tr_x, tr_y, va_x, va_y = digits_split(self.digits_val_fraction, self.seed)
            self.train_set = GreyArrayDataset(tr_x, tr_y, train_tf, classes)
            self.train_eval_set = GreyArrayDataset(tr_x, tr_y, val_tf, classes)
            self.val_set = self.test_set = GreyArrayDataset(va_x, va_y, val_tf, classes)
        else:
            assert self.root is not None
            train_ds = open_torchvision_dataset(self.dataset, self.root, True, self.verify_checksums)
            test_ds = open_torchvision_dataset(self.dataset, self.root, False, self.verify_checksums)
            classes = list(getattr(train_ds, "classes", [str(i) for i in range(self.num_classes)]))
            self.train_set = PILDatasetAdapter(train_ds, train_tf, classes)
            self.train_eval_set = PILDatasetAdapter(train_ds, val_tf, classes)
            self.val_set = self.test_set = PILDatasetAdapter(test_ds, val_tf, classes)
        self.classes = classes
        log.info(
            "%s: %d classes, %d train / %d val images",
            self.dataset,
            len(classes),
            len(self.train_set),
            len(self.val_set),  # type: ignore[arg-type]
        )

    # ---------------------------------------------------------------------- loaders
    def _loader(self, dataset: Dataset | None, batch_size: int, shuffle: bool) -> DataLoader:
        assert dataset is not None, "setup() builds the datasets"
        return DataLoader(
            dataset,
            batch_size=batch_size,
            shuffle=shuffle,
            num_workers=self.num_workers,
            pin_memory=self.pin_memory and torch.cuda.is_available(),
            persistent_workers=self.num_workers > 0,
            collate_fn=LabelledBatch.collate,
            worker_init_fn=init_worker,  # workers ignore SIGTERM: the pre-emption checkpoint is saved first
        )

    def train_dataloader(self) -> DataLoader:
        """Augmented, shuffled training images."""
        self.setup()
        return self._loader(self.train_set, self.batch_size, shuffle=True)

    def train_eval_dataloader(self) -> DataLoader:
        """The training images with the validation transform, in order (the kNN bank)."""
        self.setup()
        return self._loader(self.train_eval_set, self.val_batch_size, shuffle=False)

    def val_dataloader(self) -> DataLoader:
        self.setup()
        return self._loader(self.val_set, self.val_batch_size, shuffle=False)

    def test_dataloader(self) -> DataLoader:
        self.setup()
        return self._loader(self.test_set, self.val_batch_size, shuffle=False)

    def predict_dataloader(self) -> DataLoader:
        """``mtssl predict``: the test images, in order."""
        return self.test_dataloader()
