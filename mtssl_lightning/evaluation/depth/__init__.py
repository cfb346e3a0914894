"""NYU depth v2 transfer: monocular depth from the (pretrained) trunk with an up-projection decoder.

The paper's third transfer task (after ImageNet and PASCAL): fine-tune the trunk with a
Laina et al. (2016) style up-projection decoder on NYU depth v2 and report the share of
pixels with ``max(d / d*, d* / d) < 1.25``. One concern per module:

* :mod:`~.sources`: the on-disk layouts (the labelled ``.mat`` file with the official or a
  fraction split, PNG folders, DenseDepth's CSV lists) as :class:`DepthSource`;
* :mod:`~.data`: :class:`NYUDepthDataset` (resize, crop, flip, image and depth aligned) and
  :class:`NYUDepthDataModule`, batches :class:`DepthBatch`;
* :mod:`~.metrics`: :class:`DepthMetrics` (δ-thresholds, abs-rel, RMSE, log10);
* :mod:`~.model`: :class:`DepthEstimator` (trunk + up-projection decoder, berHu or L1 loss).

Every public name is importable from this package too (``mtssl_lightning.evaluation.depth``).
"""

from mtssl_lightning.evaluation.depth.data import (
    DepthBatch,
    DepthSample,
    NYUDepthDataModule,
    NYUDepthDataset,
    eigen_mask,
)
from mtssl_lightning.evaluation.depth.metrics import DepthMetrics
from mtssl_lightning.evaluation.depth.model import (
    DepthEstimator,
    UpProjection,
    UpProjectionDecoder,
    berhu_loss,
    l1_loss,
    unpool2x,
)
from mtssl_lightning.evaluation.depth.sources import (
    DepthSource,
    NYULabeledMat,
    PairedFiles,
    csv_pairs,
    folder_pairs,
    fraction_split,
    open_depth_sources,
    read_split_file,
)

__all__ = [
    "DepthBatch",
    "DepthEstimator",
    "DepthMetrics",
    "DepthSample",
    "DepthSource",
    "NYUDepthDataModule",
    "NYUDepthDataset",
    "NYULabeledMat",
    "PairedFiles",
    "UpProjection",
    "UpProjectionDecoder",
    "berhu_loss",
    "csv_pairs",
    "eigen_mask",
    "folder_pairs",
    "fraction_split",
    "l1_loss",
    "open_depth_sources",
    "read_split_file",
    "unpool2x",
]
