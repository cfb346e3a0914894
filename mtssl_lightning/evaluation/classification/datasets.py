"""Labelled image sets: class-folder trees, CIFAR-10/100 and STL-10 files on disk, scikit-learn's digits.

Each is a Dataset of ``(image (3, H, W) tensor, label)`` that skips an unreadable file for the
next readable one (warning once per file). CIFAR and STL-10 are read by torchvision from files
already on disk (never downloaded).
"""

from __future__ import annotations

import os
import pickle
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
from PIL import Image
from torch import Tensor
from torch.utils.data import Dataset
from torchvision import datasets as tv_datasets
from torchvision.datasets import VisionDataset

from mtssl_lightning.data.datasets import BadFiles
from mtssl_lightning.data.sources import IMAGE_EXTENSIONS, find_files, to_rgb

#: scikit-learn digits: a fixed stratified split, 1/3 of the 1797 images held out (1198 / 599)
DIGITS_VAL_FRACTION = 1.0 / 3.0
DIGITS_SPLIT_SEED = 0


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

    Not torchvision's ``ImageFolder``: it skips class folders it does not know silently, and its
    errors do not name the config setting.

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


# private hooks: torchvision has no public way to skip its MD5 checks (guarded by classification/test_datasets.py)
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


@dataclass(frozen=True)
class TorchvisionSet:
    """A data set torchvision reads: its two readers, what it needs on disk and where to get it.

    Attributes:
        checked: torchvision's class (checks the files' MD5 sums).
        unchecked: the same reader without the MD5 checks (``data.verify_checksums: false``).
        train, test: the files each split needs in :attr:`folder`.
        num_classes: number of classes.
        get: where to get the files (for error messages).
    """

    checked: type[VisionDataset]
    unchecked: type[VisionDataset]
    train: tuple[str, ...]
    test: tuple[str, ...]
    num_classes: int
    get: str

    @property
    def folder(self) -> str:
        """The folder under ``data.root`` that holds the files (``cifar-10-batches-py`` …)."""
        return str(self.checked.base_folder)  # type: ignore[attr-defined]


TORCHVISION_SETS: dict[str, TorchvisionSet] = {
    "cifar10": TorchvisionSet(
        checked=tv_datasets.CIFAR10,
        unchecked=_CIFAR10NoChecksum,
        train=(*(f"data_batch_{i}" for i in range(1, 6)), "batches.meta"),
        test=("test_batch", "batches.meta"),
        num_classes=10,
        get="download cifar-10-python.tar.gz from https://www.cs.toronto.edu/~kriz/cifar.html and extract it there",
    ),
    "cifar100": TorchvisionSet(
        checked=tv_datasets.CIFAR100,
        unchecked=_CIFAR100NoChecksum,
        train=("train", "meta"),
        test=("test", "meta"),
        num_classes=100,
        get="download cifar-100-python.tar.gz from https://www.cs.toronto.edu/~kriz/cifar.html and extract it there",
    ),
    "stl10": TorchvisionSet(
        checked=tv_datasets.STL10,
        unchecked=_STL10NoChecksum,
        train=("train_X.bin", "train_y.bin"),
        test=("test_X.bin", "test_y.bin"),
        num_classes=10,
        get="download stl10_binary.tar.gz from https://cs.stanford.edu/~acoates/stl10/ and extract it there",
    ),
}


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
    spec = TORCHVISION_SETS[name]
    folder = Path(root).expanduser() / spec.folder
    needed = spec.train if train else spec.test
    missing = [f for f in needed if not (folder / f).is_file()]
    if missing:
        raise FileNotFoundError(
            f"{name} not found: expected {', '.join(missing)} in {str(folder)!r}. Set `data.root` to the folder that "
            f"holds {spec.folder}/, or {spec.get} (this project never downloads data sets)"
        )
    cls = spec.checked if verify_checksums else spec.unchecked
    kwargs: dict[str, Any] = {"split": "train" if train else "test"} if name == "stl10" else {"train": train}
    try:
        return cls(str(Path(root).expanduser()), download=False, **kwargs)
    except RuntimeError as err:
        raise RuntimeError(
            f"{name} files in {str(folder)!r} failed torchvision's MD5 check ({err}); they are corrupt or not the "
            "official files: re-extract the official archive, or set `data.verify_checksums: false` to use them as they are"
        ) from err
