"""Helpers shared by the evaluation tests: writers of the real on-disk formats, trunk exports, configs."""

from __future__ import annotations

import re
import xml.etree.ElementTree as ET
from pathlib import Path

import h5py
import numpy as np
import torch
from PIL import Image

from mtssl_lightning.evaluation.classification import ClassificationDataModule
from mtssl_lightning.trunks import ResNetV2

ROOT = Path(__file__).resolve().parents[2]
EVAL_CONFIGS = ROOT / "configs" / "eval"


# ----------------------------------------------------------------------------- trunks and configs
def export_tiny_trunk(path: Path, seed: int = 0) -> Path:
    """A trunk export of a random tiny trunk, as `export_trunk` writes it."""
    torch.manual_seed(seed)
    trunk = ResNetV2("tiny", width=0.125)
    torch.save({"trunk_spec": trunk.spec(), "state_dict": trunk.state_dict()}, path)
    return path


def eval_config(tmp_path: Path, name: str) -> Path:
    """A copy of configs/eval/<name> with its outputs (runs/…) under tmp_path."""
    text = re.sub(r"runs/[A-Za-z0-9_]+", str(tmp_path / "runs"), (EVAL_CONFIGS / name).read_text())
    path = tmp_path / name
    path.write_text(text)
    return path


# ----------------------------------------------------------------------------- detection
# (id, width, height, [(class, xmin, ymin, xmax, ymax, difficult or None = no tag)])  -- VOC's 1-based pixels
IMAGES = [
    ("000005", 80, 64, [("chair", 11, 21, 40, 60, 0), ("dog", 45, 5, 79, 30, 1)]),
    ("000007", 64, 80, [("car", 3, 4, 50, 70, None)]),
    ("000009", 96, 72, [("person", 20, 10, 60, 71, 0), ("horse", 61, 30, 96, 72, 0), ("person", 1, 1, 15, 20, 1)]),
    ("000012", 72, 72, [("tvmonitor", 30, 30, 62, 55, 0)]),
    ("000016", 80, 64, [("bicycle", 5, 5, 70, 60, 0)]),
    ("000017", 64, 64, [("cat", 10, 12, 54, 50, 0)]),
]
SPLITS = {"trainval": ["000005", "000007", "000009", "000012"], "test": ["000016", "000017"]}


def write_voc(root: Path, images=IMAGES, splits=SPLITS) -> Path:
    """Write a VOC2007 folder in the real on-disk layout (JPEGs, XML annotations, ImageSets/Main)."""
    voc = root / "VOCdevkit" / "VOC2007"
    for sub in ("JPEGImages", "Annotations", "ImageSets/Main"):
        (voc / sub).mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(0)
    for image_id, width, height, objects in images:
        pixels = rng.integers(0, 60, (height, width, 3), dtype=np.uint8)
        ann = ET.Element("annotation")
        ET.SubElement(ann, "folder").text = "VOC2007"
        ET.SubElement(ann, "filename").text = f"{image_id}.jpg"
        size = ET.SubElement(ann, "size")
        for tag, value in (("width", width), ("height", height), ("depth", 3)):
            ET.SubElement(size, tag).text = str(value)
        for k, (name, x1, y1, x2, y2, difficult) in enumerate(objects):
            pixels[y1 - 1 : y2, x1 - 1 : x2] = (50 + 40 * k, 200, 255 - 30 * k)  # a bright box where the object is
            obj = ET.SubElement(ann, "object")
            ET.SubElement(obj, "name").text = name
            ET.SubElement(obj, "pose").text = "Unspecified"
            ET.SubElement(obj, "truncated").text = "0"
            if difficult is not None:
                ET.SubElement(obj, "difficult").text = str(difficult)
            box = ET.SubElement(obj, "bndbox")
            for tag, value in (("xmin", x1), ("ymin", y1), ("xmax", x2), ("ymax", y2)):
                ET.SubElement(box, tag).text = str(value)
        ET.ElementTree(ann).write(voc / "Annotations" / f"{image_id}.xml")
        Image.fromarray(pixels).save(voc / "JPEGImages" / f"{image_id}.jpg", quality=95)
    for split, ids in splits.items():
        (voc / "ImageSets" / "Main" / f"{split}.txt").write_text("".join(f"{i}\n" for i in ids))
    return root / "VOCdevkit"


# ----------------------------------------------------------------------------- depth
def frames(n: int, h: int, w: int, seed: int = 0) -> tuple[np.ndarray, np.ndarray]:
    """Random RGB ``(n, h, w, 3)`` uint8 and depth ``(n, h, w)`` float32 metres, asymmetric on purpose."""
    rng = np.random.default_rng(seed)
    rgb = rng.integers(0, 256, size=(n, h, w, 3), dtype=np.uint8)
    depth = rng.uniform(0.5, 9.5, size=(n, h, w)).astype(np.float32)
    depth[:, 0, -1] = 7.25  # a marker at the top-right corner
    return rgb, depth


def write_labeled_mat(path: Path, rgb: np.ndarray, depth: np.ndarray) -> None:
    """Write like MATLAB's ``save -v7.3``: the H×W×3×N / H×W×N arrays, column-major, i.e. HDF5
    sees every axis reversed (numpy ``.T``); with MATLAB's 512-byte user block header."""
    images_matlab = np.stack(list(rgb), axis=-1)  # (H, W, 3, N), MATLAB's shape
    depths_matlab = np.stack(list(depth), axis=-1)  # (H, W, N)
    with h5py.File(path, "w", userblock_size=512) as f:
        f.create_dataset("images", data=np.ascontiguousarray(images_matlab.T))
        f.create_dataset("depths", data=np.ascontiguousarray(depths_matlab.T))
    with open(path, "r+b") as f:
        f.write(b"MATLAB 7.3 MAT-file, Platform: GLNXA64, Created on: Mon Jan  1 00:00:00 2024 HDF5 schema 1.00 .")


def write_pair(folder: Path, name: str, rgb: np.ndarray, depth_units: np.ndarray, rgb_ext: str = ".png") -> None:
    """``<name><rgb_ext>`` and ``<name>_depth.png`` (``depth_units`` uint16 = 16-bit PNG, uint8 = 8-bit)."""
    folder.mkdir(parents=True, exist_ok=True)
    Image.fromarray(rgb).save(folder / f"{name}{rgb_ext}")
    Image.fromarray(depth_units).save(folder / f"{name}_depth.png")


# ----------------------------------------------------------------------------- classification
COLOURS = {"cat": (220, 30, 30), "dog": (30, 30, 220)}  # the class is readable from the pixels


def write_tree(root: Path, classes: dict[str, int]) -> None:
    """``root/<class>/...`` with ``n`` images per class: JPEG, PNG and one in a nested folder."""
    rng = np.random.default_rng(0)
    for name, n in classes.items():
        for i in range(n):
            folder = root / name / ("nested" if i == 0 else "")
            folder.mkdir(parents=True, exist_ok=True)
            pixels = np.clip(np.array(COLOURS[name]) + rng.integers(-20, 20, (40, 48, 3)), 0, 255).astype(np.uint8)
            Image.fromarray(pixels).save(folder / f"{i}.{'png' if i % 2 else 'jpg'}")


def digits_datamodule(**kw) -> ClassificationDataModule:
    """scikit-learn's digits at 32×32 in batches of 32, no worker processes (``kw`` overrides)."""
    args = {"dataset": "digits", "image_size": 32, "batch_size": 32, "num_workers": 0}
    args.update(kw)
    return ClassificationDataModule(**args)
