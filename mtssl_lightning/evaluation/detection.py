"""PASCAL VOC 2007 detection transfer: Faster R-CNN with block 3 as backbone and block 4 per RoI.

The paper's detection protocol (Doersch & Zisserman 2017, following He et al.'s ResNet
Faster R-CNN): the pretrained trunk up to block 3 computes one stride-16 feature map for the
whole image; the RPN proposes boxes on it; every proposal is RoI-aligned to 14×14, runs through a
freshly initialised block 4 (stride 2 → 7×7), is average-pooled and classified/regressed by a
linear predictor. The whole network is fine-tuned (``frozen: false``); ``frozen: true`` keeps the
trunk's weights and BN statistics fixed and trains only the RPN, block 4 and the predictor.

Pieces (each usable on its own):

* :func:`parse_voc_annotation` / :class:`VOCDetectionDataset` / :class:`VOCDetectionDataModule`:
  the standard VOC folder layout (what torchvision's ``VOCDetection`` reads), XML parsed here;
  images resized on CPU workers so that the shorter side is ``image_size``; batches are
  :class:`VOCBatch` (lists, since image sizes differ).
* :func:`match_detections`, :func:`voc07_ap`, :func:`voc_ap`, :func:`voc_map`,
  :class:`VOCMeanAP`: the PASCAL VOC evaluation (IoU ≥ 0.5, each detection assigned to its
  highest-IoU ground-truth box, greedy by score, "difficult" boxes neither rewarded nor
  penalised), with the VOC2007 11-point interpolated AP that VOC07 papers report.
* :class:`FasterRCNNDetector`: the LightningModule. Logs ``val/mAP50`` (torchmetrics /
  pycocotools, 101-point COCO-style interpolation at IoU 0.5, with VOC's difficult handling
  applied beforehand) and ``val/mAP50_voc07`` (the VOC07 11-point metric; the one to compare
  with the paper's 70.5), likewise ``test/…``.

Box convention: VOC's ``xmin, ymin, xmax, ymax`` are 1-based inclusive pixel indices; we store
continuous 0-based pixel-edge coordinates ``(xmin - 1, ymin - 1, xmax, ymax)``, so that
``width = xmax - xmin + 1`` as in the VOC devkit and plain IoU of our boxes equals the devkit's
"+1" IoU of the raw annotations.
"""

from __future__ import annotations

import logging
import warnings
import xml.etree.ElementTree as ET
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import lightning.pytorch as pl
import numpy as np
import torch
from lightning.pytorch.cli import LRSchedulerCallable, OptimizerCallable
from PIL import Image
from torch import Tensor, nn
from torch.utils.data import DataLoader, Dataset
from torchmetrics import Metric
from torchmetrics.detection import MeanAveragePrecision
from torchmetrics.utilities import dim_zero_cat
from torchvision.models.detection import FasterRCNN
from torchvision.models.detection.anchor_utils import AnchorGenerator
from torchvision.models.detection.faster_rcnn import FastRCNNPredictor
from torchvision.ops import MultiScaleRoIAlign

from mtssl_lightning.data.datamodule import init_worker
from mtssl_lightning.evaluation.backbone import SavesTrunkSpec, TrunkRepresentation, pretrained_trunk
from mtssl_lightning.trunks.base import Trunk

log = logging.getLogger(__name__)

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


# ----------------------------------------------------------------------------------- data


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


@dataclass
class VOCSample:
    """One image and its objects after resizing (and the training flip).

    Attributes:
        image: ``(3, H, W)`` ``uint8`` RGB, shorter side ``image_size`` (unless capped by ``max_size``).
        boxes: ``(N, 4)`` ``float32`` ``(x1, y1, x2, y2)`` in the resized image's pixel-edge coordinates.
        labels: ``(N,)`` ``int64`` in ``1..20``.
        difficult: ``(N,)`` ``bool``.
        index: position of the image in the dataset's split.
    """

    image: Tensor
    boxes: Tensor
    labels: Tensor
    difficult: Tensor
    index: int


@dataclass
class VOCBatch:
    """A batch of detection samples; lists because the images differ in size.

    Attributes:
        images: ``B`` tensors ``(3, H_i, W_i)`` ``uint8`` RGB (turned into floats in [0, 1] on the device).
        boxes: ``B`` tensors ``(N_i, 4)`` ``float32`` ``(x1, y1, x2, y2)`` in pixels of ``images[i]``.
        labels: ``B`` tensors ``(N_i,)`` ``int64`` in ``1..20``.
        difficult: ``B`` tensors ``(N_i,)`` ``bool``.
        index: ``(B,)`` ``int64`` position of each image in its split.
        skipped: images the worker could not decode while making this batch (each warned about
            once and left out of the batch).
    """

    images: list[Tensor]
    boxes: list[Tensor]
    labels: list[Tensor]
    difficult: list[Tensor]
    index: Tensor
    skipped: int = 0

    def __len__(self) -> int:
        return len(self.images)

    @staticmethod
    def collate(samples: list[VOCSample | None]) -> VOCBatch:
        """Gather samples into a batch; ``None`` (an undecodable image) is dropped and counted."""
        good = [s for s in samples if s is not None]
        return VOCBatch(
            images=[s.image for s in good],
            boxes=[s.boxes for s in good],
            labels=[s.labels for s in good],
            difficult=[s.difficult for s in good],
            index=torch.tensor([s.index for s in good], dtype=torch.int64),
            skipped=len(samples) - len(good),
        )


