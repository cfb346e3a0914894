"""Classification transfer: labelled data, top-1/top-5, the frozen linear probe, fine-tuning, the CLI."""

from __future__ import annotations

import pickle
import re
import warnings
from pathlib import Path

import lightning.pytorch as pl
import numpy as np
import pytest
import torch
import torch.nn.functional as F
from PIL import Image

from mtssl_lightning import load_trunk
from mtssl_lightning.cli import run
from mtssl_lightning.evaluation.classification import (
    ClassificationDataModule,
    ImageClassifier,
    LabelledBatch,
    classification_metrics,
    digits_split,
)
from mtssl_lightning.trunks import ResNetV2

ROOT = Path(__file__).resolve().parents[2]
COLOURS = {"cat": (220, 30, 30), "dog": (30, 30, 220)}  # the class is readable from the pixels


@pytest.fixture(autouse=True)
def _quiet():
    warnings.filterwarnings("ignore", message=".*module\\(s\\) in eval mode.*")  # the frozen trunk, on purpose
    warnings.filterwarnings("ignore", message=".*could not find the monitored key.*")


def _export(path: Path, seed: int = 0) -> Path:
    """A trunk export of a random tiny trunk, as `export_trunk` writes it."""
    torch.manual_seed(seed)
    trunk = ResNetV2("tiny", width=0.125)
    torch.save({"trunk_spec": trunk.spec(), "state_dict": trunk.state_dict()}, path)
    return path


def _write_tree(root: Path, classes: dict[str, int]) -> None:
    """``root/<class>/...`` with ``n`` images per class: JPEG, PNG and one in a nested folder."""
    rng = np.random.default_rng(0)
    for name, n in classes.items():
        for i in range(n):
            folder = root / name / ("nested" if i == 0 else "")
            folder.mkdir(parents=True, exist_ok=True)
            pixels = np.clip(np.array(COLOURS[name]) + rng.integers(-20, 20, (40, 48, 3)), 0, 255).astype(np.uint8)
            Image.fromarray(pixels).save(folder / f"{i}.{'png' if i % 2 else 'jpg'}")


def _digits(**kw) -> ClassificationDataModule:
    args = {"dataset": "digits", "image_size": 32, "batch_size": 32, "num_workers": 0}
    args.update(kw)
    return ClassificationDataModule(**args)


def _trainer(tmp_path, **kw) -> pl.Trainer:
    args = {
        "accelerator": "cpu",
        "logger": False,
        "enable_progress_bar": False,
        "enable_model_summary": False,
        "enable_checkpointing": False,
        "default_root_dir": tmp_path,
        "num_sanity_val_steps": 0,
    }
    args.update(kw)
    return pl.Trainer(**args)


# --------------------------------------------------------------------------------- data
def test_image_folder_tree_loads_with_the_right_labels_and_skips_unreadable_files(tmp_path):
    _write_tree(tmp_path / "train", {"cat": 3, "dog": 4})
    _write_tree(tmp_path / "val", {"dog": 2})  # a class may have no validation images
    (tmp_path / "train" / "cat" / "broken.jpg").write_bytes(b"not a jpeg at all")
    dm = ClassificationDataModule(
        "folder",
        train_root=str(tmp_path / "train"),
        val_root=str(tmp_path / "val"),
        image_size=32,
        batch_size=16,
        num_workers=0,
    )
    assert dm.num_classes == 2 and dm.classes == ["cat", "dog"]
    assert len(dm.train_set) == 8 and len(dm.val_set) == 2
    with pytest.warns(UserWarning, match="skipping unreadable image .*broken.jpg"):
        batch = next(iter(dm.train_eval_dataloader()))
    assert isinstance(batch, LabelledBatch)
    assert batch.images.shape == (8, 3, 32, 32) and batch.images.dtype == torch.float32
    assert batch.labels.dtype == torch.int64 and 0.0 <= batch.images.min() and batch.images.max() <= 1.0
    # the label agrees with the colour the test painted into that class's images
    red, blue = batch.images[:, 0].mean(dim=(1, 2)), batch.images[:, 2].mean(dim=(1, 2))
    assert torch.equal(batch.labels, (blue > red).long())
    assert batch.labels.tolist().count(0) == 4  # 3 cats + the broken file replaced by its successor
    val = next(iter(dm.val_dataloader()))
    assert val.labels.tolist() == [1, 1]  # "dog" keeps the training index, not 0
    with pytest.warns(UserWarning, match="broken.jpg"):  # the augmented copy of the set meets it too
        train = next(iter(dm.train_dataloader()))  # random resized crop + flip
    assert train.images.shape == (8, 3, 32, 32)


