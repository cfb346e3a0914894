"""Shared trunks: every one maps ``(B, 3, H, W)`` RGB in [0, 1] to a :class:`TrunkOutput`."""

from mtssl_lightning.trunks.base import Trunk, TrunkOutput
from mtssl_lightning.trunks.resnet_v2 import PRESETS, ResNetV2, count_parameters
from mtssl_lightning.trunks.torchvision_resnet import TorchvisionResNet

__all__ = ["PRESETS", "ResNetV2", "TorchvisionResNet", "Trunk", "TrunkOutput", "count_parameters"]
