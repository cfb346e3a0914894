"""The PASCAL VOC on-disk format: the 20 classes, one XML annotation file, the folder layout.

Box convention: VOC's ``xmin, ymin, xmax, ymax`` are 1-based inclusive pixel indices; we store
continuous 0-based pixel-edge coordinates ``(xmin - 1, ymin - 1, xmax, ymax)``, so that
``width = xmax - xmin + 1`` as in the VOC devkit and plain IoU of our boxes equals the devkit's
"+1" IoU of the raw annotations.

Not torchvision's ``VOCDetection``: it returns the XML as nested dicts of strings and reads only
``<root>/VOCdevkit/VOC<year>``; here a malformed file fails at set-up, naming the file.
"""

from __future__ import annotations

import xml.etree.ElementTree as ET
from dataclasses import dataclass
from pathlib import Path

import torch
from torch import Tensor

#: the 20 PASCAL VOC classes; class ``VOC_CLASSES[k]`` has detection label ``k + 1`` (0 = background)
VOC_CLASSES: tuple[str, ...] = (
    "aeroplane",
    "bicycle",
    "bird",
    "boat",
    "bottle",
    "bus",
    "car",
    "cat",
    "chair",
    "cow",
    "diningtable",
    "dog",
    "horse",
    "motorbike",
    "person",
    "pottedplant",
    "sheep",
    "sofa",
    "train",
    "tvmonitor",
)
_LABEL_OF = {name: k + 1 for k, name in enumerate(VOC_CLASSES)}


@dataclass
class VOCAnnotation:
    """The objects of one VOC image, as written in its XML file.

    Attributes:
        boxes: ``(N, 4)`` ``float32`` ``(x1, y1, x2, y2)`` in 0-based pixel-edge coordinates
            (``xmin - 1, ymin - 1, xmax, ymax`` of the file).
        labels: ``(N,)`` ``int64`` in ``1..20`` (index into :data:`VOC_CLASSES` plus one).
        difficult: ``(N,)`` ``bool``, VOC's ``difficult`` flag (absent means 0).
        width, height: the image size the file states (0 if absent).
    """

    boxes: Tensor
    labels: Tensor
    difficult: Tensor
    width: int = 0
    height: int = 0


def _text(node: ET.Element, tag: str, path: Path, required: bool = True) -> str | None:
    child = node.find(tag)
    if child is None or child.text is None or not child.text.strip():
        if required:
            raise ValueError(
                f"VOC annotation {str(path)!r}: <{node.tag}> has no <{tag}>; is this a PASCAL VOC XML file?"
            )
        return None
    return child.text.strip()


def parse_voc_annotation(path: str | Path) -> VOCAnnotation:
    """Read one VOC XML annotation file with ``xml.etree``.

    Raises:
        FileNotFoundError: the file does not exist.
        ValueError: the file is not well-formed XML, names a class outside the 20 VOC classes,
            lacks a coordinate, or has an empty box (``xmax < xmin`` or ``ymax < ymin``).
    """
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"VOC annotation {str(path)!r} does not exist")
    try:
        root = ET.parse(path).getroot()
    except ET.ParseError as err:
        raise ValueError(f"VOC annotation {str(path)!r} is not valid XML ({err}); re-extract the dataset") from err
    size = root.find("size")
    width = int(float(_text(size, "width", path, False) or 0)) if size is not None else 0
    height = int(float(_text(size, "height", path, False) or 0)) if size is not None else 0
    boxes, labels, difficult = [], [], []
    for obj in root.iter("object"):
        name = _text(obj, "name", path)
        assert name is not None
        if name not in _LABEL_OF:
            raise ValueError(
                f"VOC annotation {str(path)!r}: unknown class {name!r}; expected one of {list(VOC_CLASSES)}"
            )
        bndbox = obj.find("bndbox")
        if bndbox is None:
            raise ValueError(f"VOC annotation {str(path)!r}: object {name!r} has no <bndbox>")
        xmin, ymin, xmax, ymax = (float(_text(bndbox, t, path) or 0) for t in ("xmin", "ymin", "xmax", "ymax"))
        if xmax < xmin or ymax < ymin:
            raise ValueError(
                f"VOC annotation {str(path)!r}: object {name!r} has an empty box {(xmin, ymin, xmax, ymax)}"
            )
        boxes.append((xmin - 1.0, ymin - 1.0, xmax, ymax))  # 1-based inclusive pixels -> 0-based pixel edges
        labels.append(_LABEL_OF[name])
        difficult.append(int(float(_text(obj, "difficult", path, False) or 0)) != 0)
    return VOCAnnotation(
        boxes=torch.tensor(boxes, dtype=torch.float32).reshape(-1, 4),
        labels=torch.tensor(labels, dtype=torch.int64),
        difficult=torch.tensor(difficult, dtype=torch.bool),
        width=width,
        height=height,
    )


def resolve_voc_root(root: str | Path, year: str = "2007") -> Path:
    """The ``VOC<year>`` folder (with ``JPEGImages/``, ``Annotations/``, ``ImageSets/Main/``).

    ``root`` may be that folder itself, its parent (``<root>/VOC2007``), or the folder above
    ``VOCdevkit`` (``<root>/VOCdevkit/VOC2007``, torchvision's ``VOCDetection`` layout).

    Raises:
        FileNotFoundError: none of these exists, naming the paths tried.
    """
    root = Path(root)
    tried = [root, root / f"VOC{year}", root / "VOCdevkit" / f"VOC{year}"]
    for candidate in tried:
        if (candidate / "Annotations").is_dir() and (candidate / "JPEGImages").is_dir():
            return candidate
    raise FileNotFoundError(
        f"no PASCAL VOC {year} folder at {str(root)!r}: looked for Annotations/ and JPEGImages/ in "
        f"{[str(p) for p in tried]}. Set `data.root` to the VOCdevkit folder of the extracted "
        f"VOCtrainval/VOCtest archives (layout VOCdevkit/VOC{year}/{{JPEGImages,Annotations,ImageSets/Main}})."
    )