def resized_shape(height: int, width: int, size: int, max_size: int | None) -> tuple[int, int]:
    """``(H', W')`` with the shorter side ``size``, shrunk further so the longer side stays ≤ ``max_size``."""
    scale = size / min(height, width)
    if max_size is not None:
        scale = min(scale, max_size / max(height, width))
    return max(1, round(height * scale)), max(1, round(width * scale))


class VOCDetectionDataset(Dataset):
    """A PASCAL VOC split (``ImageSets/Main/<split>.txt``) with every annotation parsed up front.

    Args:
        root: the ``VOC<year>`` folder or a folder above it (see :func:`resolve_voc_root`).
        split: name of the image-set file (``trainval``, ``test``, ``train``, ``val``).
        image_size: shorter side after resizing (pixels).
        max_size: cap on the longer side after resizing (``None``: no cap).
        hflip: flip each image (and its boxes) horizontally with probability 1/2 (training).
        year: the ``VOC<year>`` folder name.

    Raises:
        FileNotFoundError: the VOC folder, the split file, an annotation or an image file is
            missing (the message names the path).
        ValueError: an annotation is malformed (see :func:`parse_voc_annotation`) or the split is empty.

    Item ``i`` is a :class:`VOCSample`, or ``None`` when the image cannot be decoded (warned
    about once; :meth:`VOCBatch.collate` drops and counts it).
    """

    def __init__(
        self,
        root: str | Path,
        split: str = "trainval",
        image_size: int = 600,
        max_size: int | None = 1000,
        hflip: bool = False,
        year: str = "2007",
    ) -> None:
        self.voc_root = resolve_voc_root(root, year)
        split_file = self.voc_root / "ImageSets" / "Main" / f"{split}.txt"
        if not split_file.is_file():
            main = self.voc_root / "ImageSets" / "Main"
            found = sorted(p.stem for p in main.glob("*.txt") if "_" not in p.stem) if main.is_dir() else []
            raise FileNotFoundError(
                f"VOC split file {str(split_file)!r} does not exist; splits found there: {found or 'none'}. "
                "(The `test` split comes with the separate VOC2007 test archive, extracted into the same VOCdevkit.)"
            )
        self.ids = [line.split()[0] for line in split_file.read_text().splitlines() if line.strip()]
        if not self.ids:
            raise ValueError(f"VOC split file {str(split_file)!r} lists no images")
        self.split, self.image_size, self.max_size, self.hflip = split, image_size, max_size, hflip
        self.image_paths = [self.voc_root / "JPEGImages" / f"{i}.jpg" for i in self.ids]
        missing = [str(p) for p in self.image_paths if not p.is_file()]
        if missing:
            raise FileNotFoundError(
                f"{len(missing)} image(s) of split {split!r} missing from {str(self.voc_root / 'JPEGImages')!r}, "
                f"e.g. {missing[:3]}; is the dataset fully extracted?"
            )
        # parsed once here, so bad annotations fail at set-up rather than hours into training
        self.annotations = [parse_voc_annotation(self.voc_root / "Annotations" / f"{i}.xml") for i in self.ids]
        self.bad: set[int] = set()  # per worker process: images that failed to decode

    def __len__(self) -> int:
        return len(self.ids)

    def __getitem__(self, index: int) -> VOCSample | None:
        path = self.image_paths[index]
        if index in self.bad:
            return None
        try:
            with Image.open(path) as file:
                image = file.convert("RGB")
        except Exception as err:  # noqa: BLE001 - any decoder error means "skip this file"
            self.bad.add(index)
            warnings.warn(f"skipping unreadable VOC image {str(path)!r}: {err}", stacklevel=2)
            return None
        ann = self.annotations[index]
        height, width = resized_shape(image.height, image.width, self.image_size, self.max_size)
        scale = torch.tensor([width / image.width, height / image.height] * 2, dtype=torch.float32)
        image = image.resize((width, height), Image.BILINEAR)  # PIL filters (antialiases) when shrinking
        pixels = torch.from_numpy(np.asarray(image, dtype=np.uint8).copy()).permute(2, 0, 1).contiguous()
        boxes = ann.boxes * scale
        if self.hflip and bool(torch.rand(()) < 0.5):  # torch's RNG: seeded per worker and by seed_everything
            pixels = pixels.flip(-1)
            boxes = torch.stack([width - boxes[:, 2], boxes[:, 1], width - boxes[:, 0], boxes[:, 3]], dim=1)
        return VOCSample(
            image=pixels, boxes=boxes, labels=ann.labels.clone(), difficult=ann.difficult.clone(), index=index
        )


