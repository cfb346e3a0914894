"""ResNet-v2 trunk: shapes, strides, slim layout and parameter counts against hand computations."""

from __future__ import annotations

import math

import pytest
import torch

from mtssl_lightning.trunks import PRESETS, ResNetV2, TorchvisionResNet, count_parameters
from mtssl_lightning.trunks.resnet_v2 import max_pool_same

# (preset, output channels of block 3 at width 1, unit count of block 3)
BLOCK3 = {
    "tiny": (1024, 2),
    "v2_18": (256, 2),
    "v2_26": (1024, 2),
    "v2_50": (1024, 6),
    "v2_101": (1024, 23),
    "v2_152": (1024, 36),
}


@pytest.mark.parametrize("depth", sorted(PRESETS))
@pytest.mark.parametrize(
    # 224 input: root conv /2 -> 112, pool /2 -> 56, block1 last unit /2 -> 28, block2 -> 14,
    # block3 -> 7 unless output_stride 16 removes its stride; os 8 also removes block2's.
    ("output_stride", "side", "last_unit_side", "first_unit_side"),
    [(16, 14, 14, 14), (None, 7, 7, 14), (8, 28, 28, 28)],
)
def test_block3_shapes_and_strides(depth, output_stride, side, last_unit_side, first_unit_side):
    width = 0.25
    trunk = ResNetV2(depth, width=width, output_stride=output_stride)
    channels, units = BLOCK3[depth]
    expected_channels = channels // 4
    assert trunk.out_channels == expected_channels
    assert trunk.out_stride == 224 // side
    assert trunk.num_units == units
    with torch.no_grad():
        out = trunk(torch.rand(2, 3, 224, 224))
    assert out.features.shape == (2, expected_channels, side, side)
    assert len(out.units) == units
    assert out.units[-1].shape == (2, expected_channels, last_unit_side, last_unit_side)
    assert out.units[0].shape == (2, expected_channels, first_unit_side, first_unit_side)


@pytest.mark.parametrize(("last_block", "channels", "side"), [(1, 256, 28), (2, 512, 14), (4, 2048, 14)])
def test_other_cut_points(last_block, channels, side):
    # slim: block 4 has stride 1; with output_stride 16 the remaining block-3 stride becomes dilation
    trunk = ResNetV2("v2_50", width=0.125, last_block=last_block)
    with torch.no_grad():
        out = trunk(torch.rand(1, 3, 224, 224))
    assert out.features.shape == (1, channels // 8, side, side)


def test_stride_sits_in_the_last_unit_of_each_block():
    """slim layout: within block 1, every unit but the last keeps 56x56 (torchvision: first unit strides)."""
    trunk = ResNetV2("v2_50", width=0.125, last_block=1)
    x = torch.rand(1, 3, 224, 224)
    with torch.no_grad():
        out = trunk(x)
    assert [u.shape[-1] for u in out.units] == [56, 56, 28]
    # the root has a bias and no BN: slim's conv1 is `activation_fn=None, normalizer_fn=None`
    assert trunk.root.bias is not None and trunk.root.kernel_size == (7, 7) and trunk.root.stride == (2, 2)
    assert all(m.eps == 1e-5 for m in trunk.modules() if isinstance(m, torch.nn.BatchNorm2d))


def test_max_pool_same_matches_tensorflow_padding():
    # TF SAME, 3x3/2 on 4 columns: out = ceil(4/2) = 2, total pad 1, all of it at the end
    x = torch.arange(16.0).view(1, 1, 4, 4)
    y = max_pool_same(x)
    # windows rows/cols {0,1,2} and {2,3,pad}: maxima at (2,2), (2,3), (3,2), (3,3)
    assert y.squeeze().tolist() == [[10.0, 11.0], [14.0, 15.0]]
    assert max_pool_same(torch.rand(1, 1, 7, 7)).shape[-1] == math.ceil(7 / 2)


def _unit_params(kind: str, d_in: int, d: int, mid: int) -> int:
    """Trainable parameters of one v2 unit, counted by hand from slim's layer list."""
    n = 2 * d_in  # preact BN gamma+beta
    if kind == "bottleneck":
        n += d_in * mid + 2 * mid  # conv1 1x1 (no bias) + BN
        n += 9 * mid * mid + 2 * mid  # conv2 3x3 (no bias) + BN
        n += mid * d + d  # conv3 1x1 with bias
    else:
        n += 9 * d_in * d + 2 * d + 9 * d * d + d
    if d_in != d:
        n += d_in * d + d  # projection shortcut with bias
    return n


def _hand_count(kind: str, units: tuple[int, ...]) -> int:
    n = 7 * 7 * 3 * 64 + 64  # root conv with bias
    d_in = 64
    for b, count in enumerate(units):
        mid = (64, 128, 256, 512)[b]
        d = mid * (4 if kind == "bottleneck" else 1)
        for _ in range(count):
            n += _unit_params(kind, d_in, d, mid)
            d_in = d
    return n + 2 * d_in  # final BN (slim's postnorm) on the block output


def test_v2_101_block3_parameter_count():
    """ResNet-v2-101 cut after block 3 (the paper's trunk) has 27,560,064 trainable parameters:
    root 9,472 + block1 215,936 + block2 1,219,584 + block3 26,113,024 + final BN 2,048."""
    trunk = ResNetV2("v2_101")
    assert count_parameters(trunk) == _hand_count("bottleneck", (3, 4, 23)) == 27_560_064


@pytest.mark.parametrize("depth", ["v2_18", "v2_26", "v2_50", "v2_152"])
def test_parameter_counts_of_other_presets(depth):
    kind, units = PRESETS[depth]
    assert count_parameters(ResNetV2(depth)) == _hand_count(kind, units[:3])


def test_input_convention_is_slim_mean_subtraction():
    trunk = ResNetV2("tiny", width=0.25)
    mean = torch.tensor([123.68, 116.779, 103.939]).view(1, 3, 1, 1)
    x = mean / 255.0 * torch.ones(1, 3, 8, 8)
    assert torch.allclose(trunk.normalize(x), torch.zeros(1, 3, 8, 8), atol=1e-4)


def test_bad_arguments_are_named():
    with pytest.raises(ValueError, match="unknown ResNetV2 depth 'v2_99'"):
        ResNetV2("v2_99")
    with pytest.raises(ValueError, match="output_stride"):
        ResNetV2("tiny", output_stride=12)
    with pytest.raises(ValueError, match="last_block"):
        ResNetV2("tiny", last_block=5)


def test_torchvision_trunk_shapes():
    trunk = TorchvisionResNet("resnet18", last_block=3)
    with torch.no_grad():
        out = trunk(torch.rand(2, 3, 224, 224))
    # torchvision layer3 of resnet18: 256 channels at stride 16, 2 BasicBlocks
    assert out.features.shape == (2, 256, 14, 14) and trunk.out_stride == 16 and trunk.out_channels == 256
    assert len(out.units) == 2 and trunk.num_units == 2


def test_spec_rebuilds_the_same_architecture():
    trunk = ResNetV2("v2_26", width=0.25, output_stride=None)
    spec = trunk.spec()
    assert spec["class_path"] == "mtssl_lightning.trunks.resnet_v2.ResNetV2"
    clone = ResNetV2(**spec["init_args"])
    clone.load_state_dict(trunk.state_dict())  # strict: same keys and shapes
