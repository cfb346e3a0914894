"""TF-slim interoperability: read TensorFlow checkpoints without TensorFlow, convert slim's
``resnet_v2`` (the paper's released model) into a :class:`~mtssl_lightning.trunks.ResNetV2` export."""

from mtssl_lightning.slim.convert import ConversionReport, SlimConversionError, convert_slim, slim_trunk
from mtssl_lightning.slim.tf_checkpoint import CheckpointFormatError, TFCheckpoint

__all__ = ["CheckpointFormatError", "ConversionReport", "SlimConversionError", "TFCheckpoint", "convert_slim", "slim_trunk"]
