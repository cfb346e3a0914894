"""torchvision's (v1, post-activation) ResNet as an alternative trunk, same interface."""

from __future__ import annotations

from torch import Tensor, nn
from torchvision.models import resnet

from mtssl_lightning.trunks.base import PixelNormalize, Trunk, TrunkOutput

IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)


class TorchvisionResNet(Trunk):
    """A torchvision ResNet (``resnet18`` … ``resnet152``) cut after ``layer{last_block}``.

    Never downloads weights: start from random initialisation, or pass ``weights_path`` to a
    torchvision state_dict file already on disk. Input ``(B, 3, H, W)`` RGB in ``[0, 1]``
    (normalised with ImageNet mean/std inside). ``units`` are the outputs of the residual
    blocks of the last layer.

    Args:
        arch: torchvision constructor name, e.g. ``"resnet50"``.
        last_block: cut after ``layer1`` … ``layer4``.
        replace_stride_with_dilation: torchvision's option for layers 2–4 (dense tasks).
        weights_path: optional local ``.pth`` with a torchvision state_dict (``fc.*`` ignored).
    """

    def __init__(
        self,
        arch: str = "resnet50",
        last_block: int = 3,
        replace_stride_with_dilation: list[bool] | None = None,
        weights_path: str | None = None,
    ) -> None:
        super().__init__()
        # weights_path is left out: a checkpoint carries the weights itself
        self.init_args = dict(arch=arch, last_block=last_block, replace_stride_with_dilation=replace_stride_with_dilation)
        if not arch.startswith("resnet") or not hasattr(resnet, arch):
            raise ValueError(f"unknown torchvision ResNet {arch!r}; e.g. resnet18, resnet50, resnet101")
        if not 1 <= last_block <= 4:
            raise ValueError(f"`last_block` must be 1-4, got {last_block}")
        net: resnet.ResNet = getattr(resnet, arch)(
            weights=None, replace_stride_with_dilation=replace_stride_with_dilation
        )
        if weights_path is not None:
            import torch

            state = torch.load(weights_path, map_location="cpu", weights_only=True)
            state = {k: v for k, v in state.items() if not k.startswith("fc.")}
            net.load_state_dict(state, strict=False)
        self.normalize = PixelNormalize(IMAGENET_MEAN, IMAGENET_STD, scale=1.0)
        self.stem = nn.Sequential(net.conv1, net.bn1, net.relu, net.maxpool)
        layers = [net.layer1, net.layer2, net.layer3, net.layer4][:last_block]
        self.layers = nn.ModuleList(layers)
        last = layers[-1][-1]
        self.out_channels = (last.conv3 if hasattr(last, "conv3") else last.conv2).out_channels
        dil = replace_stride_with_dilation or [False, False, False]
        self.out_stride = 4 * 2 ** sum(1 for b in range(1, last_block) if not dil[b - 1])
        self.num_units = len(layers[-1])

    def forward(self, x: Tensor) -> TrunkOutput:
        x = self.stem(self.normalize(x))
        for layer in self.layers[:-1]:
            x = layer(x)
        units: list[Tensor] = []
        for block in self.layers[-1]:
            x = block(x)
            units.append(x)
        return TrunkOutput(features=x, units=units)
