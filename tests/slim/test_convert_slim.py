"""`mtssl convert-slim` without TensorFlow: a small network saved under slim's variable names
(written here from slim's naming rules) converts back to exactly the same ResNetV2; non-trunk
variables are reported; every wrong input fails with a message naming the culprit.
(Parity with TF-slim's own network on TF-written checkpoints: test_slim_parity.py.)"""

from __future__ import annotations

import numpy as np
import pytest
import torch
from tf_bundle import write_checkpoint

from mtssl_lightning import load_trunk
from mtssl_lightning.cli import main as mtssl_main
from mtssl_lightning.evaluation.backbone import TrunkRepresentation
from mtssl_lightning.slim import SlimConversionError, convert_slim, slim_trunk
from mtssl_lightning.trunks import ResNetV2

SCOPE = "resnet_v2_tiny"
UNITS = [1, 1, 2, 1]  # small but with an identity shortcut (block 3, unit 2) and every block
WIDTH = 0.125  # root conv of 8 channels


def _random_trunk(units: list[int] = UNITS, last_block: int = 4) -> ResNetV2:
    """Random weights *and* BN statistics; after block 4 a final norm (slim's postnorm)."""
    torch.manual_seed(0)
    trunk = ResNetV2(units=units, width=WIDTH, last_block=last_block, output_stride=None, final_norm=last_block == 4)
    with torch.no_grad():
        for name, tensor in trunk.state_dict().items():
            if name.endswith("running_var"):
                tensor.uniform_(0.5, 2.0)
            elif name.endswith(("running_mean", "bias")) or (name.endswith("weight") and tensor.ndim == 1):
                tensor.normal_(0.0, 0.3)
    return trunk.eval()


def _slim_variables(trunk: ResNetV2) -> dict[str, np.ndarray]:
    """The trunk's weights under TF-slim's names and layouts (conv kernels HWIO)."""

    def array(t: torch.Tensor) -> np.ndarray:
        return t.detach().numpy().transpose(2, 3, 1, 0).copy() if t.ndim == 4 else t.detach().numpy().copy()

    def conv(scope: str, module: torch.nn.Module) -> dict[str, np.ndarray]:
        out = {f"{scope}/weights": array(module.weight)}
        if module.bias is not None:
            out[f"{scope}/biases"] = array(module.bias)
        return out

    def batch_norm(scope: str, bn: torch.nn.Module) -> dict[str, np.ndarray]:
        stats = {"gamma": bn.weight, "beta": bn.bias, "moving_mean": bn.running_mean, "moving_variance": bn.running_var}
        return {f"{scope}/{name}": array(t) for name, t in stats.items()}

    out = conv(f"{SCOPE}/conv1", trunk.root)
    if isinstance(trunk.final_norm, torch.nn.Sequential):
        out |= batch_norm(f"{SCOPE}/postnorm", trunk.final_norm[0])
    for b, block in enumerate(trunk.blocks, start=1):
        for u, unit in enumerate(block, start=1):
            scope = f"{SCOPE}/block{b}/unit_{u}/bottleneck_v2"
            out |= batch_norm(f"{scope}/preact", unit.preact)
            out |= conv(f"{scope}/conv1", unit.body[0]) | batch_norm(f"{scope}/conv1/BatchNorm", unit.body[1])
            out |= conv(f"{scope}/conv2", unit.body[3]) | batch_norm(f"{scope}/conv2/BatchNorm", unit.body[4])
            out |= conv(f"{scope}/conv3", unit.body[6])
            if unit.shortcut is not None:
                out |= conv(f"{scope}/shortcut", unit.shortcut)
    return out


EXTRAS = {
    "global_step": np.array(90000, np.int64),
    f"{SCOPE}/logits/weights": np.zeros((1, 1, 256, 10), np.float32),
    f"{SCOPE}/block1/unit_1/bottleneck_v2/conv1/weights/RMSProp": np.zeros((1, 1, 8, 8), np.float32),
    "colorization/head/weights": np.zeros((3, 3, 128, 313), np.float32),
    "lasso/alpha": np.zeros((4, 2), np.float32),
    "run_name": "rp+col+ex+ms",
}


@pytest.fixture(scope="module")
def original() -> ResNetV2:
    return _random_trunk()


@pytest.fixture(scope="module")
def checkpoint(original, tmp_path_factory):
    folder = tmp_path_factory.mktemp("slim")
    return write_checkpoint(folder / "model.ckpt", _slim_variables(original) | EXTRAS, shards=2, per_block=50)