class VOCDetectionDataModule(pl.LightningDataModule):
    """PASCAL VOC detection data: train on ``train_split``, validate on ``val_split``, test on ``test_split``.

    Args:
        root: the ``VOCdevkit`` folder (or ``VOC2007`` itself, or the folder above ``VOCdevkit``).
        year: ``VOC<year>`` folder to read.
        train_split, val_split: image-set names (``ImageSets/Main/<name>.txt``). VOC07 papers
            train on ``trainval`` and report on ``test``.
        test_split: image set of ``mtssl test`` (default: ``val_split``).
        image_size: shorter image side after resizing (Faster R-CNN on VOC: 600).
        max_size: cap on the longer side (Faster R-CNN on VOC: 1000).
        batch_size: images per step (and per evaluation batch).
        num_workers: DataLoader workers (decoding and resizing happen there).
        hflip: random horizontal flips for training.
    """

    def __init__(
        self,
        root: str = "data/VOCdevkit",
        year: str = "2007",
        train_split: str = "trainval",
        val_split: str = "test",
        test_split: str | None = None,
        image_size: int = 600,
        max_size: int | None = 1000,
        batch_size: int = 2,
        num_workers: int = 4,
        hflip: bool = True,
    ) -> None:
        super().__init__()
        if image_size < 1 or batch_size < 1 or num_workers < 0:
            raise ValueError(
                f"`image_size` and `batch_size` must be positive and `num_workers` >= 0, got "
                f"{image_size}, {batch_size}, {num_workers}"
            )
        self.root, self.year = root, year
        self.train_split, self.val_split = train_split, val_split
        self.test_split = val_split if test_split is None else test_split
        self.image_size, self.max_size = image_size, max_size
        self.batch_size, self.num_workers, self.hflip = batch_size, num_workers, hflip
        self.datasets: dict[str, VOCDetectionDataset] = {}

    def _dataset(self, split: str, train: bool) -> VOCDetectionDataset:
        key = f"{split}/{'train' if train else 'eval'}"
        if key not in self.datasets:
            self.datasets[key] = VOCDetectionDataset(
                self.root, split, self.image_size, self.max_size, hflip=train and self.hflip, year=self.year
            )
            log.info("VOC%s %s: %d images", self.year, split, len(self.datasets[key]))
        return self.datasets[key]

    def setup(self, stage: str | None = None) -> None:
        # built (and every annotation checked) before any step runs
        if stage in (None, "fit"):
            self._dataset(self.train_split, True)
        if stage in (None, "fit", "validate"):
            self._dataset(self.val_split, False)
        if stage in (None, "test"):
            self._dataset(self.test_split, False)

    def _loader(self, dataset: VOCDetectionDataset, train: bool) -> DataLoader:
        return DataLoader(
            dataset,
            batch_size=self.batch_size,
            shuffle=train,
            drop_last=train,
            num_workers=self.num_workers,
            collate_fn=VOCBatch.collate,
            worker_init_fn=init_worker,  # workers ignore SIGTERM: the pre-emption checkpoint is saved first
            pin_memory=torch.cuda.is_available(),
            persistent_workers=self.num_workers > 0,
        )

    def train_dataloader(self) -> DataLoader:
        return self._loader(self._dataset(self.train_split, True), True)

    def val_dataloader(self) -> DataLoader:
        return self._loader(self._dataset(self.val_split, False), False)

    def test_dataloader(self) -> DataLoader:
        return self._loader(self._dataset(self.test_split, False), False)


# ------------------------------------------------------------------------------ evaluation


@dataclass
class DetectionMatches:
    """VOC's assignment of detections to ground truth (see :func:`match_detections`).

    Attributes:
        true_positive: ``(D,)`` ``bool``: the detection is the highest-scoring one assigned to a
            non-difficult ground-truth box.
        ignored: ``(D,)`` ``bool``: assigned to a difficult box (VOC counts it neither way).
        gt_index: ``(D,)`` ``int64`` assigned ground-truth box (``-1``: IoU below threshold with all).
        iou: ``(D,)`` IoU with the best same-class ground-truth box of the image (0 if none).
    """

    true_positive: Tensor
    ignored: Tensor
    gt_index: Tensor
    iou: Tensor


def _pairwise_iou(a: Tensor, b: Tensor) -> Tensor:
    """IoU of box pairs: ``a`` ``(..., 4)`` and ``b`` ``(..., 4)`` (broadcast) → ``(...)``."""
    lt = torch.maximum(a[..., :2], b[..., :2])
    rb = torch.minimum(a[..., 2:], b[..., 2:])
    inter = (rb - lt).clamp(min=0).prod(-1)
    area_a = (a[..., 2:] - a[..., :2]).clamp(min=0).prod(-1)
    area_b = (b[..., 2:] - b[..., :2]).clamp(min=0).prod(-1)
    union = area_a + area_b - inter
    return torch.where(union > 0, inter / union.clamp(min=torch.finfo(union.dtype).tiny), torch.zeros_like(union))


