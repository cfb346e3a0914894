"""Transfer evaluation of a pretrained trunk (the paper's claims are about transfer).

One sub-package (kNN: one file) per protocol, each a LightningModule + DataModule run by
``mtssl fit/validate/test`` with a config from ``configs/eval/`` that takes ``model.checkpoint``:

* :mod:`~mtssl_lightning.evaluation.classification`: frozen linear probe (block 3, or block 4 +
  linear) and fine-tuning on image folders (ImageNet's layout), CIFAR-10/100, STL-10 on disk,
  scikit-learn's bundled digits;
* :mod:`~mtssl_lightning.evaluation.knn`: kNN accuracy (cosine, weighted vote) as a metric, a
  callback for online use during pretraining, and an offline module;
* :mod:`~mtssl_lightning.evaluation.detection`: PASCAL VOC07 Faster R-CNN (block 3 backbone,
  block 4 per RoI), mAP@0.5 (torchmetrics and VOC07 11-point);
* :mod:`~mtssl_lightning.evaluation.depth`: NYU depth v2 (labelled .mat/HDF5, PNG folders,
  DenseDepth CSVs) with an up-projection decoder, berHu/L1, δ-thresholds, abs-rel, RMSE;
* :mod:`~mtssl_lightning.evaluation.backbone`: loading (``weights_only=True``) and freezing the
  trunk, shared by all of them.
"""

from mtssl_lightning.evaluation.backbone import TrunkRepresentation, freeze, pretrained_trunk
from mtssl_lightning.evaluation.classification import ClassificationDataModule, ImageClassifier, LabelledBatch
from mtssl_lightning.evaluation.depth import DepthEstimator, DepthMetrics, NYUDepthDataModule
from mtssl_lightning.evaluation.detection import FasterRCNNDetector, VOCDetectionDataModule, VOCMeanAP
from mtssl_lightning.evaluation.knn import KNNAccuracy, KNNClassifier, KNNEvaluation, knn_predict

__all__ = [
    "ClassificationDataModule",
    "DepthEstimator",
    "DepthMetrics",
    "FasterRCNNDetector",
    "ImageClassifier",
    "KNNAccuracy",
    "KNNClassifier",
    "KNNEvaluation",
    "LabelledBatch",
    "NYUDepthDataModule",
    "TrunkRepresentation",
    "VOCDetectionDataModule",
    "VOCMeanAP",
    "freeze",
    "knn_predict",
    "pretrained_trunk",
]
