"""kNN evaluation: the weighted vote by hand, against brute force and scikit-learn, the metric,
the online callback (MultiTaskSSL and ImageClassifier) and `mtssl validate` with configs/eval/knn.yaml."""

from __future__ import annotations

import math
import re
import warnings
from pathlib import Path

import lightning.pytorch as pl
import numpy as np
import pytest
import torch
from sklearn.neighbors import KNeighborsClassifier
from torch.utils.data import DataLoader, TensorDataset
from toy_tasks import Brightness

from mtssl_lightning import MultiTaskDataModule, MultiTaskSSL
from mtssl_lightning.cli import run
from mtssl_lightning.evaluation.classification import ClassificationDataModule, ImageClassifier, LabelledBatch
from mtssl_lightning.evaluation.knn import KNNAccuracy, KNNEvaluation, embed, knn_predict, knn_scores
from mtssl_lightning.trunks import ResNetV2

ROOT = Path(__file__).resolve().parents[2]

# 2-D bank: a (label 0) on the query's direction, b and c (label 1) at cosine 0.8 from it,
# d (label 0) at 90°, e (label 2) opposite. Vectors need not be unit length.
BANK = torch.tensor([[2.0, 0.0], [0.8, 0.6], [0.8, -0.6], [0.0, 1.0], [-1.0, 0.0]])
BANK_LABELS = torch.tensor([0, 1, 1, 0, 2])
#: q1 = (1, 0): 3-NN a (1.0), b (0.8), c (0.8).  q2 = (0.6, 0.8): 3-NN b (0.96), d (0.8), a (0.6)
QUERIES = torch.tensor([[1.0, 0.0], [0.6, 0.8]])


@pytest.fixture(autouse=True)
def _quiet():
    warnings.filterwarnings("ignore", message=".*module\\(s\\) in eval mode.*")


def test_hand_made_case_both_weightings():
    t = 0.1
    scores = knn_scores(QUERIES, BANK, BANK_LABELS, k=3, temperature=t, num_classes=3, weighting="exp")
    e = math.exp
    expected = torch.tensor(
        [
            [e(1.0 / t), e(0.8 / t) + e(0.8 / t), 0.0],  # one close 0 outweighs two farther 1s
            [e(0.8 / t) + e(0.6 / t), e(0.96 / t), 0.0],  # one close 1 outweighs two farther 0s
        ]
    )
    assert torch.allclose(scores, expected, rtol=1e-5)
    assert knn_predict(QUERIES, BANK, BANK_LABELS, k=3, temperature=t, num_classes=3).tolist() == [0, 1]
    # T = 0.07 (the default) gives the same winners; uniform weights: plain majority, the opposite
    assert knn_predict(QUERIES, BANK, BANK_LABELS, k=3).tolist() == [0, 1]
    uniform = knn_scores(QUERIES, BANK, BANK_LABELS, k=3, num_classes=3, weighting="uniform")
    assert uniform.tolist() == [[1.0, 2.0, 0.0], [2.0, 1.0, 0.0]]
    assert knn_predict(QUERIES, BANK, BANK_LABELS, k=3, weighting="uniform").tolist() == [1, 0]
    # k = 1: the single nearest; k larger than the bank: all of it
    assert knn_predict(QUERIES, BANK, BANK_LABELS, k=1).tolist() == [0, 1]
    assert knn_scores(QUERIES, BANK, BANK_LABELS, k=50, weighting="uniform").tolist() == [[2.0, 2.0, 1.0]] * 2


def _brute_force(query, bank, labels, k, t, num_classes, weighting):
    preds = []
    for q in query:  # one query at a time, neighbours by explicit sorting
        sims = [float(q @ b / (q.norm() * b.norm())) for b in bank]
        order = sorted(range(len(sims)), key=lambda j: -sims[j])[:k]
        votes = [0.0] * num_classes
        for j in order:
            votes[int(labels[j])] += math.exp(sims[j] / t) if weighting == "exp" else 1.0
        preds.append(max(range(num_classes), key=lambda c: (votes[c], -c)))  # ties -> lowest class
    return torch.tensor(preds)


