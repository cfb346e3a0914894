"""Tests of mtssl_lightning.evaluation.classification, one module per module."""
