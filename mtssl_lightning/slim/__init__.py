"""TF-slim interoperability: read TensorFlow checkpoints without TensorFlow."""

from mtssl_lightning.slim.tf_checkpoint import CheckpointFormatError, TFCheckpoint

__all__ = ["CheckpointFormatError", "TFCheckpoint"]