def match_detections(
    det_boxes: Tensor,
    det_scores: Tensor,
    det_labels: Tensor,
    det_images: Tensor,
    gt_boxes: Tensor,
    gt_labels: Tensor,
    gt_difficult: Tensor,
    gt_images: Tensor,
    iou_threshold: float = 0.5,
) -> DetectionMatches:
    """The PASCAL VOC matching rule over a whole set of images at once.

    Each detection is assigned to the ground-truth box of its image and class with the largest
    IoU (difficult boxes included). If that IoU is ≥ ``iou_threshold``: a difficult box makes the
    detection *ignored*; otherwise it is a true positive if no higher-scoring detection was
    assigned to the same box (a duplicate is a false positive). Below the threshold: false
    positive. Because the assignment does not depend on the order, "greedy by score" reduces to
    "first in score order per box", computed without a loop.

    Args:
        det_boxes: ``(D, 4)`` ``(x1, y1, x2, y2)``; det_scores ``(D,)``; det_labels ``(D,)`` int;
            det_images ``(D,)`` int id of each detection's image.
        gt_boxes: ``(G, 4)``; gt_labels ``(G,)``; gt_difficult ``(G,)`` bool; gt_images ``(G,)``.
        iou_threshold: VOC's 0.5 (``>=``, as in the official MATLAB devkit).
    """
    device = det_boxes.device
    num_det, num_gt = det_boxes.shape[0], gt_boxes.shape[0]
    gt_index = torch.full((num_det,), -1, dtype=torch.int64, device=device)
    best_iou = torch.zeros(num_det, dtype=torch.float32, device=device)
    if num_det and num_gt:
        # one integer key per (image, class); group the ground truth by it
        _, image_ids = torch.unique(torch.cat([det_images, gt_images]), return_inverse=True)
        num_labels = int(torch.cat([det_labels, gt_labels]).max()) + 1
        det_key = image_ids[:num_det] * num_labels + det_labels
        gt_key = image_ids[num_det:] * num_labels + gt_labels
        gt_key_sorted, gt_order = torch.sort(gt_key, stable=True)
        start = torch.searchsorted(gt_key_sorted, det_key, right=False)
        count = torch.searchsorted(gt_key_sorted, det_key, right=True) - start
        width = int(count.max())
        if width > 0:
            slot = torch.arange(width, device=device)
            valid = slot[None, :] < count[:, None]  # (D, K): candidate k of detection d exists
            candidates = gt_order[(start[:, None] + slot[None, :]).clamp(max=num_gt - 1)]  # (D, K)
            iou = _pairwise_iou(det_boxes[:, None, :].float(), gt_boxes[candidates].float())
            iou = torch.where(valid, iou, torch.full_like(iou, -1.0))
            best_iou, best = iou.max(dim=1)  # ties: the first (lowest-index) ground-truth box, like the devkit
            has_gt = count > 0
            best_iou = torch.where(has_gt, best_iou, torch.zeros_like(best_iou))
            gt_index = torch.where(
                has_gt & (best_iou >= iou_threshold), candidates.gather(1, best[:, None])[:, 0], gt_index
            )
    assigned = gt_index >= 0
    safe_index = gt_index.clamp(min=0)
    ignored = assigned & gt_difficult.to(torch.bool)[safe_index] if num_gt else torch.zeros_like(assigned)
    candidate = assigned & ~ignored
    # rank in descending score order (stable: ties keep input order, like the devkit's sort)
    rank = torch.empty(num_det, dtype=torch.int64, device=device)
    rank[torch.argsort(det_scores, descending=True, stable=True)] = torch.arange(num_det, device=device)
    first = torch.full((max(num_gt, 1),), num_det, dtype=torch.int64, device=device)
    first = first.scatter_reduce(0, safe_index[candidate], rank[candidate], reduce="amin")
    true_positive = candidate & (rank == first[safe_index])
    return DetectionMatches(true_positive=true_positive, ignored=ignored, gt_index=gt_index, iou=best_iou)


def voc07_ap(recall: Tensor, precision: Tensor) -> Tensor:
    """VOC2007's 11-point interpolated average precision.

    ``AP = (1/11) Σ_{t ∈ {0, 0.1, …, 1}} max{precision_i : recall_i ≥ t}`` (0 where no point
    reaches ``t``), with ``recall``/``precision`` ``(D,)`` the values after each detection in
    descending score order. Returns a scalar tensor.
    """
    thresholds = torch.linspace(0.0, 1.0, 11, dtype=torch.float64, device=recall.device)
    if recall.numel() == 0:
        return torch.zeros((), dtype=torch.float64, device=recall.device)
    reached = recall.double()[None, :] >= thresholds[:, None] - 1e-12  # (11, D); tolerance for 0.1*k rounding
    best = torch.where(reached, precision.double()[None, :], torch.zeros((), dtype=torch.float64, device=recall.device))
    return best.max(dim=1).values.mean()


def voc_ap(recall: Tensor, precision: Tensor) -> Tensor:
    """VOC2010+ average precision: the area under the monotone (interpolated) precision-recall curve."""
    if recall.numel() == 0:
        return torch.zeros((), dtype=torch.float64, device=recall.device)
    zero, one = recall.new_zeros(1, dtype=torch.float64), recall.new_ones(1, dtype=torch.float64)
    mrec = torch.cat([zero, recall.double(), one])
    mpre = torch.cat([zero, precision.double(), zero])
    mpre = torch.flip(torch.cummax(torch.flip(mpre, [0]), 0).values, [0])  # precision envelope
    return ((mrec[1:] - mrec[:-1]) * mpre[1:]).sum()


