"""Labelled image sets on disk: CIFAR in its real pickle format, clear errors, torchvision's private MD5 hooks."""

from __future__ import annotations

import pickle
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from mtssl_lightning.evaluation.classification.data import ClassificationDataModule
from mtssl_lightning.evaluation.classification.datasets import TORCHVISION_SETS, open_torchvision_dataset


def _write_cifar10(root: Path, per_batch: int = 2) -> np.ndarray:
    """CIFAR-10's python pickle layout: 5 training batches, a test batch and batches.meta."""
    folder = root / "cifar-10-batches-py"
    folder.mkdir(parents=True)
    names = ["airplane", "automobile", "bird", "cat", "deer", "dog", "frog", "horse", "ship", "truck"]
    labels = []
    for b, name in enumerate([f"data_batch_{i}" for i in range(1, 6)] + ["test_batch"]):
        batch_labels = [(b * per_batch + i) % 10 for i in range(per_batch)]
        # image i of label c: every red value = 20 * c, green 7, blue 200 (stored channel-planar, row-major)
        data = np.zeros((per_batch, 3, 32, 32), dtype=np.uint8)
        for i, c in enumerate(batch_labels):
            data[i, 0], data[i, 1], data[i, 2] = 20 * c, 7, 200
        entry = {
            "batch_label": name,
            "labels": batch_labels,
            "data": data.reshape(per_batch, 3072),
            "filenames": [f"{name}_{i}.png" for i in range(per_batch)],
        }
        with open(folder / name, "wb") as f:
            pickle.dump(entry, f, protocol=2)
        labels += batch_labels
    with open(folder / "batches.meta", "wb") as f:
        pickle.dump({"label_names": names, "num_cases_per_batch": per_batch, "num_vis": 3072}, f, protocol=2)
    return np.array(labels)


def test_cifar10_in_the_real_pickle_format_loads_without_downloading(tmp_path):
    labels = _write_cifar10(tmp_path)
    dm = ClassificationDataModule(
        "cifar10", root=str(tmp_path), image_size=32, batch_size=64, num_workers=0, verify_checksums=False
    )  # hand-made files: not the official MD5 sums
    dm.setup()
    assert dm.num_classes == 10 and dm.classes[3] == "cat"
    assert len(dm.train_set) == 10 and len(dm.val_set) == 2
    batch = next(iter(dm.train_eval_dataloader()))
    assert batch.labels.tolist() == labels[:10].tolist()
    # pixels come back where the pickle put them: red = 20 * label, green 7, blue 200
    assert torch.allclose(batch.images[:, 0, 5, 5] * 255, 20.0 * batch.labels.float(), atol=0.5)
    assert torch.allclose(batch.images[:, 1:, 5, 5] * 255, torch.tensor([7.0, 200.0]).expand(10, 2), atol=0.5)
    assert next(iter(dm.val_dataloader())).labels.tolist() == labels[10:].tolist()
    assert len(pickle.loads(pickle.dumps(dm.train_set))) == 10  # workers started by "spawn" can receive it
    # with the default MD5 check the hand-made files are refused, and the error says what to do
    strict = ClassificationDataModule("cifar10", root=str(tmp_path), image_size=32, num_workers=0)
    with pytest.raises(RuntimeError, match="verify_checksums: false"):
        strict.setup()


def test_missing_datasets_give_a_clear_error(tmp_path):
    with pytest.raises(FileNotFoundError, match=r"cifar-10-batches-py.*data.root.*never downloads"):
        ClassificationDataModule("cifar10", root=str(tmp_path), num_workers=0).setup()
    with pytest.raises(FileNotFoundError, match=r"train_X.bin.*stl10_binary"):
        ClassificationDataModule("stl10", root=str(tmp_path), num_workers=0).setup()
    with pytest.raises(FileNotFoundError, match=r"data.train_root.*does not exist"):
        ClassificationDataModule(
            "folder", train_root=str(tmp_path / "nope"), val_root=str(tmp_path), num_workers=0
        ).setup()
    with pytest.raises(ValueError, match="needs `data.root`"):
        ClassificationDataModule("cifar100")
    (tmp_path / "flat").mkdir()
    Image.new("RGB", (8, 8)).save(tmp_path / "flat" / "x.jpg")
    with pytest.raises(FileNotFoundError, match="no class subfolders"):
        ClassificationDataModule(
            "folder", train_root=str(tmp_path / "flat"), val_root=str(tmp_path), num_workers=0
        ).setup()