def test_validation_classes_must_be_known_to_training(tmp_path):
    _write_tree(tmp_path / "train", {"cat": 1})
    _write_tree(tmp_path / "val", {"cat": 1, "dog": 1})
    dm = ClassificationDataModule(
        "folder", train_root=str(tmp_path / "train"), val_root=str(tmp_path / "val"), num_workers=0
    )
    with pytest.raises(ValueError, match=r"data.val_root.*\['dog'\]"):
        dm.setup()


def _write_cifar10(root: Path, per_batch: int = 2) -> np.ndarray:
    """CIFAR-10's python pickle layout: 5 training batches, a test batch and batches.meta."""
    folder = root / "cifar-10-batches-py"
    folder.mkdir(parents=True)
    names = ["airplane", "automobile", "bird", "cat", "deer", "dog", "frog", "horse", "ship", "truck"]
    labels = []
    for b, name in enumerate([f"data_batch_{i}" for i in range(1, 6)] + ["test_batch"]):
        batch_labels = [(b * per_batch + i) % 10 for i in range(per_batch)]
        # image i of label c: every red value = 20 * c, green 7, blue 200 (stored channel-planar, row-major)
        data = np.zeros((per_batch, 3, 32, 32), dtype=np.uint8)
        for i, c in enumerate(batch_labels):
            data[i, 0], data[i, 1], data[i, 2] = 20 * c, 7, 200
        entry = {
            "batch_label": name,
            "labels": batch_labels,
            "data": data.reshape(per_batch, 3072),
            "filenames": [f"{name}_{i}.png" for i in range(per_batch)],
        }
        with open(folder / name, "wb") as f:
            pickle.dump(entry, f, protocol=2)
        labels += batch_labels
    with open(folder / "batches.meta", "wb") as f:
        pickle.dump({"label_names": names, "num_cases_per_batch": per_batch, "num_vis": 3072}, f, protocol=2)
    return np.array(labels)


def test_cifar10_in_the_real_pickle_format_loads_without_downloading(tmp_path):
    labels = _write_cifar10(tmp_path)
    dm = ClassificationDataModule(
        "cifar10", root=str(tmp_path), image_size=32, batch_size=64, num_workers=0, verify_checksums=False
    )  # hand-made files: not the official MD5 sums
    dm.setup()
    assert dm.num_classes == 10 and dm.classes[3] == "cat"
    assert len(dm.train_set) == 10 and len(dm.val_set) == 2
    batch = next(iter(dm.train_eval_dataloader()))
    assert batch.labels.tolist() == labels[:10].tolist()
    # pixels come back where the pickle put them: red = 20 * label, green 7, blue 200
    assert torch.allclose(batch.images[:, 0, 5, 5] * 255, 20.0 * batch.labels.float(), atol=0.5)
    assert torch.allclose(batch.images[:, 1:, 5, 5] * 255, torch.tensor([7.0, 200.0]).expand(10, 2), atol=0.5)
    assert next(iter(dm.val_dataloader())).labels.tolist() == labels[10:].tolist()
    assert len(pickle.loads(pickle.dumps(dm.train_set))) == 10  # workers started by "spawn" can receive it
    # with the default MD5 check the hand-made files are refused, and the error says what to do
    strict = ClassificationDataModule("cifar10", root=str(tmp_path), image_size=32, num_workers=0)
    with pytest.raises(RuntimeError, match="verify_checksums: false"):
        strict.setup()