@dataclass
class VOCResult:
    """Output of :func:`voc_map`.

    Attributes:
        map: scalar mean of ``ap`` (NaN when no class has a non-difficult ground-truth box).
        ap: ``(K,)`` float64 AP of each class in ``classes``.
        classes: ``(K,)`` labels that have at least one non-difficult ground-truth box.
    """

    map: Tensor
    ap: Tensor
    classes: Tensor


def voc_map(
    det_boxes: Tensor,
    det_scores: Tensor,
    det_labels: Tensor,
    det_images: Tensor,
    gt_boxes: Tensor,
    gt_labels: Tensor,
    gt_difficult: Tensor,
    gt_images: Tensor,
    iou_threshold: float = 0.5,
    use_07_metric: bool = True,
) -> VOCResult:
    """PASCAL VOC mean average precision of detections over a set of images.

    Matching as in :func:`match_detections`; per class, detections of all images sorted by
    score, ignored ones dropped, recall = TP / (non-difficult ground-truth boxes), precision =
    TP / (TP + FP), AP by :func:`voc07_ap` (``use_07_metric``, what VOC2007 papers report) or
    :func:`voc_ap`. Classes with no non-difficult ground truth are left out of the mean.
    Shapes as in :func:`match_detections`.
    """
    matches = match_detections(
        det_boxes, det_scores, det_labels, det_images, gt_boxes, gt_labels, gt_difficult, gt_images, iou_threshold
    )
    counted_gt = ~gt_difficult.to(torch.bool)
    classes = torch.unique(gt_labels[counted_gt])
    ap_of = voc07_ap if use_07_metric else voc_ap
    order = torch.argsort(det_scores, descending=True, stable=True)
    kept = order[~matches.ignored[order]]  # detections that count, in score order
    aps = []
    for label in classes.tolist():  # ≤ 20 classes; the matching above is the batched part
        in_class = kept[det_labels[kept] == label]
        tp = matches.true_positive[in_class].double().cumsum(0)
        fp = (~matches.true_positive[in_class]).double().cumsum(0)
        num_pos = (counted_gt & (gt_labels == label)).sum().double()
        aps.append(ap_of(tp / num_pos, tp / (tp + fp).clamp(min=1e-12)))
    ap = torch.stack(aps) if aps else torch.zeros(0, dtype=torch.float64, device=det_boxes.device)
    mean = ap.mean() if aps else torch.tensor(float("nan"), dtype=torch.float64, device=det_boxes.device)
    return VOCResult(map=mean, ap=ap, classes=classes)


def _flatten(preds: list[dict[str, Tensor]], targets: list[dict[str, Tensor]], image_ids: Tensor) -> tuple[Tensor, ...]:
    """Concatenate per-image predictions/targets into the flat tensors of :func:`match_detections`."""
    device = image_ids.device
    det_counts = torch.tensor([len(p["scores"]) for p in preds], device=device)
    gt_counts = torch.tensor([len(t["labels"]) for t in targets], device=device)
    det_boxes = torch.cat([p["boxes"].reshape(-1, 4) for p in preds]).float()
    gt_boxes = torch.cat([t["boxes"].reshape(-1, 4) for t in targets]).float()
    difficult = [t.get("difficult", torch.zeros_like(t["labels"], dtype=torch.bool)) for t in targets]
    return (
        det_boxes,
        torch.cat([p["scores"] for p in preds]).float(),
        torch.cat([p["labels"] for p in preds]).long(),
        image_ids.repeat_interleave(det_counts),
        gt_boxes,
        torch.cat([t["labels"] for t in targets]).long(),
        torch.cat(difficult).to(torch.bool),
        image_ids.repeat_interleave(gt_counts),
    )


