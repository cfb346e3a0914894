"""Helpers shared by the evaluation tests: writers of the real on-disk formats, trunk exports, configs."""

from __future__ import annotations

import re
import xml.etree.ElementTree as ET
from pathlib import Path

import numpy as np
import torch
from PIL import Image

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