def test_missing_datasets_give_a_clear_error(tmp_path):
    with pytest.raises(FileNotFoundError, match=r"cifar-10-batches-py.*data.root.*never downloads"):
        ClassificationDataModule("cifar10", root=str(tmp_path), num_workers=0).setup()
    with pytest.raises(FileNotFoundError, match=r"train_X.bin.*stl10_binary"):
        ClassificationDataModule("stl10", root=str(tmp_path), num_workers=0).setup()
    with pytest.raises(FileNotFoundError, match=r"data.train_root.*does not exist"):
        ClassificationDataModule(
            "folder", train_root=str(tmp_path / "nope"), val_root=str(tmp_path), num_workers=0
        ).setup()
    with pytest.raises(ValueError, match="needs `data.root`"):
        ClassificationDataModule("cifar100")
    (tmp_path / "flat").mkdir()
    Image.new("RGB", (8, 8)).save(tmp_path / "flat" / "x.jpg")
    with pytest.raises(FileNotFoundError, match="no class subfolders"):
        ClassificationDataModule(
            "folder", train_root=str(tmp_path / "flat"), val_root=str(tmp_path), num_workers=0
        ).setup()


def test_digits_load_with_a_fixed_stratified_split():
    dm = _digits(val_batch_size=1000)
    assert dm.num_classes == 10 and dm.augment == "none"  # no flips of digits by default
    dm.setup()
    assert len(dm.train_set) == 1198 and len(dm.val_set) == 599  # 1797 images, 1/3 held out
    from sklearn.datasets import load_digits

    counts = np.bincount(load_digits().target, minlength=10)
    _, _tr_y, va_x, va_y = digits_split()
    assert np.all(np.abs(np.bincount(va_y, minlength=10) - counts / 3) <= 1)  # stratified
    assert np.array_equal(digits_split()[3], va_y)  # the same split every time
    batch = next(iter(dm.val_dataloader()))
    assert batch.images.shape == (599, 3, 32, 32)
    assert torch.equal(batch.images[:, 0], batch.images[:, 1]) and torch.equal(batch.images[:, 0], batch.images[:, 2])
    assert torch.equal(batch.labels, torch.from_numpy(va_y))
    # the 32x32 image is the 8x8 digit upsampled: 4x4 average pooling gives the digit back (up to blur)
    down = F.avg_pool2d(batch.images[:, :1], 4)[:, 0]
    orig = torch.from_numpy(va_x).float() / 255
    assert (down - orig).abs().mean() < 0.1 < (down - orig.roll(1, 0)).abs().mean()


# ------------------------------------------------------------------------------ metrics
def test_top1_top5_hand_checks():
    metrics = classification_metrics(6)
    labels = torch.tensor([0, 1, 2, 3])
    assert {k: float(v) for k, v in metrics(F.one_hot(labels, 6).float(), labels).items()} == {"top1": 1.0, "top5": 1.0}
    # sample 0: label ranked 1st; 1: 2nd; 2: 5th; 3: 6th (last) -> top-1 1/4, top-5 3/4
    logits = torch.tensor(
        [
            [9.0, 1, 2, 3, 4, 5],
            [9.0, 8, 1, 2, 3, 4],
            [9.0, 8, 5, 7, 6, 1],
            [9.0, 8, 7, 0, 6, 5],
        ]
    )
    metrics.reset()
    assert {k: float(v) for k, v in metrics(logits, labels).items()} == {"top1": 0.25, "top5": 0.75}
    assert set(classification_metrics(5)) == {"top1"}  # top-5 of 5 classes would always be 1


def test_a_perfect_predictor_logs_val_top1_of_one(tmp_path):
    model = ImageClassifier(trunk=ResNetV2("tiny", width=0.125))
    dm = _digits(batch_size=256)
    trainer = _trainer(tmp_path)
    labels_seen = []

    def oracle(images):  # logits that put each image's true label first
        labels = model._labels
        labels_seen.append(labels)
        return F.one_hot(labels, 10).float(), {}

    original_step = model._step

    def step(batch, stage):
        model._labels = batch.labels
        return original_step(batch, stage)

    model.forward_all, model._step = oracle, step
    result = trainer.validate(model, dm, verbose=False)[0]
    assert result["val/top1"] == 1.0 and result["val/top5"] == 1.0
    assert sum(len(x) for x in labels_seen) == 599


