"""TF-slim's own ResNet-v2, as the reference that ``tests/slim/test_slim_parity.py`` compares ``ResNetV2`` with.

Runs in the TensorFlow environment only (``make slim-reference`` creates it and runs this):

    .venv-tf/bin/python tests/slim/make_reference.py OUT_DIR

For ``resnet_v2_50`` and ``resnet_v2_101`` (``tf_slim.nets.resnet_v2`` under
``resnet_arg_scope(batch_norm_epsilon=1e-5, batch_norm_scale=True)``, the paper's released
set-up) it writes into ``OUT_DIR``:

* ``resnet_v2_{depth}/model.ckpt.{index,data-*}``: a real TF checkpoint written by
  ``tf.compat.v1.train.Saver``, with random weights, biases, γ, β and BN moving statistics.
  The moving statistics are first calibrated on other random images (so activations keep a sane
  scale through 30+ units, as in a trained network) and then perturbed, so that a mean/variance
  or γ/β mix-up cannot go unnoticed. The ``resnet_v2_50`` checkpoint also holds variables that
  are not part of the trunk (logits, global step, RMSProp slots, a lasso matrix, a string and a
  float16 variable) and is saved in two shards.
* ``resnet_v2_{depth}_os{none,16}.npz``: per batch ``i`` the input ``images_i``
  ``(B, H, W, 3)`` RGB in [0, 1], and slim's end-points computed in inference mode from the
  restored checkpoint: ``block3_i`` (slim's ``block3``), ``unit{k}_i`` (every unit of block 3,
  ``k`` from 1), ``net_i`` (``postnorm`` after block 4, slim's final output without pooling).
* ``manifest.json``: versions, the names of the non-trunk variables, and the float16 variable's value.
* ``done``: written last; its absence means the reference is incomplete.
"""

from __future__ import annotations

import importlib
import json
import os
import sys
import time
import warnings
from pathlib import Path

import numpy as np

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")
warnings.filterwarnings("ignore")  # the TF1 API's deprecation notices, hundreds of them

import tensorflow as tf  # noqa: E402 - after the log level

tf.get_logger().setLevel("ERROR")

# TF >= 2.16 builds tf.compat.v1.layers (which tf_slim's batch_norm calls) from
# `tf_keras.legacy_tf_layers`, a path tf_keras only ships as `tf_keras.src.legacy_tf_layers`:
# alias it, so slim's unchanged layers run on a current TensorFlow.
for _name in ("", ".base", ".core", ".convolutional", ".normalization", ".pooling", ".variable_scope_shim"):
    sys.modules[f"tf_keras.legacy_tf_layers{_name}"] = importlib.import_module(f"tf_keras.src.legacy_tf_layers{_name}")

import tf_slim  # noqa: E402 - after the alias
from tensorflow.python.autograph.core import ag_ctx  # noqa: E402
from tf_slim.nets import resnet_utils, resnet_v2  # noqa: E402

v1 = tf.compat.v1
MEAN_RGB = np.array([123.68, 116.779, 103.939], np.float32)
NETS = {"50": resnet_v2.resnet_v2_50, "101": resnet_v2.resnet_v2_101}
#: image batches (B, H, W): even and odd sizes, so padding and ceil-rounding are exercised
BATCHES = [(2, 112, 144), (1, 97, 75)]
CALIBRATION = (4, 128, 128)