def _write_cifar100(root: Path) -> np.ndarray:
    """CIFAR-100's python pickle layout: ``train``, ``test`` (fine and coarse labels) and ``meta``."""
    folder = root / "cifar-100-python"
    folder.mkdir(parents=True)
    labels = {"train": [3, 99], "test": [42]}
    for name, fine in labels.items():
        entry = {
            "data": np.zeros((len(fine), 3072), dtype=np.uint8),
            "fine_labels": fine,
            "coarse_labels": [label // 5 for label in fine],
            "filenames": [f"{name}_{i}.png" for i in range(len(fine))],
        }
        with open(folder / name, "wb") as f:
            pickle.dump(entry, f, protocol=2)
    meta = {"fine_label_names": [f"fine{i}" for i in range(100)], "coarse_label_names": [f"c{i}" for i in range(20)]}
    with open(folder / "meta", "wb") as f:
        pickle.dump(meta, f, protocol=2)
    return np.array(labels["train"] + labels["test"])


def _write_stl10(root: Path) -> np.ndarray:
    """STL-10's binary layout: ``<split>_X.bin`` uint8 ``(N, 3, 96, 96)``, ``<split>_y.bin`` labels 1..10."""
    folder = root / "stl10_binary"
    folder.mkdir(parents=True)
    labels = {"train": [1, 10], "test": [5]}
    for split, one_based in labels.items():
        (folder / f"{split}_X.bin").write_bytes(np.zeros((len(one_based), 3, 96, 96), dtype=np.uint8).tobytes())
        (folder / f"{split}_y.bin").write_bytes(np.array(one_based, dtype=np.uint8).tobytes())
    return np.array(labels["train"] + labels["test"]) - 1  # torchvision's labels are 0-based


@pytest.mark.parametrize("name", ["cifar10", "cifar100", "stl10"])
def test_torchvision_private_md5_hooks_are_still_the_ones_we_override(tmp_path, name):
    """torchvision has no public switch for its MD5 checks, so datasets.py overrides the private
    ``_check_integrity`` (and CIFAR's ``_load_meta``): this fails loudly when torchvision renames
    or bypasses them (then ``verify_checksums: false`` would refuse hand-made files)."""
    spec = TORCHVISION_SETS[name]
    for hook in ("_check_integrity",) + (("_load_meta",) if name != "stl10" else ()):
        assert callable(getattr(spec.checked, hook, None)), (
            f"torchvision's {spec.checked.__name__} has no {hook} any more: update _NoChecksum in "
            "mtssl_lightning/evaluation/classification/datasets.py"
        )
        assert getattr(spec.unchecked, hook) is not getattr(spec.checked, hook)  # ours replaces it
    labels = {"cifar10": _write_cifar10, "cifar100": _write_cifar100, "stl10": _write_stl10}[name](tmp_path)
    with pytest.raises(RuntimeError, match="verify_checksums: false"):  # the hand-made files fail the MD5 check
        open_torchvision_dataset(name, tmp_path, train=True)
    train = open_torchvision_dataset(name, tmp_path, train=True, verify_checksums=False)
    test = open_torchvision_dataset(name, tmp_path, train=False, verify_checksums=False)
    read = [int(data[i][1]) for data in (train, test) for i in range(len(data))]
    assert read == labels.tolist()
    if name != "stl10":  # read by our _load_meta, from the meta file
        assert len(train.classes) == spec.num_classes and train.class_to_idx[train.classes[-1]] == spec.num_classes - 1
