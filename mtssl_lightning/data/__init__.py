"""Data: sources (image folders, sample photos, videos), CPU-side crops, the task-sampler interface,
device-side ops, and the DataModule that runs the tasks' samplers on the device."""

from mtssl_lightning.data.batch import ClipBatch, DataRequest, ImageBatch, TaskBatch
from mtssl_lightning.data.datamodule import MultiTaskDataModule
from mtssl_lightning.data.sampler import TaskSampler, TaskSamplerProvider
from mtssl_lightning.data.sources import ImageFolder, ImageSource, SampleImages

__all__ = [
    "ClipBatch",
    "DataRequest",
    "ImageBatch",
    "ImageFolder",
    "ImageSource",
    "MultiTaskDataModule",
    "SampleImages",
    "TaskBatch",
    "TaskSampler",
    "TaskSamplerProvider",
]
