"""Tests of mtssl_lightning.evaluation (a package, so that the per-protocol test modules may share names)."""
