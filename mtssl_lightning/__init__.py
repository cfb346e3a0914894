"""mtssl-lightning: multi-task self-supervised visual learning (Doersch & Zisserman 2017)."""

from mtssl_lightning.checkpoint import export_trunk, load_trunk
from mtssl_lightning.data.datamodule import MultiTaskDataModule
from mtssl_lightning.pretrain import MultiTaskSSL

__all__ = ["MultiTaskDataModule", "MultiTaskSSL", "export_trunk", "load_trunk"]
__version__ = "0.1.0"
