"""Tests of mtssl_lightning.evaluation.depth, one module per module."""