# ---------------------------------------------------------------- freezing / fine-tuning
def _fit_steps(tmp_path, model, steps=4):
    torch.manual_seed(0)
    _trainer(tmp_path, max_steps=steps, limit_val_batches=0).fit(model, _digits())


def test_linear_probe_freezes_trunk_weights_and_bn_statistics(tmp_path):
    ckpt = _export(tmp_path / "trunk.pt")
    saved = torch.load(ckpt, weights_only=True)["state_dict"]
    model = ImageClassifier(
        num_classes=10,
        checkpoint=str(ckpt),
        frozen=True,
        probe_units=[1],
        optimizer=lambda p: torch.optim.SGD(p, lr=0.1, momentum=0.9),
    )
    assert all(torch.equal(v, saved[k]) for k, v in model.trunk.state_dict().items())  # the checkpoint's trunk
    assert not any(p.requires_grad for p in model.trunk.parameters())
    fc = model.classifier[-1]
    fc_before = fc.weight.detach().clone()
    _fit_steps(tmp_path, model)
    after = model.trunk.state_dict()
    assert any("running_mean" in k for k in after) and any("num_batches_tracked" in k for k in after)
    for key, value in saved.items():  # weights, running_mean/var and num_batches_tracked alike
        assert torch.equal(after[key], value), key
    assert not torch.allclose(fc.weight, fc_before)  # the probe trained
    probe = model.unit_probes["1"][-1]
    assert probe.bias.abs().sum() > 0  # zero-initialised, moved by training
    # only the heads reach the optimizer
    optimizer = model.configure_optimizers()
    passed = {id(p) for g in optimizer.param_groups for p in g["params"]}
    assert passed == {id(p) for p in [*model.classifier.parameters(), *model.unit_probes.parameters()]}


def test_fine_tuning_changes_the_trunk(tmp_path):
    ckpt = _export(tmp_path / "trunk.pt")
    saved = torch.load(ckpt, weights_only=True)["state_dict"]
    model = ImageClassifier(
        num_classes=10,
        checkpoint=str(ckpt),
        frozen=False,
        head="block4_linear",
        trunk_lr_scale=0.5,
        optimizer=lambda p: torch.optim.SGD(p, lr=0.01, momentum=0.9),
    )
    groups = model.configure_optimizers().param_groups
    assert [g["lr"] for g in groups] == [0.01, 0.005]
    _fit_steps(tmp_path, model, steps=3)
    after = model.trunk.state_dict()
    assert not torch.equal(after["root.weight"], saved["root.weight"])
    assert not torch.equal(after["final_norm.0.running_mean"], saved["final_norm.0.running_mean"])
    assert int(after["final_norm.0.num_batches_tracked"]) == 3
    # the fine-tuned trunk reads back with load_trunk (e.g. a supervised baseline to evaluate like the others)
    trainer = _trainer(tmp_path, max_steps=1, limit_val_batches=0)
    trainer.fit(model, _digits())
    trainer.save_checkpoint(tmp_path / "finetuned.ckpt")
    reloaded = load_trunk(tmp_path / "finetuned.ckpt").state_dict()
    assert reloaded.keys() == model.trunk.state_dict().keys()
    assert all(torch.equal(reloaded[k], v) for k, v in model.trunk.state_dict().items())


def test_lasso_probe_trains_its_unit_mix_on_the_frozen_trunk():
    model = ImageClassifier(num_classes=10, trunk=ResNetV2("tiny", width=0.125), representation="lasso", pool_size=2)
    mixer = model.representation.mixer
    optimizer = model.configure_optimizers()
    passed = {id(p) for g in optimizer.param_groups for p in g["params"]}
    assert {id(p) for p in mixer.parameters()} <= passed
    assert not passed & {id(p) for p in model.trunk.parameters()}
    loss = F.cross_entropy(model(torch.rand(2, 3, 32, 32)), torch.tensor([1, 2]))
    loss.backward()
    assert all(p.grad is not None for p in mixer.parameters() if p.requires_grad)
    assert all(p.grad is None for p in model.trunk.parameters())
    assert model.classifier[-1].in_features == model.trunk.out_channels * 4  # a 2x2 pooled grid
    with pytest.raises(ValueError, match="probe_units.*out of range"):
        ImageClassifier(num_classes=10, trunk=ResNetV2("tiny", width=0.125), probe_units=[2])


