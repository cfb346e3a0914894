"""Classification transfer: a linear probe on the frozen trunk, or fine-tuning, and the labelled data.

The paper's ImageNet protocol trains a linear classifier on the **frozen block-3
representation** (option: a freshly trained block 4 + linear). :class:`ImageClassifier` covers
both, and fine-tuning (``frozen: false``):

* the trunk comes from :func:`~mtssl_lightning.evaluation.backbone.pretrained_trunk` (a
  checkpoint of ``mtssl fit`` / a trunk export, or a random-init ``trunk`` baseline) and is read
  through :class:`~mtssl_lightning.evaluation.backbone.TrunkRepresentation` (block output or a
  fresh lasso row; a frozen trunk stays in eval mode, its BN statistics never move);
* pooling: **global average pooling** of the block output (``pool_size: 1``, default), then
  the linear layer. ``pool_size: s`` keeps an ``s × s`` average-pooled grid instead
  (``C·s²`` inputs), the usual way to give a linear probe more spatial information. The
  paper's exact pooling of block 3 is not published in the sources we have; global average
  pooling is our assumption;
* ``bn: true`` puts a parameter-free ``BatchNorm1d`` before the linear layer, a common probe
  trick that makes one learning rate work for features of any scale (off by default, as the
  paper does not mention it);
* ``probe_units``: extra linear probes, each on the pooled output of one unit of the last
  block (``TrunkOutput.units[i]``), trained in the same run on **detached** features (so they
  never change the trunk or each other); metrics ``{stage}/top1_unit{i}``.

Logged: ``train/loss`` and ``train/lr`` (the head's learning rate, every step), ``{val,test}/loss``, ``{train,val,test}/top1`` and, for
more than 5 classes, ``/top5`` (fractions in [0, 1]).

:class:`ClassificationDataModule` provides labelled images: an image-folder tree (ImageNet's
``train/<class>/…``, ``val/<class>/…``), CIFAR-10/100 and STL-10 already on disk (never
downloaded), and scikit-learn's bundled 8×8 digits (the small real labelled set that CPU tests
and the CPU transfer benchmark use).
"""

from __future__ import annotations

import logging
import os
import pickle
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal

import lightning.pytorch as pl
import numpy as np
import torch
import torch.nn.functional as F
from lightning.pytorch.cli import LRSchedulerCallable, OptimizerCallable
from PIL import Image
from torch import Tensor, nn
from torch.utils.data import DataLoader, Dataset
from torchmetrics import MetricCollection
from torchmetrics.classification import MulticlassAccuracy
from torchvision import datasets as tv_datasets
from torchvision.transforms import v2 as T

from mtssl_lightning.data.datamodule import init_worker
from mtssl_lightning.data.datasets import BadFiles
from mtssl_lightning.data.sources import IMAGE_EXTENSIONS, find_files, to_rgb
from mtssl_lightning.evaluation.backbone import Representation, SavesTrunkSpec, TrunkRepresentation, pretrained_trunk
from mtssl_lightning.trunks.base import Trunk

log = logging.getLogger(__name__)

DatasetName = Literal["folder", "cifar10", "cifar100", "stl10", "digits"]
Augment = Literal["auto", "crop_flip", "crop", "none"]
Head = Literal["linear", "block4_linear"]

#: scikit-learn digits: a fixed stratified split, 1/3 of the 1797 images held out (1198 / 599)
DIGITS_VAL_FRACTION = 1.0 / 3.0
DIGITS_SPLIT_SEED = 0

#: ImageNet-style evaluation: resize the shorter side to size / 0.875 (256 for 224), centre crop
CENTRE_CROP_FRACTION = 0.875