def _features(trunk: torch.nn.Module, images: torch.Tensor):
    with torch.no_grad():
        return trunk(images)


@pytest.mark.parametrize("output_stride", [None, 16])
def test_block3_conversion_reproduces_the_network_and_reports_the_rest(original, checkpoint, tmp_path, output_stride):
    report = convert_slim(checkpoint, tmp_path / "trunk.pt", output_stride=output_stride)
    trunk = load_trunk(tmp_path / "trunk.pt")  # weights_only=True inside
    args = trunk.spec()["init_args"]
    assert args == {  # unit counts (1, 1, 2, 1) are the "tiny" preset's
        "depth": "tiny", "units": None, "unit": "bottleneck", "width": WIDTH, "last_block": 3,
        "output_stride": output_stride, "final_norm": False, "bn_momentum": 0.1,
    }
    # the reference: the original network's block 3, raw (slim's block3 end-point is pre-activation)
    reference = ResNetV2(units=UNITS, width=WIDTH, last_block=3, output_stride=output_stride, final_norm=False).eval()
    reference.load_state_dict({k: v for k, v in original.state_dict().items() if k in reference.state_dict()})
    images = torch.rand(2, 3, 67, 90)
    got, want = _features(trunk, images), _features(reference, images)
    assert torch.equal(got.features, want.features) and len(got.units) == 2
    assert all(torch.equal(a, b) for a, b in zip(got.units, want.units, strict=True))

    ignored = {v.name: v.reason for v in report.ignored}
    block4 = {n for n in _slim_variables(original) if "/block4/" in n or "/postnorm/" in n}
    assert set(ignored) == set(EXTRAS) | block4  # every variable left out is listed
    assert ignored["global_step"] == "training step counter"
    assert ignored[f"{SCOPE}/logits/weights"] == "slim's classifier (logits)"
    assert ignored[f"{SCOPE}/block1/unit_1/bottleneck_v2/conv1/weights/RMSProp"].endswith("of a trunk variable")
    assert ignored[f"{SCOPE}/block4/unit_1/bottleneck_v2/conv1/weights"] == "block 4: beyond the cut after block 3"
    summary = report.summary()
    assert "run_name  string []" in summary and "global_step  int64 []" in summary and "converted: " in summary
    saved = torch.load(tmp_path / "trunk.pt", weights_only=True)
    assert saved["conversion"]["scope"] == SCOPE and "lasso/alpha" in saved["conversion"]["ignored_variables"]


def test_the_lasso_needs_the_atrous_export(checkpoint, tmp_path):
    """At slim's native stride block 3's last unit is strided: its units cannot be mixed."""
    native, _ = slim_trunk(checkpoint)
    lasso = TrunkRepresentation(native, representation="lasso")
    with pytest.raises(ValueError, match="units have different shapes.*convert-slim --output-stride 16"):
        lasso(torch.rand(1, 3, 64, 64))
    atrous, _ = slim_trunk(checkpoint, output_stride=16)
    assert TrunkRepresentation(atrous, representation="lasso")(torch.rand(1, 3, 64, 64)).shape == (1, 128, 4, 4)


def test_block4_with_postnorm_is_slims_whole_network(original, checkpoint):
    trunk, report = slim_trunk(checkpoint, last_block=4)
    assert trunk.spec()["init_args"]["final_norm"]  # default after block 4: slim's postnorm
    images = torch.rand(1, 3, 64, 64)
    assert torch.equal(_features(trunk, images).features, _features(original, images).features)
    assert {v.name for v in report.ignored} == set(EXTRAS)


def test_unit_counts_of_no_preset_and_a_checkpoint_that_ends_with_block_3(tmp_path):
    original = _random_trunk(units=[2, 1, 3, 1], last_block=3)  # block 4 never trained, as in the paper's release
    trunk, report = slim_trunk(write_checkpoint(tmp_path / "m.ckpt", _slim_variables(original)))
    assert trunk.spec()["init_args"]["units"] == [2, 1, 3, 3] and not report.ignored  # block 4: slim's 3 units
    images = torch.rand(1, 3, 50, 50)
    assert torch.equal(_features(trunk, images).features, _features(original, images).features)


