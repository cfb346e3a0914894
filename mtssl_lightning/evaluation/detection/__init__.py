"""PASCAL VOC 2007 detection transfer: Faster R-CNN with block 3 as backbone and block 4 per RoI.

One concern per module:

* :mod:`~.voc`: the on-disk format: :data:`VOC_CLASSES`, :func:`parse_voc_annotation` (one XML
  file), :func:`resolve_voc_root` (the standard VOC folder layout, what torchvision's
  ``VOCDetection`` reads);
* :mod:`~.data`: :class:`VOCDetectionDataset` / :class:`VOCDetectionDataModule`: images resized
  on CPU workers so that the shorter side is ``image_size``; batches are :class:`VOCBatch`
  (lists, since image sizes differ);
* :mod:`~.metrics`: :func:`match_detections`, :func:`voc07_ap`, :func:`voc_ap`, :func:`voc_map`,
  :class:`VOCMeanAP`: the PASCAL VOC evaluation (IoU ≥ 0.5, each detection assigned to its
  highest-IoU ground-truth box, greedy by score, "difficult" boxes neither rewarded nor
  penalised), with the VOC2007 11-point interpolated AP that VOC07 papers report;
* :mod:`~.model`: :class:`FasterRCNNDetector`, the LightningModule. Logs ``val/mAP50``
  (torchmetrics / pycocotools, 101-point COCO-style interpolation at IoU 0.5, with VOC's
  difficult handling applied beforehand) and ``val/mAP50_voc07`` (the VOC07 11-point metric; the
  one to compare with the paper's 70.5), likewise ``test/…``.

Every public name is importable from this package too (``mtssl_lightning.evaluation.detection``).
"""

from mtssl_lightning.evaluation.detection.data import (
    VOCBatch,
    VOCDetectionDataModule,
    VOCDetectionDataset,
    VOCSample,
    resized_shape,
)
from mtssl_lightning.evaluation.detection.metrics import (
    DetectionMatches,
    VOCMeanAP,
    VOCResult,
    drop_difficult,
    match_detections,
    voc07_ap,
    voc_ap,
    voc_map,
)
from mtssl_lightning.evaluation.detection.model import FasterRCNNDetector
from mtssl_lightning.evaluation.detection.voc import VOC_CLASSES, VOCAnnotation, parse_voc_annotation, resolve_voc_root

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