# what each torchvision dataset needs on disk (relative to data.root) and where to get it
_TORCHVISION: dict[str, dict[str, Any]] = {
    "cifar10": {
        "cls": tv_datasets.CIFAR10,
        "train": [f"data_batch_{i}" for i in range(1, 6)] + ["batches.meta"],
        "test": ["test_batch", "batches.meta"],
        "num_classes": 10,
        "get": "download cifar-10-python.tar.gz from https://www.cs.toronto.edu/~kriz/cifar.html and extract it there",
    },
    "cifar100": {
        "cls": tv_datasets.CIFAR100,
        "train": ["train", "meta"],
        "test": ["test", "meta"],
        "num_classes": 100,
        "get": "download cifar-100-python.tar.gz from https://www.cs.toronto.edu/~kriz/cifar.html and extract it there",
    },
    "stl10": {
        "cls": tv_datasets.STL10,
        "train": ["train_X.bin", "train_y.bin"],
        "test": ["test_X.bin", "test_y.bin"],
        "num_classes": 10,
        "get": "download stl10_binary.tar.gz from https://cs.stanford.edu/~acoates/stl10/ and extract it there",
    },
}


# ----------------------------------------------------------------------------------- batches
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
        return LabelledBatch(self.images.pin_memory(), self.labels.pin_memory())


# ---------------------------------------------------------------------------------- datasets
class _SkipUnreadable(Dataset):
    """Base of the file-backed datasets: item ``i``, or the next decodable one, warning once per bad file."""

    def __init__(self, transform: Callable[[Image.Image], Tensor]) -> None:
        self.transform = transform
        self.bad_files = BadFiles("image")

    def _open(self, i: int) -> tuple[Image.Image, int]:  # pragma: no cover - abstract
        raise NotImplementedError

    def _name(self, i: int) -> str:
        return f"item {i}"

    def __getitem__(self, index: int) -> tuple[Tensor, int]:
        # an unreadable file is replaced by the next readable one, with that one's label
        (image, label), _ = self.bad_files.first_readable(range(len(self)), index, self._open, self._name, "this dataset")
        return self.transform(to_rgb(image)), label


class LabelledImageFolder(_SkipUnreadable):
    """Images ``root/<class>/**/<file>`` with their class index.

    Args:
        root: the folder.
        samples: ``(path relative to root, label)`` pairs (from :func:`scan_class_folders`).
        classes: the class names, index = label.
        transform: PIL RGB image -> ``(3, H, W)`` tensor.
    """

    def __init__(
        self, root: Path, samples: list[tuple[str, int]], classes: list[str], transform: Callable[[Image.Image], Tensor]
    ) -> None:
        super().__init__(transform)
        self.root, self.samples, self.classes = root, samples, classes

    def __len__(self) -> int:
        return len(self.samples)

    def _name(self, i: int) -> str:
        return str(self.root / self.samples[i][0])

    def _open(self, i: int) -> tuple[Image.Image, int]:
        name, label = self.samples[i]
        with Image.open(self.root / name) as image:
            image.load()
            return image.copy(), label


class PILDatasetAdapter(_SkipUnreadable):
    """Wraps a dataset of ``(PIL image, label)`` items (torchvision's CIFAR/STL) with our transform."""

    def __init__(self, dataset: Dataset, transform: Callable[[Image.Image], Tensor], classes: list[str]) -> None:
        super().__init__(transform)
        self.dataset, self.classes = dataset, classes

    def __len__(self) -> int:
        return len(self.dataset)  # type: ignore[arg-type]

    def _open(self, i: int) -> tuple[Image.Image, int]:
        image, label = self.dataset[i]
        return image, int(label)


class GreyArrayDataset(_SkipUnreadable):
    """In-memory grey images ``(N, h, w)`` uint8 with labels ``(N,)`` (the digits)."""

    def __init__(
        self, images: np.ndarray, labels: np.ndarray, transform: Callable[[Image.Image], Tensor], classes: list[str]
    ) -> None:
        super().__init__(transform)
        self.images, self.labels, self.classes = images, labels, classes

    def __len__(self) -> int:
        return len(self.labels)

    def _open(self, i: int) -> tuple[Image.Image, int]:
        return Image.fromarray(self.images[i], mode="L"), int(self.labels[i])