def images(rng: np.random.Generator, shape: tuple[int, int, int]) -> np.ndarray:
    """Random RGB images in [0, 1]: smooth blobs plus pixel noise, so they have both low and high frequencies."""
    b, h, w = shape
    coarse = rng.random((b, h // 8 + 2, w // 8 + 2, 3), dtype=np.float32)
    smooth = np.repeat(np.repeat(coarse, 8, axis=1), 8, axis=2)[:, :h, :w]
    return np.clip(0.7 * smooth + 0.3 * rng.random((b, h, w, 3), dtype=np.float32), 0.0, 1.0)


def vgg_input(x: np.ndarray) -> np.ndarray:
    """The released model's preprocessing: RGB 0-255 minus the ImageNet mean pixel."""
    return x * np.float32(255.0) - MEAN_RGB


def build(depth: str, is_training: bool, output_stride: int | None, num_classes: int | None = None):
    """slim's network on an NHWC placeholder of any size; returns (images, net, end_points).

    BN decay is 0, so that in training mode one run of the update ops sets the moving
    statistics to the batch's statistics (inference ignores the decay).
    """
    x = v1.placeholder(tf.float32, [None, None, None, 3], name="images")
    scope = resnet_utils.resnet_arg_scope(batch_norm_epsilon=1e-5, batch_norm_scale=True, batch_norm_decay=0.0)
    # AutoGraph would re-parse every legacy layer's Python source: plain graph building is much faster
    with tf_slim.arg_scope(scope), ag_ctx.ControlStatusCtx(status=ag_ctx.Status.DISABLED):
        net, end_points = NETS[depth](
            x, num_classes=num_classes, is_training=is_training, global_pool=False, output_stride=output_stride
        )
    return x, net, end_points


def add_extras() -> list[str]:
    """Variables a training checkpoint holds beside the trunk, on a second device (so a second shard).

    Returns the names of every variable that is not slim's trunk (conv1, block1-4, postnorm).
    """
    trunk = {v.op.name for v in v1.global_variables() if "/logits/" not in v.op.name}
    with tf.device("/cpu:1"):
        step = v1.train.get_or_create_global_step()
        lasso = v1.get_variable("lasso/alpha", [4, 6], initializer=v1.random_normal_initializer(0.0, 0.1))
        v1.get_variable("run/name", initializer=tf.constant("slim parity reference"), dtype=tf.string)
        v1.get_variable("ema/half", [3, 2], dtype=tf.float16, initializer=v1.random_normal_initializer())
    # RMSProp slots ("<variable>/RMSProp" and "/RMSProp_1") for the logits, the lasso and one
    # trunk variable; a zero update makes them without building the gradient graph
    trained = [v for v in v1.global_variables() if "/logits/" in v.op.name or v.op.name.endswith("block1/unit_1/bottleneck_v2/conv1/weights")]
    v1.train.RMSPropOptimizer(0.01).apply_gradients([(tf.zeros_like(v), v) for v in [*trained, lasso]], global_step=step)
    return sorted({v.op.name for v in v1.global_variables()} - trunk)


def assign(sess: v1.Session, values: dict) -> None:
    """Set many variables in one run (one placeholder + assign op each)."""
    feeds, ops = {}, []
    for var, value in values.items():
        placeholder = v1.placeholder(var.dtype.base_dtype, var.shape)
        ops.append(var.assign(placeholder))
        feeds[placeholder] = value
    sess.run(ops, feeds)


def slim_float_variables() -> dict[str, tf.Variable]:
    return {v.op.name: v for v in v1.global_variables() if v.op.name.startswith("resnet_v2_") and v.dtype.base_dtype == tf.float32}


def randomize(sess: v1.Session, rng: np.random.Generator) -> None:
    """Random γ, β and biases (conv weights keep slim's He initialisation)."""
    values = {}
    for name, var in slim_float_variables().items():
        shape = var.shape.as_list()
        if name.endswith("/gamma"):
            values[var] = rng.uniform(0.5, 1.5, shape).astype(np.float32)
        elif name.endswith("/beta") or name.endswith("/biases"):
            values[var] = rng.normal(0.0, 0.2, shape).astype(np.float32)
    assign(sess, values)


def perturb_moving_statistics(sess: v1.Session, rng: np.random.Generator) -> None:
    """Move each calibrated mean by ~0.2 standard deviations, scale each variance by 0.6-1.6."""
    variables = slim_float_variables()
    current = sess.run({name: var for name, var in variables.items() if "/moving_" in name})
    values = {}
    for name, value in current.items():
        if name.endswith("/moving_mean"):
            std = np.sqrt(current[name[: -len("mean")] + "variance"])
            values[variables[name]] = value + rng.normal(0.0, 0.2, value.shape).astype(np.float32) * std
        else:
            values[variables[name]] = value * rng.uniform(0.6, 1.6, value.shape).astype(np.float32)
    assign(sess, values)


def compute_end_points(sess: v1.Session, x: tf.Tensor, net: tf.Tensor, points: dict, depth: str, batches: list[np.ndarray]) -> dict[str, np.ndarray]:
    """slim's inference-mode ``block3``, its units and the final ``net`` on each batch."""
    scope = f"resnet_v2_{depth}/block3/unit_"
    fetch = {"block3": points[f"resnet_v2_{depth}/block3"], "net": net}
    fetch.update({f"unit{k[len(scope):].split('/')[0]}": v for k, v in points.items() if k.startswith(scope)})
    out: dict[str, np.ndarray] = {}
    for i, batch in enumerate(batches):
        out[f"images_{i}"] = batch
        out.update({f"{key}_{i}": value for key, value in sess.run(fetch, {x: vgg_input(batch)}).items()})
    return out


def make_reference(depth: str, out: Path, rng: np.random.Generator) -> tuple[list[str], list | None]:
    """Checkpoint and end-points of one depth; returns the non-trunk variable names and the float16 extra's value."""
    checkpoint = out / f"resnet_v2_{depth}" / "model.ckpt"
    checkpoint.parent.mkdir(parents=True, exist_ok=True)
    with_extras = depth == "50"
    config = v1.ConfigProto(device_count={"CPU": 2}, intra_op_parallelism_threads=2, inter_op_parallelism_threads=1)
    graph = tf.Graph()
    with graph.as_default():  # training mode: random weights, calibrated BN statistics, saved
        v1.set_random_seed(int(depth))
        x, _, _ = build(depth, is_training=True, output_stride=None, num_classes=5 if with_extras else None)
        extras = add_extras() if with_extras else []
        with v1.Session(graph=graph, config=config) as sess:
            sess.run(v1.global_variables_initializer())
            randomize(sess, rng)
            sess.run(v1.get_collection(v1.GraphKeys.UPDATE_OPS), {x: vgg_input(images(rng, CALIBRATION))})
            perturb_moving_statistics(sess, rng)
            v1.train.Saver(sharded=with_extras).save(sess, str(checkpoint), write_meta_graph=False)
            half = [sess.run(v).tolist() for v in v1.global_variables() if v.op.name == "ema/half"]
    batches = [images(rng, shape) for shape in BATCHES]
    for output_stride in (None, 16):  # inference mode, restored by TensorFlow from the checkpoint
        graph = tf.Graph()
        with graph.as_default():
            x, net, points = build(depth, is_training=False, output_stride=output_stride)
            with v1.Session(graph=graph, config=config) as sess:
                v1.train.Saver().restore(sess, str(checkpoint))
                arrays = compute_end_points(sess, x, net, points, depth, batches)
        np.savez(out / f"resnet_v2_{depth}_os{output_stride or 'none'}.npz", **arrays)
    return extras, (half[0] if half else None)


def main(out_dir: str) -> None:
    start = time.perf_counter()
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    (out / "done").unlink(missing_ok=True)
    manifest: dict = {"tensorflow": tf.__version__, "tf_slim": getattr(tf_slim, "__version__", "unknown"), "nets": {}}
    for depth in NETS:
        extras, half = make_reference(depth, out, np.random.default_rng(int(depth)))
        manifest["nets"][depth] = {"non_trunk_variables": extras, "ema/half": half}
        print(f"resnet_v2_{depth}: checkpoint and end-points written ({time.perf_counter() - start:.0f} s)", flush=True)
    (out / "manifest.json").write_text(json.dumps(manifest, indent=1))
    (out / "done").write_text("ok\n")


if __name__ == "__main__":
    if len(sys.argv) != 2:
        sys.exit("usage: python tests/slim/make_reference.py OUT_DIR")
    main(sys.argv[1])
