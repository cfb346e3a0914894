"""Data: sources (image folders, sample photos), CPU-side crops, the DataModule, device-side ops."""

from mtssl_lightning.data.batch import ClipBatch, DataRequest, ImageBatch, TaskBatch
from mtssl_lightning.data.datamodule import MultiTaskDataModule
from mtssl_lightning.data.sources import ImageFolder, ImageSource, SampleImages

__all__ = ["ClipBatch", "DataRequest", "ImageBatch", "ImageFolder", "ImageSource", "MultiTaskDataModule", "SampleImages", "TaskBatch"]