class VOCMeanAP(Metric):
    """Accumulates detections and ground truth over batches and computes :func:`voc_map`.

    ``update(preds, targets)`` takes torchvision's detection format: ``preds[i]`` a dict with
    ``boxes (N_i, 4)``, ``scores (N_i,)``, ``labels (N_i,)``; ``targets[i]`` with ``boxes``,
    ``labels`` and optionally ``difficult (M_i,)`` bool. ``compute()`` returns a :class:`VOCResult`.
    Under DDP every rank's images are kept apart (a padded duplicate counts twice, as in torchmetrics).
    """

    full_state_update = False

    def __init__(self, iou_threshold: float = 0.5, use_07_metric: bool = True, **kwargs: Any) -> None:
        super().__init__(**kwargs)
        self.iou_threshold, self.use_07_metric = iou_threshold, use_07_metric
        for name in (
            "det_boxes",
            "det_scores",
            "det_labels",
            "det_images",
            "gt_boxes",
            "gt_labels",
            "gt_difficult",
            "gt_images",
        ):
            self.add_state(name, default=[], dist_reduce_fx="cat")
        self.add_state("num_images", default=torch.tensor(0), dist_reduce_fx="sum")

    def update(self, preds: list[dict[str, Tensor]], targets: list[dict[str, Tensor]]) -> None:
        if len(preds) != len(targets):
            raise ValueError(f"{len(preds)} predictions but {len(targets)} targets")
        if not preds:
            return
        rank, world = 0, 1
        if torch.distributed.is_available() and torch.distributed.is_initialized():
            rank, world = torch.distributed.get_rank(), torch.distributed.get_world_size()
        local = self.num_images + torch.arange(len(preds), device=self.device)
        image_ids = local * world + rank  # unique across ranks
        self.num_images += len(preds)
        flat = _flatten(preds, targets, image_ids)
        for name, value in zip(
            (
                "det_boxes",
                "det_scores",
                "det_labels",
                "det_images",
                "gt_boxes",
                "gt_labels",
                "gt_difficult",
                "gt_images",
            ),
            flat,
        ):
            getattr(self, name).append(value)

    def compute(self) -> VOCResult:
        def cat(name: str, shape: tuple[int, ...], dtype: torch.dtype) -> Tensor:
            value = getattr(self, name)
            if isinstance(value, list) and not value:
                return torch.zeros(shape, dtype=dtype, device=self.device)
            return dim_zero_cat(value)

        return voc_map(
            cat("det_boxes", (0, 4), torch.float32),
            cat("det_scores", (0,), torch.float32),
            cat("det_labels", (0,), torch.int64),
            cat("det_images", (0,), torch.int64),
            cat("gt_boxes", (0, 4), torch.float32),
            cat("gt_labels", (0,), torch.int64),
            cat("gt_difficult", (0,), torch.bool),
            cat("gt_images", (0,), torch.int64),
            self.iou_threshold,
            self.use_07_metric,
        )


def drop_difficult(
    preds: list[dict[str, Tensor]], targets: list[dict[str, Tensor]], iou_threshold: float = 0.5
) -> tuple[list[dict[str, Tensor]], list[dict[str, Tensor]]]:
    """VOC's difficult rule made explicit, for a COCO-style evaluator that has none.

    Removes the detections VOC would ignore (assigned to a difficult box, see
    :func:`match_detections`) and the difficult boxes themselves. What remains is scored by
    COCO-style matching (a detection may take its best *unmatched* box), which can differ from
    VOC's on crowded duplicates; :func:`voc_map` is the exact VOC metric.
    """
    if not preds:
        return preds, targets
    device = preds[0]["boxes"].device
    image_ids = torch.arange(len(preds), device=device)
    flat = _flatten(preds, targets, image_ids)
    ignored = match_detections(*flat, iou_threshold=iou_threshold).ignored
    keep_det = (~ignored).split([len(p["scores"]) for p in preds])
    new_preds = [{k: v[keep] for k, v in p.items()} for p, keep in zip(preds, keep_det)]
    new_targets = []
    for t in targets:
        keep = ~t["difficult"].to(torch.bool) if "difficult" in t else torch.ones_like(t["labels"], dtype=torch.bool)
        new_targets.append({k: v[keep] for k, v in t.items() if k != "difficult"})
    return new_preds, new_targets


# ---------------------------------------------------------------------------------- model


def _block4_head(trunk: Trunk) -> nn.Sequential:
    """Fresh block 4 (stride 2: 14×14 RoIs → 7×7) then global average pooling → ``(R, C4)``."""
    next_block = getattr(trunk, "next_block", None)
    if next_block is None:
        raise ValueError(
            f"the per-RoI head is the trunk's block 4 (`next_block`), which {type(trunk).__name__} does not "
            "provide; use a ResNetV2 trunk (mtssl_lightning.trunks.ResNetV2) cut after block 3"
        )
    block = next_block(stride=2)
    head = nn.Sequential(block, nn.AdaptiveAvgPool2d(1), nn.Flatten(1))
    head.out_channels = block.out_channels  # type: ignore[assignment]
    return head