@pytest.mark.parametrize("weighting", ["exp", "uniform"])
def test_knn_predict_equals_a_brute_force_loop(weighting):
    g = torch.Generator().manual_seed(0)
    query, bank = (
        torch.randn(37, 16, generator=g, dtype=torch.float64),
        torch.randn(101, 16, generator=g, dtype=torch.float64),
    )
    labels = torch.randint(0, 7, (101,), generator=g)
    expected = _brute_force(query, bank, labels, k=5, t=0.07, num_classes=7, weighting=weighting)
    for chunk in (1, 10, 1000):  # chunking the queries changes nothing
        got = knn_predict(
            query, bank, labels, k=5, temperature=0.07, num_classes=7, weighting=weighting, chunk_size=chunk
        )
        assert torch.equal(got, expected)


def test_knn_accuracy_metric():
    metric = KNNAccuracy(k=3, temperature=0.1)
    with pytest.raises(RuntimeError, match="set_bank"):
        metric.update(QUERIES, torch.tensor([0, 1]))
    metric.set_bank(BANK, BANK_LABELS)
    assert metric.num_classes == 3
    metric.update(QUERIES[:1], torch.tensor([0]))  # predicted 0: right
    metric.update(QUERIES[1:], torch.tensor([0]))  # predicted 1: wrong
    assert metric.compute().item() == 0.5
    metric.reset()  # clears the counts, keeps the bank
    metric.update(QUERIES, torch.tensor([0, 1]))
    assert metric.compute().item() == 1.0
    uniform = KNNAccuracy(k=3, weighting="uniform")
    uniform.set_bank(BANK, BANK_LABELS)
    uniform.update(QUERIES, torch.tensor([0, 1]))
    assert uniform.compute().item() == 0.0


def _digits(**kw):
    args = {"dataset": "digits", "image_size": 32, "batch_size": 64, "num_workers": 0}
    args.update(kw)
    return ClassificationDataModule(**args)


def test_embed_restores_every_module_mode():
    trunk = ResNetV2("tiny", width=0.125).train()
    trunk.blocks[0].eval()  # a mixed state, as with a partly frozen model
    before = {name: m.training for name, m in trunk.named_modules()}
    images = torch.rand(6, 3, 32, 32)
    loader = [(images[:4], torch.tensor([0, 1, 0, 1])), (images[4:], torch.tensor([1, 1]))]
    feats, labels = embed(trunk, loader, "cpu")
    assert feats.shape == (6, trunk.out_channels) and labels.tolist() == [0, 1, 0, 1, 1, 1]
    assert {name: m.training for name, m in trunk.named_modules()} == before
    with torch.no_grad():  # eval-mode features, globally average-pooled
        assert torch.allclose(feats, trunk.eval()(images).features.mean(dim=(2, 3)), atol=1e-5)


def test_callback_during_pretraining_matches_scikit_learn(tmp_path):
    """Online kNN every 2nd validation of a MultiTaskSSL fit; k = 1 compared with scikit-learn's 1-NN."""
    torch.manual_seed(0)
    model = MultiTaskSSL(tasks={"bright": Brightness(batch_size=4, image_size=32)}, trunk=ResNetV2("tiny", width=0.125))
    digits = _digits(val_batch_size=256)
    callback = KNNEvaluation(datamodule=digits, every_n_val=2, k=1)
    trainer = pl.Trainer(
        accelerator="cpu",
        max_epochs=2,
        logger=False,
        enable_progress_bar=False,
        enable_model_summary=False,
        enable_checkpointing=False,
        default_root_dir=tmp_path,
        limit_val_batches=1,
        callbacks=[callback],
    )
    calls = []
    evaluate = callback.evaluate
    callback.evaluate = lambda trunk, device: calls.append(trunk) or evaluate(trunk, device)
    trainer.fit(model, MultiTaskDataModule(steps_per_epoch=2, val_samples=2, num_workers=0))
    assert callback.val_runs == 2 and len(calls) == 1 and calls[0] is model.trunk  # the sanity check does not count
    top1 = float(trainer.callback_metrics["knn/top1"])
    # independent: scikit-learn's cosine 1-NN on features of the trained trunk, computed here
    model.trunk.eval()
    with torch.no_grad():
        feats = {name: [] for name in ("train", "val")}
        labels = {name: [] for name in ("train", "val")}
        for name, loader in (("train", digits.train_eval_dataloader()), ("val", digits.val_dataloader())):
            for batch in loader:
                feats[name].append(model.trunk(batch.images).features.mean(dim=(2, 3)))
                labels[name].append(batch.labels)
    x_tr, x_va = torch.cat(feats["train"]).numpy(), torch.cat(feats["val"]).numpy()
    y_tr, y_va = torch.cat(labels["train"]).numpy(), torch.cat(labels["val"]).numpy()
    sk = KNeighborsClassifier(n_neighbors=1, metric="cosine", algorithm="brute").fit(x_tr, y_tr)
    expected = float(np.mean(sk.predict(x_va) == y_va))
    assert top1 == pytest.approx(expected, abs=2 / len(y_va))  # at most a float-rounding near-tie apart
    assert top1 > 0.3  # random conv features already separate digits (chance 0.1)