def scan_class_folders(
    root: str | os.PathLike, setting: str, classes: list[str] | None = None
) -> tuple[list[str], list[tuple[str, int]]]:
    """The classes (sorted subfolder names) and ``(relative path, label)`` samples of a class-folder tree.

    Args:
        root: ``<root>/<class>/**/<image>`` (ImageNet's ``train/`` and, once sorted into class
            folders, ``val/`` layout; images may sit in nested folders below the class folder).
        setting: the config key that named ``root`` (for error messages).
        classes: the class list to use (the training classes, when scanning validation data):
            a class folder not in it is an error, classes without a folder are allowed. ``None``
            takes the subfolders of ``root``, and then every class folder must hold images.

    Raises:
        FileNotFoundError: ``root`` is missing, has no class subfolders, or (training) a class
            folder holds no image.
        ValueError: a class folder is not among ``classes``.
    """
    path = Path(root).expanduser()
    if not path.is_dir():
        raise FileNotFoundError(
            f"`{setting}` = {str(path)!r} does not exist or is not a folder; it must hold one subfolder of images "
            "per class (ImageNet's train/ layout: <root>/<class>/<image>.JPEG)"
        )
    subdirs = sorted(d.name for d in path.iterdir() if d.is_dir() and not d.name.startswith("."))
    if not subdirs:
        raise FileNotFoundError(
            f"`{setting}` = {str(path)!r} has no class subfolders; images must be sorted into one folder per class "
            "(ImageNet's val/ comes flat: sort it into class folders first, e.g. with the usual valprep.sh script)"
        )
    training = classes is None
    classes = list(subdirs) if classes is None else list(classes)
    unknown = sorted(set(subdirs) - set(classes))
    if unknown:
        raise ValueError(
            f"`{setting}` = {str(path)!r} has class folders that the training data does not have: {unknown[:10]}"
            f"{' …' if len(unknown) > 10 else ''}; the validation/test classes must be a subset of `data.train_root`'s"
        )
    index = {name: i for i, name in enumerate(classes)}
    samples: list[tuple[str, int]] = []
    for name in subdirs:
        try:
            files = find_files(path / name, IMAGE_EXTENSIONS, "image")
        except FileNotFoundError:
            if training:
                raise FileNotFoundError(
                    f"class folder {str(path / name)!r} (under `{setting}`) holds no images; remove it or add its images"
                ) from None
            continue  # a class may have no validation images
        samples.extend((f"{name}/{f}", index[name]) for f in files)
    return classes, samples


def digits_split(
    val_fraction: float = DIGITS_VAL_FRACTION, seed: int = DIGITS_SPLIT_SEED
) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
    """scikit-learn's bundled 8×8 digits (1797 images, 10 classes), split train/val.

    The split is stratified by class and fixed by ``seed`` (scikit-learn's
    ``train_test_split``), so it is identical on every machine; the default holds out 1/3
    (599 val, 1198 train). Pixels 0–16 are scaled to 0–255.

    Returns:
        ``train_images (N, 8, 8) uint8, train_labels (N,) int64, val_images, val_labels``.
    """
    from sklearn.datasets import load_digits
    from sklearn.model_selection import train_test_split

    if not 0.0 < val_fraction < 1.0:
        raise ValueError(f"`digits_val_fraction` must be in (0, 1), got {val_fraction}")
    digits = load_digits()
    images = np.clip(np.round(digits.images * (255.0 / 16.0)), 0, 255).astype(np.uint8)
    labels = digits.target.astype(np.int64)
    tr_x, va_x, tr_y, va_y = train_test_split(
        images, labels, test_size=val_fraction, random_state=seed, stratify=labels
    )
    return tr_x, tr_y, va_x, va_y


