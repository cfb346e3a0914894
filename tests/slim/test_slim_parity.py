"""Numerical parity of ``ResNetV2`` with TF-slim's own ``resnet_v2_50``/``resnet_v2_101``.

``make slim-reference`` (run by ``make test`` first) builds slim's networks with TensorFlow in
``.venv-tf/``, gives them random weights and BN statistics, saves real TF checkpoints and slim's
end-points on fixed images (``tests/slim/make_reference.py``). Here, without TensorFlow, each
checkpoint is converted by ``convert_slim``, read back by ``load_trunk`` and run on the same
images: slim's ``block3`` end-point and every unit of block 3 must agree to 1e-4 relative
error (max |ours - slim| / max |slim| per tensor), for slim's native stride and for its atrous
``output_stride=16``; block 4 + ``postnorm`` likewise. Then the converted trunk goes through a
linear probe and a kNN evaluation on digits, end to end.

A missing reference is a failure, not a skip: CI must never pass without the comparison.
"""

from __future__ import annotations

import json
import os
import re
import warnings
from pathlib import Path

import numpy as np
import pytest
import torch

from mtssl_lightning import load_trunk
from mtssl_lightning.cli import run
from mtssl_lightning.slim import TFCheckpoint, convert_slim, slim_trunk
from mtssl_lightning.slim.command import main as convert_main

pytestmark = pytest.mark.slow

ROOT = Path(__file__).resolve().parents[2]
REFERENCE = Path(os.environ.get("MTSSL_SLIM_REFERENCE", ROOT / "build" / "slim-reference"))
TOLERANCE = 1e-4


@pytest.fixture(scope="module")
def reference() -> Path:
    if not (REFERENCE / "done").is_file():
        pytest.fail(
            f"no TF-slim reference in {REFERENCE}: run `make slim-reference` (it sets up TensorFlow in .venv-tf/ and "
            "writes it), or `make test`, which does that first; MTSSL_SLIM_REFERENCE=<folder> points elsewhere"
        )
    return REFERENCE


def _relative_error(ours: torch.Tensor, slim_nhwc: np.ndarray) -> float:
    slim = torch.from_numpy(slim_nhwc).permute(0, 3, 1, 2)
    assert ours.shape == slim.shape, f"shape {tuple(ours.shape)} vs slim's {tuple(slim.shape)}"
    return float((ours - slim).abs().max() / slim.abs().max())


def _batches(arrays) -> list[int]:
    return sorted(int(k.split("_")[1]) for k in arrays.files if k.startswith("images_"))


@pytest.mark.parametrize("output_stride", [None, 16], ids=["native-stride", "os16"])
@pytest.mark.parametrize("depth", ["50", "101"])
def test_block3_and_its_units_equal_slims_end_points(reference, tmp_path, depth, output_stride):
    export = convert_slim(reference / f"resnet_v2_{depth}" / "model.ckpt", tmp_path / "trunk.pt", output_stride=output_stride)
    trunk = load_trunk(tmp_path / "trunk.pt")
    assert trunk.spec()["init_args"] | {"bn_momentum": None} == {
        "depth": f"v2_{depth}", "units": None, "unit": "bottleneck", "width": 1.0, "last_block": 3,
        "output_stride": output_stride, "final_norm": False, "bn_momentum": None,
    }, export.summary()
    arrays = np.load(reference / f"resnet_v2_{depth}_os{output_stride or 'none'}.npz")
    errors: dict[str, float] = {}
    for i in _batches(arrays):
        with torch.no_grad():
            out = trunk(torch.from_numpy(arrays[f"images_{i}"]).permute(0, 3, 1, 2))
        errors[f"block3[{i}]"] = _relative_error(out.features, arrays[f"block3_{i}"])
        units = sorted((k for k in arrays.files if re.fullmatch(rf"unit\d+_{i}", k)), key=lambda k: int(k[4:].split("_")[0]))
        assert len(units) == len(out.units) == {"50": 6, "101": 23}[depth]
        for k, (ours, key) in enumerate(zip(out.units, units, strict=True)):
            errors[f"unit{k + 1}[{i}]"] = _relative_error(ours, arrays[key])
    worst = max(errors, key=errors.get)
    print(f"resnet_v2_{depth}, output_stride {output_stride}: max relative error {errors[worst]:.2e} ({worst})")
    assert errors[worst] <= TOLERANCE, f"{worst}: relative error {errors[worst]:.2e} > {TOLERANCE}"