def test_callback_with_image_classifier_and_plain_loaders(tmp_path):
    g = torch.Generator().manual_seed(0)
    images, labels = torch.rand(24, 3, 32, 32, generator=g), torch.arange(24) % 3
    data = TensorDataset(images, labels)
    loader = DataLoader(data, batch_size=8)  # (images, labels) tuples
    model = ImageClassifier(num_classes=3, trunk=ResNetV2("tiny", width=0.125))
    callback = KNNEvaluation(train_loader=loader, val_loader=loader, k=1)
    trainer = pl.Trainer(
        accelerator="cpu",
        max_epochs=1,
        limit_train_batches=1,
        logger=False,
        enable_progress_bar=False,
        enable_model_summary=False,
        enable_checkpointing=False,
        default_root_dir=tmp_path,
        num_sanity_val_steps=0,
        callbacks=[callback],
    )
    labelled = DataLoader(data, batch_size=8, collate_fn=lambda s: LabelledBatch.collate([(x, int(y)) for x, y in s]))
    trainer.fit(model, labelled, labelled)
    assert float(trainer.callback_metrics["knn/top1"]) == 1.0  # 1-NN of the training set itself
    assert "val/top1" in trainer.callback_metrics
    with pytest.raises(ValueError, match="either `datamodule` or both"):
        KNNEvaluation(train_loader=loader)


def test_mtssl_validate_with_the_knn_config(tmp_path):
    text = re.sub(r"runs/[A-Za-z0-9_]+", str(tmp_path / "runs"), (ROOT / "configs" / "eval" / "knn.yaml").read_text())
    config = tmp_path / "knn.yaml"
    config.write_text(text)
    torch.manual_seed(0)
    trunk = ResNetV2("tiny", width=0.125)
    ckpt = tmp_path / "trunk.pt"
    torch.save({"trunk_spec": trunk.spec(), "state_dict": trunk.state_dict()}, ckpt)
    cli = run(
        [
            "validate",
            "--config",
            str(config),
            "--trainer.accelerator=cpu",
            "--trainer.logger=false",
            "--trainer.enable_progress_bar=false",
            f"--model.checkpoint={ckpt}",
            "--model.trunk.init_args.depth=tiny",
            "--model.trunk.init_args.width=0.125",
            "--data.dataset=digits",
            "--data.image_size=32",
            "--data.num_workers=0",
        ]
    )
    top1 = float(cli.trainer.callback_metrics["val/knn_top1"])
    # the same number from the pure function on features computed here
    digits = _digits(val_batch_size=1000)
    bank, bank_labels = embed(trunk, digits.train_eval_dataloader(), "cpu")
    query, labels = embed(trunk, digits.val_dataloader(), "cpu")
    expected = (knn_predict(query, bank, bank_labels, k=20, temperature=0.07, num_classes=10) == labels).float().mean()
    assert top1 == pytest.approx(float(expected), abs=1e-6)
    assert top1 > 0.5  # measured ≈ 0.86: random conv features + cosine kNN on digits
    with pytest.raises(RuntimeError, match="nothing to train"):
        cli.model.configure_optimizers()