class _NoChecksum:
    """Mixin: a torchvision CIFAR/STL dataset without its MD5 checks (the files must still exist).

    Module-level classes (not made in a function) so that DataLoader workers can pickle them."""

    def _check_integrity(self) -> bool:
        return True  # existence was checked by open_torchvision_dataset

    def _load_meta(self) -> None:  # CIFAR only: torchvision's version checks the meta file's MD5
        with open(os.path.join(self.root, self.base_folder, self.meta["filename"]), "rb") as f:  # type: ignore[attr-defined]
            self.classes = pickle.load(f, encoding="latin1")[self.meta["key"]]  # type: ignore[attr-defined]
        self.class_to_idx = {c: i for i, c in enumerate(self.classes)}


class _CIFAR10NoChecksum(_NoChecksum, tv_datasets.CIFAR10):
    pass


class _CIFAR100NoChecksum(_NoChecksum, tv_datasets.CIFAR100):
    pass


class _STL10NoChecksum(_NoChecksum, tv_datasets.STL10):
    pass


_NO_CHECKSUM = {"cifar10": _CIFAR10NoChecksum, "cifar100": _CIFAR100NoChecksum, "stl10": _STL10NoChecksum}


def open_torchvision_dataset(name: str, root: str | os.PathLike, train: bool, verify_checksums: bool = True) -> Dataset:
    """CIFAR-10/100 or STL-10 from ``root`` with torchvision, ``download=False`` always.

    Args:
        name: ``"cifar10"``, ``"cifar100"`` or ``"stl10"``.
        root: the folder holding ``cifar-10-batches-py/``, ``cifar-100-python/`` or ``stl10_binary/``.
        train: the training split (else the official test split; STL-10: the 5000 labelled
            training images, not the unlabelled ones).
        verify_checksums: let torchvision check the files' MD5 sums (the official files);
            ``False`` only checks that they exist (hand-made or re-packed files).

    Raises:
        FileNotFoundError: files are missing; the message says where to put them.
        RuntimeError: the files fail the MD5 check.
    """
    spec = _TORCHVISION[name]
    cls = spec["cls"]
    folder = Path(root).expanduser() / cls.base_folder
    needed = spec["train" if train else "test"]
    missing = [f for f in needed if not (folder / f).is_file()]
    if missing:
        raise FileNotFoundError(
            f"{name} not found: expected {', '.join(missing)} in {str(folder)!r}. Set `data.root` to the folder that "
            f"holds {cls.base_folder}/, or {spec['get']} (this project never downloads data sets)"
        )
    if not verify_checksums:
        cls = _NO_CHECKSUM[name]
    kwargs: dict[str, Any] = {"split": "train" if train else "test"} if name == "stl10" else {"train": train}
    try:
        return cls(str(Path(root).expanduser()), download=False, **kwargs)
    except RuntimeError as err:
        raise RuntimeError(
            f"{name} files in {str(folder)!r} failed torchvision's MD5 check ({err}); they are corrupt or not the "
            "official files: re-extract the official archive, or set `data.verify_checksums: false` to use them as they are"
        ) from err


