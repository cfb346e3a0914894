"""Tests of mtssl_lightning.evaluation.detection, one module per module."""