@pytest.mark.parametrize("depth", ["50", "101"])
def test_block4_and_postnorm_equal_slims_output(reference, depth):
    for output_stride in (None, 16):
        trunk, _ = slim_trunk(reference / f"resnet_v2_{depth}", last_block=4, output_stride=output_stride)
        arrays = np.load(reference / f"resnet_v2_{depth}_os{output_stride or 'none'}.npz")
        for i in _batches(arrays):
            with torch.no_grad():
                features = trunk(torch.from_numpy(arrays[f"images_{i}"]).permute(0, 3, 1, 2)).features
            error = _relative_error(features, arrays[f"net_{i}"])
            print(f"resnet_v2_{depth} block 4 + postnorm, output_stride {output_stride}, batch {i}: {error:.2e}")
            assert error <= TOLERANCE


def test_tf_written_checkpoint_reads_and_reports_what_is_not_trunk(reference, tmp_path):
    """TF's own files: two shards, int64/string/float16 variables, RMSProp slots, logits."""
    manifest = json.loads((reference / "manifest.json").read_text())["nets"]["50"]
    ckpt = TFCheckpoint(reference / "resnet_v2_50" / "model.ckpt")
    assert ckpt.num_shards == 2
    assert np.array_equal(ckpt.read("ema/half"), np.array(manifest["ema/half"], np.float16))
    assert ckpt.read("global_step").dtype == np.int64 and ckpt.entries["run/name"].dtype == "string"
    report = convert_slim(ckpt.prefix, tmp_path / "trunk.pt")
    beyond_block3 = {n for n in ckpt.entries if n.startswith(("resnet_v2_50/block4/", "resnet_v2_50/postnorm/"))}
    assert beyond_block3 and {v.name for v in report.ignored} == set(manifest["non_trunk_variables"]) | beyond_block3
    reasons = {v.name: v.reason for v in report.ignored}
    assert reasons["resnet_v2_50/block1/unit_1/bottleneck_v2/conv1/weights/RMSProp_1"].endswith("of a trunk variable")
    assert reasons["lasso/alpha/RMSProp"].endswith("of a non-trunk variable")
    assert reasons["resnet_v2_50/logits/weights"] == "slim's classifier (logits)"


CPU = [
    "--trainer.accelerator=cpu",
    "--trainer.precision=32-true",
    "--trainer.logger=false",
    "--trainer.enable_progress_bar=false",
    "--data.dataset=digits",
    "--data.image_size=32",
    "--data.num_workers=0",
    "--model.trunk.init_args.depth=tiny",  # the configs' random-init trunk (unused with a checkpoint): keep it cheap
    "--model.trunk.init_args.width=0.125",
]


def _config(tmp_path: Path, name: str) -> Path:
    text = re.sub(r"runs/[A-Za-z0-9_]+", str(tmp_path / "runs"), (ROOT / "configs" / "eval" / name).read_text())
    (tmp_path / name).write_text(text)
    return tmp_path / name


def test_converted_trunk_runs_the_linear_probe_and_knn_configs(reference, tmp_path):
    warnings.filterwarnings("ignore", message=".*module\\(s\\) in eval mode.*")  # the frozen trunk, on purpose
    warnings.filterwarnings("ignore", message=".*could not find the monitored key.*")
    export = tmp_path / "resnet_v2_50.pt"
    assert convert_main([str(reference / "resnet_v2_50" / "model.ckpt"), str(export)]) == 0
    trunk = load_trunk(export)
    args = ["--config", str(_config(tmp_path, "linear_probe.yaml")), *CPU, f"--model.checkpoint={export}"]
    cli = run(["fit", *args, "--trainer.max_steps=3", "--trainer.limit_val_batches=2", "--data.batch_size=16"])
    assert cli.trainer.global_step == 3 and cli.model.frozen
    probed = cli.model.trunk.state_dict()  # the frozen trunk is the converted one, unchanged by training
    assert all(torch.equal(probed[k], v) for k, v in trunk.state_dict().items())
    last = tmp_path / "runs" / "checkpoints" / "last.ckpt"
    cli = run(["validate", *args, "--trainer.limit_val_batches=3", "--data.batch_size=16", f"--ckpt_path={last}"])
    assert {"val/top1", "val/top5"} <= set(cli.trainer.callback_metrics)
    cli = run(["validate", "--config", str(_config(tmp_path, "knn.yaml")), *CPU, f"--model.checkpoint={export}", "--data.batch_size=128"])
    top1 = float(cli.trainer.callback_metrics["val/knn_top1"])
    print(f"kNN top-1 on digits with the converted random-weight resnet_v2_50: {top1:.3f}")
    assert 0.0 <= top1 <= 1.0