# --------------------------------------------------------------------------------- CLI
def _config(tmp_path: Path, name: str) -> Path:
    """A copy of configs/eval/<name> with its outputs (runs/…) under tmp_path."""
    text = re.sub(r"runs/[A-Za-z0-9_]+", str(tmp_path / "runs"), (ROOT / "configs" / "eval" / name).read_text())
    path = tmp_path / name
    path.write_text(text)
    return path


CPU = [
    "--trainer.accelerator=cpu",
    "--trainer.precision=32-true",
    "--trainer.logger=false",
    "--trainer.enable_progress_bar=false",
    "--model.trunk.init_args.depth=tiny",
    "--model.trunk.init_args.width=0.125",
    "--data.image_size=32",
    "--data.batch_size=16",
    "--data.num_workers=0",
]


def test_cli_linear_probe_on_digits_then_validate(tmp_path):
    config = _config(tmp_path, "linear_probe.yaml")
    ckpt = _export(tmp_path / "trunk.pt")
    args = ["--config", str(config), *CPU, f"--model.checkpoint={ckpt}", "--data.dataset=digits"]
    cli = run(["fit", *args, "--trainer.max_steps=3", "--trainer.limit_val_batches=2"])
    assert cli.trainer.global_step == 3 and cli.model.num_classes == 10 and cli.model.frozen
    last = tmp_path / "runs" / "checkpoints" / "last.ckpt"
    cli = run(["validate", *args, "--trainer.limit_val_batches=3", f"--ckpt_path={last}"])
    assert {"val/top1", "val/top5", "val/loss"} <= set(cli.trainer.callback_metrics)


def test_cli_finetune_on_an_image_folder_tree_then_validate(tmp_path):
    _write_tree(tmp_path / "train", {"cat": 3, "dog": 3})
    _write_tree(tmp_path / "val", {"cat": 2, "dog": 2})
    config = _config(tmp_path, "finetune.yaml")
    args = [
        "--config",
        str(config),
        *CPU,
        f"--data.train_root={tmp_path / 'train'}",
        f"--data.val_root={tmp_path / 'val'}",
    ]
    cli = run(["fit", *args, "--trainer.max_epochs=1", "--data.batch_size=3"])
    assert cli.trainer.global_step == 2 and cli.model.num_classes == 2 and not cli.model.frozen
    assert "val/top1" in cli.trainer.callback_metrics and "val/top5" not in cli.trainer.callback_metrics
    last = tmp_path / "runs" / "checkpoints" / "last.ckpt"
    cli = run(["validate", *args, f"--ckpt_path={last}"])
    assert 0.0 <= float(cli.trainer.callback_metrics["val/top1"]) <= 1.0


# ------------------------------------------------------------------------------ learning
@pytest.mark.slow
def test_linear_probe_on_random_features_learns_digits(tmp_path):
    """Random conv features + a linear probe classify digits far above chance (0.1).

    Measured on the dev machine (CPU): val top-1 ≈ 0.9 after 2 epochs (bn: true; without the
    BN the random trunk's unnormalised features need far smaller learning rates)."""
    torch.manual_seed(0)
    model = ImageClassifier(
        trunk=ResNetV2("tiny", width=0.125), bn=True, optimizer=lambda p: torch.optim.SGD(p, lr=0.1, momentum=0.9)
    )
    trainer = _trainer(tmp_path, max_epochs=2)
    trainer.fit(model, _digits(batch_size=64, val_batch_size=256))
    top1 = float(trainer.callback_metrics["val/top1"])
    print(f"digits linear probe, random tiny trunk: val top-1 = {top1:.3f}")
    assert top1 > 0.6