# -------------------------------------------------------------------------------- datamodule
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

    An unreadable image file is skipped with a warning (once per worker): its place is taken by
    the next readable file, with that file's label.
        pin_memory: pin batches (helps CUDA transfers).
        verify_checksums: torchvision sets: check the files' MD5 sums.
        digits_val_fraction: digits: share held out for validation (and test).
        seed: digits: seed of the split.
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
        if dataset in _TORCHVISION and root is None:
            raise ValueError(
                f"`data.dataset: {dataset}` needs `data.root`: the folder that holds "
                f"{_TORCHVISION[dataset]['cls'].base_folder}/ ({_TORCHVISION[dataset]['get']})"
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
        if self.dataset in _TORCHVISION:
            return int(_TORCHVISION[self.dataset]["num_classes"])
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


# -------------------------------------------------------------------------------- the model
def classification_metrics(num_classes: int) -> MetricCollection:
    """Top-1 (and, for more than 5 classes, top-5) accuracy as fractions: keys ``top1``, ``top5``."""
    metrics: dict[str, Any] = {"top1": MulticlassAccuracy(num_classes, top_k=1, average="micro")}
    if num_classes > 5:
        metrics["top5"] = MulticlassAccuracy(num_classes, top_k=5, average="micro")
    return MetricCollection(metrics)


def linear_probe(channels: int, num_classes: int, pool_size: int = 1, bn: bool = False) -> nn.Sequential:
    """``(B, C, h, w) -> (B, num_classes)``: average pool to ``pool_size²`` cells, flatten, [BN], linear.

    The linear layer starts at N(0, 0.01²) weights and zero bias (the usual probe init).
    """
    dim = channels * pool_size * pool_size
    layers: list[nn.Module] = [nn.AdaptiveAvgPool2d(pool_size), nn.Flatten()]
    if bn:
        layers.append(nn.BatchNorm1d(dim, affine=False))  # standardises features, no learnt scale
    fc = nn.Linear(dim, num_classes)
    nn.init.normal_(fc.weight, std=0.01)
    nn.init.zeros_(fc.bias)
    layers.append(fc)
    return nn.Sequential(*layers)


STAGES = ("train", "val", "test")


class ImageClassifier(SavesTrunkSpec, pl.LightningModule):
    """Classification on the (pretrained) trunk: linear probe (``frozen: true``) or fine-tuning.

    Args:
        num_classes: number of classes; ``None`` takes it from the datamodule
            (``datamodule.num_classes``) when the run starts.
        checkpoint: an ``mtssl fit`` checkpoint or a trunk export; ``None`` evaluates ``trunk``
            as initialised (the random-init baseline).
        trunk: the trunk used when ``checkpoint`` is ``None``.
        frozen: ``True``: the linear-probe protocol (trunk weights and BN statistics fixed);
            ``False``: the whole network is fine-tuned.
        head: ``"linear"`` (pool + linear on the block output) or ``"block4_linear"`` (a freshly
            initialised block 4, :meth:`ResNetV2.next_block`, trained, then pool + linear: the
            paper's option).
        representation: ``"features"`` (block output) or ``"lasso"`` (a new α over the last
            block's units, trained with the head).
        pool_size: average-pool the features to ``pool_size × pool_size`` before the linear
            layer (1 = global average pooling, the default and our assumption for the paper).
        bn: a parameter-free BatchNorm1d before the linear layer (common probe trick; off).
        probe_units: extra linear probes on the pooled, detached outputs of these units of the
            last block (0-based indices into ``TrunkOutput.units``); metrics ``…/top1_unit{i}``.
            Their losses are added to the main loss (they never interact: detached inputs).
        label_smoothing: of the cross-entropy.
        optimizer: builds the optimizer from parameter groups (default: SGD lr 0.01, momentum
            0.9); only trainable parameters are passed.
        lr_scheduler: optional; stepped every ``lr_interval``.
        lr_interval: ``"epoch"`` or ``"step"``.
        trunk_lr_scale: fine-tuning: the trunk's learning rate is the optimizer's times this.
    """

    def __init__(
        self,
        num_classes: int | None = None,
        checkpoint: str | None = None,
        trunk: Trunk | None = None,
        frozen: bool = True,
        head: Head = "linear",
        representation: Representation = "features",
        pool_size: int = 1,
        bn: bool = False,
        probe_units: list[int] | None = None,
        label_smoothing: float = 0.0,
        optimizer: OptimizerCallable | None = None,
        lr_scheduler: LRSchedulerCallable | None = None,
        lr_interval: Literal["epoch", "step"] = "epoch",
        trunk_lr_scale: float = 1.0,
    ) -> None:
        super().__init__()
        self.save_hyperparameters(ignore=["trunk", "optimizer", "lr_scheduler"])
        if head not in ("linear", "block4_linear"):
            raise ValueError(f"`model.head` must be 'linear' or 'block4_linear', got {head!r}")
        if pool_size < 1:
            raise ValueError(f"`model.pool_size` must be >= 1, got {pool_size}")
        if num_classes is not None and num_classes < 2:
            raise ValueError(f"`model.num_classes` must be >= 2, got {num_classes}")
        if lr_interval not in ("epoch", "step"):
            raise ValueError(f"`model.lr_interval` must be 'epoch' or 'step', got {lr_interval!r}")
        if trunk_lr_scale < 0:
            raise ValueError(f"`model.trunk_lr_scale` must be >= 0, got {trunk_lr_scale}")
        base = pretrained_trunk(checkpoint, trunk)
        self.representation = TrunkRepresentation(base, frozen=frozen, representation=representation)
        probe_units = list(probe_units or [])
        bad = [i for i in probe_units if not 0 <= i < base.num_units]
        if bad:
            raise ValueError(
                f"`model.probe_units` {bad} out of range: the trunk's last block has {base.num_units} units (0-{base.num_units - 1})"
            )
        self.block4: nn.Module | None = None
        channels = base.out_channels
        if head == "block4_linear":
            next_block = getattr(base, "next_block", None)
            if next_block is None:
                raise ValueError(
                    f"`model.head: block4_linear` needs a trunk with `next_block()` (ResNetV2); {type(base).__name__} has none"
                )
            self.block4 = next_block(stride=1)
            channels = int(self.block4.out_channels)
        self.head_channels, self.pool_size, self.bn = channels, pool_size, bn
        self.probe_units, self.label_smoothing = probe_units, label_smoothing
        self.frozen = frozen
        self.optimizer_factory, self.scheduler_factory = optimizer, lr_scheduler
        self.lr_interval, self.trunk_lr_scale = lr_interval, trunk_lr_scale
        self.num_classes = num_classes
        self.classifier: nn.Module | None = None
        if num_classes is not None:
            self._build(num_classes)

    @property
    def trunk(self) -> Trunk:
        """The trunk (what :class:`~mtssl_lightning.evaluation.knn.KNNEvaluation` embeds with)."""
        return self.representation.trunk  # type: ignore[return-value]

    def _build(self, num_classes: int) -> None:
        """Create the heads and metrics for ``num_classes`` classes."""
        self.num_classes = num_classes
        self.hparams["num_classes"] = num_classes  # saved in checkpoints, so load_from_checkpoint works
        self.classifier = linear_probe(self.head_channels, num_classes, self.pool_size, self.bn)
        self.unit_probes = nn.ModuleDict(
            {
                str(i): linear_probe(self.trunk.out_channels, num_classes, self.pool_size, self.bn)
                for i in self.probe_units
            }
        )
        # keys "<stage>_…": a ModuleDict key may not shadow a method such as Module.train
        self.metrics = nn.ModuleDict(
            {f"{stage}_all": classification_metrics(num_classes).clone(prefix=f"{stage}/") for stage in STAGES}
        )
        self.unit_metrics = nn.ModuleDict(
            {
                f"{stage}_{i}": MulticlassAccuracy(num_classes, top_k=1, average="micro")
                for stage in STAGES
                for i in self.probe_units
            }
        )

    def setup(self, stage: str) -> None:
        datamodule = getattr(self.trainer, "datamodule", None) if self._trainer is not None else None
        data_classes = getattr(datamodule, "num_classes", None)
        if self.classifier is None:
            if data_classes is None:
                raise ValueError(
                    "`model.num_classes` is not set and the datamodule does not say how many classes there are; set it"
                )
            self._build(int(data_classes))
        elif data_classes is not None and int(data_classes) != self.num_classes:
            raise ValueError(
                f"`model.num_classes` is {self.num_classes} but the data has {data_classes} classes; make them agree (or set it to null)"
            )

    # -------------------------------------------------------------------- forward
    def forward_all(self, images: Tensor) -> tuple[Tensor, dict[int, Tensor]]:
        """``(B, 3, H, W)`` in [0, 1] -> main logits ``(B, K)`` and ``{unit: (B, K)}`` of the unit probes."""
        if self.classifier is None:
            raise RuntimeError("the classifier has no head yet: give `num_classes` or run it with a datamodule")
        rep = self.representation
        # a frozen trunk needs no graph (saves memory); the lasso row after it still learns
        with torch.set_grad_enabled(torch.is_grad_enabled() and not self.frozen):
            out = rep.trunk(images)
        features = out.features if rep.mixer is None else rep.mixer(out.units)
        if self.block4 is not None:
            features = self.block4(features)
        logits = self.classifier(features)
        unit_logits = {i: self.unit_probes[str(i)](out.units[i].detach()) for i in self.probe_units}
        return logits, unit_logits

    def forward(self, images: Tensor) -> Tensor:
        """``(B, 3, H, W)`` RGB in [0, 1] -> logits ``(B, num_classes)``."""
        return self.forward_all(images)[0]

    def _step(self, batch: LabelledBatch, stage: str) -> Tensor:
        logits, unit_logits = self.forward_all(batch.images)
        labels = batch.labels
        size = labels.shape[0]
        loss = F.cross_entropy(logits, labels, label_smoothing=self.label_smoothing)
        metrics = self.metrics[f"{stage}_all"]
        metrics.update(logits.detach(), labels)
        self.log_dict(metrics, on_step=False, on_epoch=True, batch_size=size)
        for i, unit_out in unit_logits.items():
            loss = loss + F.cross_entropy(unit_out, labels, label_smoothing=self.label_smoothing)
            metric = self.unit_metrics[f"{stage}_{i}"]
            metric.update(unit_out.detach(), labels)
            self.log(f"{stage}/top1_unit{i}", metric, on_step=False, on_epoch=True, batch_size=size)
        training = stage == "train"
        self.log(
            f"{stage}/loss",
            loss,
            on_step=training,
            on_epoch=not training,
            prog_bar=True,
            batch_size=size,
            sync_dist=not training,
        )
        return loss

    def training_step(self, batch: LabelledBatch, batch_idx: int) -> Tensor:
        optimizer = self.optimizers()
        if isinstance(optimizer, torch.optim.Optimizer):  # the head's learning rate (a logger-free LR monitor)
            self.log("train/lr", optimizer.param_groups[0]["lr"], on_step=True, on_epoch=False, batch_size=len(batch))
        return self._step(batch, "train")

    def validation_step(self, batch: LabelledBatch, batch_idx: int) -> Tensor:
        return self._step(batch, "val")

    def test_step(self, batch: LabelledBatch, batch_idx: int) -> Tensor:
        return self._step(batch, "test")

    def predict_step(self, batch: LabelledBatch, batch_idx: int, dataloader_idx: int = 0) -> Tensor:
        """Class probabilities ``(B, num_classes)``."""
        return self(batch.images).softmax(dim=1)

    # ------------------------------------------------------------------ optimizer
    def configure_optimizers(self) -> Any:
        trunk_ids = {id(p) for p in self.trunk.parameters()}
        trainable = [p for p in self.parameters() if p.requires_grad]
        head = [p for p in trainable if id(p) not in trunk_ids]
        trunk = [p for p in trainable if id(p) in trunk_ids]  # empty when frozen
        groups = [{"params": head}] + ([{"params": trunk}] if trunk else [])
        if self.optimizer_factory is None:
            optimizer = torch.optim.SGD(groups, lr=0.01, momentum=0.9)
        else:
            optimizer = self.optimizer_factory(groups)
        if trunk:
            optimizer.param_groups[1]["lr"] *= self.trunk_lr_scale  # before any scheduler reads it
        if self.scheduler_factory is None:
            return optimizer
        return {
            "optimizer": optimizer,
            "lr_scheduler": {"scheduler": self.scheduler_factory(optimizer), "interval": self.lr_interval},
        }