class FasterRCNNDetector(SavesTrunkSpec, pl.LightningModule):
    """Faster R-CNN on the pretrained trunk: block 3 as backbone, a fresh block 4 as per-RoI head.

    Args:
        checkpoint: ``mtssl fit`` checkpoint or trunk export whose trunk to transfer (``None``:
            ``trunk`` as initialised, the random-init baseline).
        trunk: the trunk used when ``checkpoint`` is ``None`` (a ResNetV2 cut after block 3).
        frozen: keep the trunk fixed (weights and BN statistics); otherwise fine-tune it.
        num_classes: classes including background (VOC: 20 + 1).
        min_size, max_size: image resizing of torchvision's ``GeneralizedRCNNTransform``; keep
            them equal to the DataModule's ``image_size``/``max_size`` (then it resizes nothing).
        anchor_sizes, aspect_ratios: RPN anchors on the single stride-16 feature map (every
            size with every ratio).
        roi_size: RoIAlign output (14, so block 4's stride 2 gives 7×7, as in ResNet Faster R-CNN).
        rpn_pre_nms_top_n_train, rpn_pre_nms_top_n_test, rpn_post_nms_top_n_train,
        rpn_post_nms_top_n_test, rpn_batch_size_per_image, box_batch_size_per_image,
        box_score_thresh, box_nms_thresh, box_detections_per_img: torchvision's
            ``FasterRCNN`` arguments of the same names.
        train_difficult: train on boxes marked difficult too (py-faster-rcnn's default: no).
        optimizer: builds the optimizer from the trainable parameters (default SGD, lr 0.005,
            momentum 0.9, weight decay 1e-4).
        lr_scheduler: optional, stepped every training step.
        warmup_steps: linear learning-rate warm-up from 0.001× over this many steps (0: none),
            applied on top of ``lr_scheduler``.

    Training logs ``train/loss`` (the sum) and each torchvision loss (``train/loss_classifier``,
    ``train/loss_box_reg``, ``train/loss_objectness``, ``train/loss_rpn_box_reg``); evaluation
    logs ``{val,test}/mAP50`` (torchmetrics, COCO-style 101-point AP at IoU 0.5 after VOC's
    difficult rule) and ``{val,test}/mAP50_voc07`` (VOC07 11-point AP), plus per-class
    ``test/AP50_voc07/<class>``.
    """

    def __init__(
        self,
        checkpoint: str | None = None,
        trunk: Trunk | None = None,
        frozen: bool = False,
        num_classes: int = 21,
        min_size: int = 600,
        max_size: int = 1000,
        anchor_sizes: list[int] | None = None,
        aspect_ratios: list[float] | None = None,
        roi_size: int = 14,
        rpn_pre_nms_top_n_train: int = 2000,
        rpn_pre_nms_top_n_test: int = 1000,
        rpn_post_nms_top_n_train: int = 2000,
        rpn_post_nms_top_n_test: int = 1000,
        rpn_batch_size_per_image: int = 256,
        box_batch_size_per_image: int = 512,
        box_score_thresh: float = 0.05,
        box_nms_thresh: float = 0.5,
        box_detections_per_img: int = 100,
        train_difficult: bool = False,
        optimizer: OptimizerCallable | None = None,
        lr_scheduler: LRSchedulerCallable | None = None,
        warmup_steps: int = 0,
    ) -> None:
        super().__init__()
        self.save_hyperparameters(ignore=["trunk", "optimizer", "lr_scheduler"])
        if num_classes < 2:
            raise ValueError(f"`num_classes` counts the background too and must be >= 2, got {num_classes}")
        if warmup_steps < 0:
            raise ValueError(f"`warmup_steps` must be >= 0, got {warmup_steps}")
        anchor_sizes = [32, 64, 128, 256, 512] if anchor_sizes is None else list(anchor_sizes)
        aspect_ratios = [0.5, 1.0, 2.0] if aspect_ratios is None else list(aspect_ratios)
        trunk = pretrained_trunk(checkpoint, trunk)
        box_head = _block4_head(trunk)  # built from the trunk's spec before freezing (fresh weights either way)
        backbone = TrunkRepresentation(
            trunk, frozen=frozen
        )  # has .out_channels; FasterRCNN wraps its tensor as {"0": …}
        predictor = FastRCNNPredictor(box_head.out_channels, num_classes)
        # py-faster-rcnn's initialisation of the final layers
        nn.init.normal_(predictor.cls_score.weight, std=0.01)
        nn.init.normal_(predictor.bbox_pred.weight, std=0.001)
        nn.init.zeros_(predictor.cls_score.bias)
        nn.init.zeros_(predictor.bbox_pred.bias)
        self.model = FasterRCNN(
            backbone,
            num_classes=None,
            min_size=min_size,
            max_size=max_size,
            image_mean=[0.0, 0.0, 0.0],  # the trunk normalises its [0, 1] input itself
            image_std=[1.0, 1.0, 1.0],
            rpn_anchor_generator=AnchorGenerator((tuple(anchor_sizes),), (tuple(aspect_ratios),)),
            rpn_pre_nms_top_n_train=rpn_pre_nms_top_n_train,
            rpn_pre_nms_top_n_test=rpn_pre_nms_top_n_test,
            rpn_post_nms_top_n_train=rpn_post_nms_top_n_train,
            rpn_post_nms_top_n_test=rpn_post_nms_top_n_test,
            rpn_batch_size_per_image=rpn_batch_size_per_image,
            box_roi_pool=MultiScaleRoIAlign(featmap_names=["0"], output_size=roi_size, sampling_ratio=2),
            box_head=box_head,
            box_predictor=predictor,
            box_score_thresh=box_score_thresh,
            box_nms_thresh=box_nms_thresh,
            box_detections_per_img=box_detections_per_img,
            box_batch_size_per_image=box_batch_size_per_image,
        )
        self.frozen, self.train_difficult = frozen, train_difficult
        self.optimizer_factory, self.scheduler_factory, self.warmup_steps = optimizer, lr_scheduler, warmup_steps
        self.map_coco = MeanAveragePrecision(
            iou_type="bbox", box_format="xyxy", iou_thresholds=[0.5], backend="pycocotools"
        )
        self.map_voc = VOCMeanAP(iou_threshold=0.5, use_07_metric=True)
        self._skipped_files = 0

    @property
    def trunk(self) -> Trunk:
        """The transferred trunk (inside the detector's backbone)."""
        return self.model.backbone.trunk

    @staticmethod
    def _images(batch: VOCBatch) -> list[Tensor]:
        return [image.float().div_(255.0) for image in batch.images]

    def forward(self, images: list[Tensor]) -> list[dict[str, Tensor]]:
        """Detections of ``images`` (each ``(3, H_i, W_i)`` float in [0, 1]), in eval mode.

        Returns per image ``{"boxes": (N, 4) xyxy pixels, "labels": (N,), "scores": (N,)}``.
        """
        return self.model(images)

    def training_step(self, batch: VOCBatch, batch_idx: int) -> Tensor | None:
        self._skipped_files += batch.skipped
        if batch.skipped:
            self.log("train/skipped_files", float(self._skipped_files), on_step=True, on_epoch=False, batch_size=1)
        if len(batch) == 0:
            return None  # every image of the batch was undecodable: skip the step
        targets = []
        for boxes, labels, difficult in zip(batch.boxes, batch.labels, batch.difficult):
            keep = torch.ones_like(difficult) if self.train_difficult else ~difficult
            targets.append({"boxes": boxes[keep], "labels": labels[keep]})
        losses = self.model(self._images(batch), targets)
        loss = sum(losses.values())
        n = len(batch)
        for name, value in losses.items():
            self.log(f"train/{name}", value, on_step=True, on_epoch=True, batch_size=n)
        self.log("train/loss", loss, on_step=True, on_epoch=True, prog_bar=True, batch_size=n)
        return loss

    # ----------------------------------------------------------------------- evaluation
    def _reset_metrics(self) -> None:
        self.map_coco.reset()
        self.map_voc.reset()

    def on_validation_epoch_start(self) -> None:
        self._reset_metrics()

    def on_test_epoch_start(self) -> None:
        self._reset_metrics()

    def _eval_step(self, batch: VOCBatch) -> None:
        if len(batch) == 0:
            return
        preds = self.model(self._images(batch))
        targets = [
            {"boxes": b, "labels": lab, "difficult": d} for b, lab, d in zip(batch.boxes, batch.labels, batch.difficult)
        ]
        self.map_voc.update(preds, targets)
        self.map_coco.update(*drop_difficult(preds, targets))

    def validation_step(self, batch: VOCBatch, batch_idx: int) -> None:
        self._eval_step(batch)

    def test_step(self, batch: VOCBatch, batch_idx: int) -> None:
        self._eval_step(batch)

    def _log_metrics(self, stage: str) -> None:
        coco = self.map_coco.compute()
        voc = self.map_voc.compute()
        # sync_dist=False: both metrics already gathered every rank's images
        self.log(f"{stage}/mAP50", coco["map"].float(), prog_bar=True)
        self.log(f"{stage}/mAP50_voc07", voc.map.float(), prog_bar=True)
        if stage == "test":
            # torchmetrics squeezes one-element results to scalars; reshape(-1) undoes that
            for label, ap in zip(voc.classes.reshape(-1).tolist(), voc.ap.reshape(-1)):
                if 1 <= label <= len(VOC_CLASSES) and self.hparams.num_classes == len(VOC_CLASSES) + 1:
                    self.log(f"test/AP50_voc07/{VOC_CLASSES[label - 1]}", ap.float())
        self._reset_metrics()

    def on_validation_epoch_end(self) -> None:
        self._log_metrics("val")

    def on_test_epoch_end(self) -> None:
        self._log_metrics("test")

    # ----------------------------------------------------------------------- optimisation
    def configure_optimizers(self) -> Any:
        params = [p for p in self.parameters() if p.requires_grad]  # a frozen trunk contributes none
        if self.optimizer_factory is None:
            optimizer: torch.optim.Optimizer = torch.optim.SGD(params, lr=0.005, momentum=0.9, weight_decay=1e-4)
        else:
            optimizer = self.optimizer_factory(params)
        schedulers = []
        if self.scheduler_factory is not None:
            schedulers.append(self.scheduler_factory(optimizer))
        if self.warmup_steps > 0:
            # chainable: multiplies whatever the user's schedule sets, for the first warmup_steps
            schedulers.append(torch.optim.lr_scheduler.LinearLR(optimizer, 0.001, 1.0, total_iters=self.warmup_steps))
        if not schedulers:
            return optimizer
        scheduler = (
            schedulers[0] if len(schedulers) == 1 else torch.optim.lr_scheduler.ChainedScheduler(schedulers, optimizer)
        )
        return {"optimizer": optimizer, "lr_scheduler": {"scheduler": scheduler, "interval": "step"}}


__all__ = [
    "VOC_CLASSES",
    "DetectionMatches",
    "FasterRCNNDetector",
    "VOCAnnotation",
    "VOCBatch",
    "VOCDetectionDataModule",
    "VOCDetectionDataset",
    "VOCMeanAP",
    "VOCResult",
    "VOCSample",
    "drop_difficult",
    "match_detections",
    "parse_voc_annotation",
    "resized_shape",
    "resolve_voc_root",
    "voc07_ap",
    "voc_ap",
    "voc_map",
]
