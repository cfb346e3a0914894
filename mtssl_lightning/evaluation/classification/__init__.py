"""Classification transfer: a linear probe on the frozen trunk, or fine-tuning, and the labelled data.

One concern per module:

* :mod:`~.datasets`: where labelled images come from: an image-folder tree (ImageNet's
  ``train/<class>/…``, ``val/<class>/…``), CIFAR-10/100 and STL-10 already on disk (never
  downloaded), and scikit-learn's bundled 8×8 digits (the small real labelled set that CPU tests
  and the CPU transfer benchmark use);
* :mod:`~.data`: :class:`LabelledBatch` and :class:`ClassificationDataModule` (transforms,
  augmentation, loaders);
* :mod:`~.model`: :class:`ImageClassifier`, the frozen linear probe (block 3, or block 4 +
  linear) and fine-tuning, with top-1/top-5 accuracy.

Every public name is importable from this package too (``mtssl_lightning.evaluation.classification``).
"""

from mtssl_lightning.evaluation.classification.data import ClassificationDataModule, LabelledBatch
from mtssl_lightning.evaluation.classification.datasets import (
    TORCHVISION_SETS,
    GreyArrayDataset,
    LabelledImageFolder,
    PILDatasetAdapter,
    TorchvisionSet,
    digits_split,
    open_torchvision_dataset,
    scan_class_folders,
)
from mtssl_lightning.evaluation.classification.model import ImageClassifier, classification_metrics, linear_probe

__all__ = [
    "TORCHVISION_SETS",
    "ClassificationDataModule",
    "GreyArrayDataset",
    "ImageClassifier",
    "LabelledBatch",
    "LabelledImageFolder",
    "PILDatasetAdapter",
    "TorchvisionSet",
    "classification_metrics",
    "digits_split",
    "linear_probe",
    "open_torchvision_dataset",
    "scan_class_folders",
]