def test_a_checkpoint_without_gamma_is_batch_norm_scale_false(original, tmp_path):
    variables = {k: v for k, v in _slim_variables(original).items() if not k.endswith("/gamma")}
    trunk, report = slim_trunk(write_checkpoint(tmp_path / "m.ckpt", variables))
    assert any("batch_norm_scale=False" in note for note in report.notes)
    assert torch.all(trunk.blocks[0][0].preact.weight == 1)


def _broken(original, tmp_path, change) -> str:
    variables = _slim_variables(original)
    change(variables)
    return str(write_checkpoint(tmp_path / "broken" / "model.ckpt", variables))


def test_a_missing_trunk_variable_is_named(original, tmp_path):
    name = f"{SCOPE}/block2/unit_1/bottleneck_v2/conv2/BatchNorm/moving_variance"
    ckpt = _broken(original, tmp_path, lambda v: v.pop(name))
    with pytest.raises(SlimConversionError, match=rf"1 trunk variable\(s\) missing; {name}"):
        slim_trunk(ckpt)
    slim_trunk(ckpt, last_block=1)  # not needed for a trunk cut after block 1


def test_a_wrong_shape_or_dtype_is_named(original, tmp_path):
    name = f"{SCOPE}/block3/unit_2/bottleneck_v2/conv2/weights"

    def change(v):
        v[name] = v[name][:, :, :, :5]
        v[f"{SCOPE}/conv1/biases"] = v[f"{SCOPE}/conv1/biases"].astype(np.int32)

    with pytest.raises(SlimConversionError) as err:
        slim_trunk(_broken(original, tmp_path, change))
    message = str(err.value)
    assert f"{name}: shape [3, 3, 32, 5] in the checkpoint, [3, 3, 32, 32] expected" in message
    assert f"{SCOPE}/conv1/biases: int32, a float tensor expected" in message


def test_wrong_requests_and_foreign_checkpoints_are_explained(checkpoint, tmp_path):
    with pytest.raises(SlimConversionError, match=r"--depth v2_101 expects units per block \[3, 4, 23, 3\], but the checkpoint has \[1, 1, 2, 1\]"):
        slim_trunk(checkpoint, depth="v2_101")
    with pytest.raises(SlimConversionError, match="--final-norm with --last-block 3: slim has no BN"):
        slim_trunk(checkpoint, final_norm=True)
    with pytest.raises(SlimConversionError, match="no variables under scope 'other'.*'resnet_v2_tiny'"):
        slim_trunk(checkpoint, scope="other")
    foreign = write_checkpoint(tmp_path / "keras" / "ckpt", {"dense/kernel": np.zeros((2, 2), np.float32)})
    with pytest.raises(SlimConversionError, match="holds no TF-slim resnet_v2 variables.*first names are: dense/kernel"):
        slim_trunk(foreign)
    v1 = write_checkpoint(tmp_path / "v1" / "ckpt", {"resnet_v1_50/block1/unit_1/bottleneck_v1/conv1/weights": np.zeros(1, np.float32)})
    with pytest.raises(SlimConversionError, match="ResNet v1.*only resnet_v2"):
        slim_trunk(v1)
    block3_only = write_checkpoint(
        tmp_path / "b3" / "ckpt", {"net/block1/unit_1/bottleneck_v2/conv1/weights": np.zeros(1, np.float32),
                                   "net/block2/unit_1/bottleneck_v2/conv1/weights": np.zeros(1, np.float32)},
    )
    with pytest.raises(SlimConversionError, match="--last-block 3 asks for block 3, but the checkpoint holds blocks 1-2 only"):
        slim_trunk(block3_only)


def test_cli_converts_and_reports_errors(checkpoint, tmp_path, capsys):
    out = tmp_path / "released.pt"
    with pytest.raises(SystemExit) as done:
        mtssl_main(["convert-slim", str(checkpoint), str(out), "--output-stride", "16"])
    assert done.value.code == 0
    printed = capsys.readouterr().out
    beyond_block3 = [n for n in _slim_variables(_random_trunk()) if "/block4/" in n or "/postnorm/" in n]
    assert f"not part of the trunk: {len(EXTRAS) + len(beyond_block3)} variables:" in printed and f"wrote {out}" in printed
    assert load_trunk(out).out_stride == 16
    with pytest.raises(SystemExit) as done:
        mtssl_main(["convert-slim", str(tmp_path / "missing" / "model.ckpt"), str(out)])
    assert done.value.code == 2
    assert "mtssl convert-slim: error: no TensorFlow checkpoint at" in capsys.readouterr().err
