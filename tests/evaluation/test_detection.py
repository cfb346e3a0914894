"""VOC07 detection transfer: VOC files on disk, the VOC/COCO metrics by hand, Faster R-CNN fits from YAML."""

from __future__ import annotations

import xml.etree.ElementTree as ET
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image
from torchmetrics.detection import MeanAveragePrecision

from mtssl_lightning.cli import run
from mtssl_lightning.evaluation.detection import (
    VOC_CLASSES,
    FasterRCNNDetector,
    VOCBatch,
    VOCDetectionDataModule,
    VOCDetectionDataset,
    VOCMeanAP,
    drop_difficult,
    match_detections,
    parse_voc_annotation,
    voc07_ap,
    voc_ap,
    voc_map,
)
from mtssl_lightning.trunks import ResNetV2

CONFIG = Path(__file__).resolve().parents[2] / "configs" / "eval" / "voc07_detection.yaml"

# (id, width, height, [(class, xmin, ymin, xmax, ymax, difficult or None = no tag)])  -- VOC's 1-based pixels
IMAGES = [
    ("000005", 80, 64, [("chair", 11, 21, 40, 60, 0), ("dog", 45, 5, 79, 30, 1)]),
    ("000007", 64, 80, [("car", 3, 4, 50, 70, None)]),
    ("000009", 96, 72, [("person", 20, 10, 60, 71, 0), ("horse", 61, 30, 96, 72, 0), ("person", 1, 1, 15, 20, 1)]),
    ("000012", 72, 72, [("tvmonitor", 30, 30, 62, 55, 0)]),
    ("000016", 80, 64, [("bicycle", 5, 5, 70, 60, 0)]),
    ("000017", 64, 64, [("cat", 10, 12, 54, 50, 0)]),
]
SPLITS = {"trainval": ["000005", "000007", "000009", "000012"], "test": ["000016", "000017"]}


def write_voc(root: Path, images=IMAGES, splits=SPLITS) -> Path:
    """Write a VOC2007 folder in the real on-disk layout (JPEGs, XML annotations, ImageSets/Main)."""
    voc = root / "VOCdevkit" / "VOC2007"
    for sub in ("JPEGImages", "Annotations", "ImageSets/Main"):
        (voc / sub).mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(0)
    for image_id, width, height, objects in images:
        pixels = rng.integers(0, 60, (height, width, 3), dtype=np.uint8)
        ann = ET.Element("annotation")
        ET.SubElement(ann, "folder").text = "VOC2007"
        ET.SubElement(ann, "filename").text = f"{image_id}.jpg"
        size = ET.SubElement(ann, "size")
        for tag, value in (("width", width), ("height", height), ("depth", 3)):
            ET.SubElement(size, tag).text = str(value)
        for k, (name, x1, y1, x2, y2, difficult) in enumerate(objects):
            pixels[y1 - 1 : y2, x1 - 1 : x2] = (50 + 40 * k, 200, 255 - 30 * k)  # a bright box where the object is
            obj = ET.SubElement(ann, "object")
            ET.SubElement(obj, "name").text = name
            ET.SubElement(obj, "pose").text = "Unspecified"
            ET.SubElement(obj, "truncated").text = "0"
            if difficult is not None:
                ET.SubElement(obj, "difficult").text = str(difficult)
            box = ET.SubElement(obj, "bndbox")
            for tag, value in (("xmin", x1), ("ymin", y1), ("xmax", x2), ("ymax", y2)):
                ET.SubElement(box, tag).text = str(value)
        ET.ElementTree(ann).write(voc / "Annotations" / f"{image_id}.xml")
        Image.fromarray(pixels).save(voc / "JPEGImages" / f"{image_id}.jpg", quality=95)
    for split, ids in splits.items():
        (voc / "ImageSets" / "Main" / f"{split}.txt").write_text("".join(f"{i}\n" for i in ids))
    return root / "VOCdevkit"


@pytest.fixture(scope="module")
def voc_root(tmp_path_factory) -> Path:
    return write_voc(tmp_path_factory.mktemp("voc"))


# ---------------------------------------------------------------------------------- data


def test_annotation_parsed_exactly_as_written(voc_root):
    ann = parse_voc_annotation(voc_root / "VOC2007" / "Annotations" / "000009.xml")
    # 1-based inclusive pixels (xmin, ymin, xmax, ymax) -> 0-based pixel edges (xmin-1, ymin-1, xmax, ymax)
    assert ann.boxes.tolist() == [[19, 9, 60, 71], [60, 29, 96, 72], [0, 0, 15, 20]]
    assert ann.labels.tolist() == [VOC_CLASSES.index(c) + 1 for c in ("person", "horse", "person")]
    assert ann.difficult.tolist() == [False, False, True]
    assert (ann.width, ann.height) == (96, 72)
    # no <difficult> tag means not difficult
    assert parse_voc_annotation(voc_root / "VOC2007" / "Annotations" / "000007.xml").difficult.tolist() == [False]


@pytest.mark.parametrize("where", ["parent", "devkit", "voc2007"])
def test_dataset_layouts_resize_and_flip(voc_root, where):
    root = {"parent": voc_root.parent, "devkit": voc_root, "voc2007": voc_root / "VOC2007"}[where]
    data = VOCDetectionDataset(root, "trainval", image_size=48, max_size=None)
    assert data.ids == SPLITS["trainval"] and len(data) == 4
    sample = data[2]  # 000009: 96 x 72 -> shorter side 48: 64 x 48, scale 2/3 on both axes
    assert sample.image.shape == (3, 48, 64) and sample.image.dtype == torch.uint8
    torch.testing.assert_close(
        sample.boxes, torch.tensor([[19, 9, 60, 71], [60, 29, 96, 72], [0, 0, 15, 20]]) * (2 / 3)
    )
    assert sample.difficult.tolist() == [False, False, True]
    # the longer side is capped by max_size: 96 x 72 with max_size 60 -> 60 x 45
    assert VOCDetectionDataset(root, "trainval", image_size=48, max_size=60)[2].image.shape == (3, 45, 60)

    flipping = VOCDetectionDataset(root, "trainval", image_size=48, max_size=None, hflip=True)
    torch.manual_seed(0)
    seen = set()
    for _ in range(12):
        s = flipping[2]
        flipped = not torch.equal(s.image, sample.image)
        seen.add(flipped)
        if flipped:
            assert torch.equal(s.image, sample.image.flip(-1))
            x1, y1, x2, y2 = sample.boxes.unbind(1)
            torch.testing.assert_close(s.boxes, torch.stack([64 - x2, y1, 64 - x1, y2], 1))
        else:
            torch.testing.assert_close(s.boxes, sample.boxes)
    assert seen == {True, False}


def test_batches_are_named_and_keep_sizes(voc_root):
    dm = VOCDetectionDataModule(str(voc_root), image_size=48, max_size=80, batch_size=3, num_workers=0, hflip=False)
    dm.setup("fit")
    batch = next(iter(dm.val_dataloader()))
    assert isinstance(batch, VOCBatch) and len(batch) == 2 and batch.index.tolist() == [0, 1]
    assert [tuple(im.shape) for im in batch.images] == [(3, 48, 60), (3, 48, 48)]  # 80x64 and 64x64 images
    assert [b.shape for b in batch.boxes] == [(1, 4), (1, 4)]


def test_clear_errors_name_the_path(voc_root, tmp_path):
    with pytest.raises(FileNotFoundError, match="Annotations/ and JPEGImages/") as err:
        VOCDetectionDataset(tmp_path / "nowhere")
    assert "nowhere" in str(err.value)
    with pytest.raises(FileNotFoundError, match=r"val\.txt.*splits found there: \['test', 'trainval'\]"):
        VOCDetectionDataset(voc_root, "val")

    broken = write_voc(tmp_path / "broken", IMAGES[:2], {"trainval": ["000005", "000007"]})
    (broken / "VOC2007" / "Annotations" / "000007.xml").unlink()
    with pytest.raises(FileNotFoundError, match=r"Annotations/000007\.xml"):
        VOCDetectionDataset(broken, "trainval")
    (broken / "VOC2007" / "Annotations" / "000007.xml").write_text("<annotation><object><name>dog")
    with pytest.raises(ValueError, match=r"000007\.xml.*not valid XML"):
        VOCDetectionDataset(broken, "trainval")
    (broken / "VOC2007" / "Annotations" / "000007.xml").write_text(
        "<annotation><object><name>unicorn</name><bndbox><xmin>1</xmin><ymin>1</ymin><xmax>5</xmax>"
        "<ymax>5</ymax></bndbox></object></annotation>"
    )
    with pytest.raises(ValueError, match="unknown class 'unicorn'"):
        VOCDetectionDataset(broken, "trainval")


def test_undecodable_image_is_skipped_and_counted(tmp_path):
    root = write_voc(tmp_path, IMAGES[:2], {"trainval": ["000005", "000007"]})
    (root / "VOC2007" / "JPEGImages" / "000005.jpg").write_bytes(b"not a jpeg")
    data = VOCDetectionDataset(root, "trainval", image_size=32)
    with pytest.warns(UserWarning, match=r"000005\.jpg"):
        batch = VOCBatch.collate([data[0], data[1]])
    assert len(batch) == 1 and batch.skipped == 1 and batch.index.tolist() == [1]


# ------------------------------------------------------------------------------- metrics

A, B, C = [0.0, 0.0, 10.0, 10.0], [20.0, 20.0, 30.0, 30.0], [50.0, 50.0, 60.0, 60.0]


def coco_map50(preds, targets) -> float:
    metric = MeanAveragePrecision(iou_thresholds=[0.5], backend="pycocotools")
    metric.update(*drop_difficult(preds, targets))
    return metric.compute()["map"].item()


def voc07_map50(preds, targets) -> float:
    metric = VOCMeanAP()
    metric.update(preds, targets)
    return metric.compute().map.item()


def test_perfect_predictions_score_one():
    targets = [
        {"boxes": torch.tensor([A, B]), "labels": torch.tensor([3, 7]), "difficult": torch.tensor([False, True])},
        {"boxes": torch.tensor([C, A]), "labels": torch.tensor([7, 12]), "difficult": torch.tensor([False, False])},
    ]
    # every box found exactly, even the difficult one (which VOC neither rewards nor penalises)
    preds = [
        {"boxes": t["boxes"].clone(), "scores": torch.tensor([0.9, 0.8]), "labels": t["labels"].clone()}
        for t in targets
    ]
    assert coco_map50(preds, targets) == pytest.approx(1.0)
    assert voc07_map50(preds, targets) == pytest.approx(1.0)
    assert voc07_ap(torch.tensor([0.5, 1.0]), torch.tensor([1.0, 1.0])).item() == pytest.approx(1.0)


def test_hand_computed_ap_with_a_false_positive_ranked_between():
    # One class, ground truth A and B; detections by score: A (0.9, TP), C (0.8, FP: no overlap), B (0.7, TP).
    # After each detection: recall 1/2, 1/2, 2/2; precision 1/1, 1/2, 2/3.
    # VOC07 11-point: t = 0, .1, ..., .5 (6 points): max precision at recall >= t is 1;
    #   t = .6, ..., 1 (5 points): only the 3rd detection reaches it, 2/3.  AP = (6 + 5 * 2/3) / 11 = 28/33.
    # COCO 101-point: precision made monotone from the right: 1, 2/3, 2/3; recall thresholds 0, .01, ..., 1:
    #   r <= .5 (51 points) -> 1; r in (.5, 1] (50 points) -> 2/3.  AP = (51 + 50 * 2/3) / 101 = 253/303.
    # VOC2010+ area: 1/2 * 1 + 1/2 * 2/3 = 5/6.
    preds = [
        {"boxes": torch.tensor([A, C, B]), "scores": torch.tensor([0.9, 0.8, 0.7]), "labels": torch.tensor([5, 5, 5])}
    ]
    targets = [
        {"boxes": torch.tensor([A, B]), "labels": torch.tensor([5, 5]), "difficult": torch.tensor([False, False])}
    ]
    assert voc07_map50(preds, targets) == pytest.approx(28 / 33)
    assert coco_map50(preds, targets) == pytest.approx(253 / 303, abs=1e-6)
    recall, precision = torch.tensor([0.5, 0.5, 1.0]), torch.tensor([1.0, 0.5, 2 / 3])
    assert voc07_ap(recall, precision).item() == pytest.approx(28 / 33)
    assert voc_ap(recall, precision).item() == pytest.approx(5 / 6)


def test_difficult_and_duplicate_detections():
    # A (difficult) and B; detections: on A (0.95: ignored, neither TP nor FP), B (0.9: TP), B again (0.8: duplicate -> FP).
    # Counted: TP, FP with one positive -> recall 1, 1; precision 1, 1/2 -> AP 1 for both metrics.
    targets = [
        {"boxes": torch.tensor([A, B]), "labels": torch.tensor([2, 2]), "difficult": torch.tensor([True, False])}
    ]
    preds = [
        {"boxes": torch.tensor([A, B, B]), "scores": torch.tensor([0.95, 0.9, 0.8]), "labels": torch.tensor([2, 2, 2])}
    ]
    assert voc07_map50(preds, targets) == pytest.approx(1.0)
    assert coco_map50(preds, targets) == pytest.approx(1.0)
    # A not difficult: the detection on A is now a TP: recall 1/2, 1, 1; precision 1, 1, 2/3 -> AP still 1
    targets[0]["difficult"] = torch.tensor([False, False])
    assert voc07_map50(preds, targets) == pytest.approx(1.0)
    # a box with IoU exactly 1/2 (half of A) matches (VOC devkit: >= 0.5); one just below does not
    half = torch.tensor([[0.0, 0.0, 10.0, 5.0], [0.0, 0.0, 10.0, 4.9]])
    m = match_detections(
        half,
        torch.tensor([0.9, 0.8]),
        torch.tensor([1, 1]),
        torch.tensor([0, 1]),
        torch.tensor([A, A]),
        torch.tensor([1, 1]),
        torch.tensor([False, False]),
        torch.tensor([0, 1]),
    )
    assert m.true_positive.tolist() == [True, False] and m.gt_index.tolist() == [0, -1]


def reference_voc07_map(dets, gts, use_07=True):
    """The VOC devkit's per-class loop (voc_eval.py), written out plainly: an independent check."""
    aps = []
    for label in sorted({g[1] for g in gts if not g[3]}):
        class_gts = [g for g in gts if g[1] == label]
        npos = sum(not g[3] for g in class_gts)
        used = set()
        class_dets = sorted([d for d in dets if d[1] == label], key=lambda d: -d[2])
        tp, fp = [], []
        for image, _, _, box in class_dets:
            best, best_j = -1.0, None
            for j, g in enumerate(class_gts):
                if g[0] != image:
                    continue
                ix = max(0.0, min(box[2], g[2][2]) - max(box[0], g[2][0]))
                iy = max(0.0, min(box[3], g[2][3]) - max(box[1], g[2][1]))
                inter = ix * iy
                union = (box[2] - box[0]) * (box[3] - box[1]) + (g[2][2] - g[2][0]) * (g[2][3] - g[2][1]) - inter
                if inter / union > best:
                    best, best_j = inter / union, j
            if best >= 0.5:
                if class_gts[best_j][3]:
                    continue  # difficult: ignored
                if best_j not in used:
                    used.add(best_j)
                    tp.append(1), fp.append(0)
                else:
                    tp.append(0), fp.append(1)
            else:
                tp.append(0), fp.append(1)
        tp, fp = np.cumsum(tp), np.cumsum(fp)
        rec = tp / npos
        prec = tp / np.maximum(tp + fp, 1e-12)
        ap = 0.0
        for t in np.linspace(0, 1, 11):
            ap += (prec[rec >= t - 1e-12].max() if (rec >= t - 1e-12).any() else 0.0) / 11
        aps.append(ap)
    return float(np.mean(aps))


def test_voc_map_agrees_with_the_devkit_loop():
    g = torch.Generator().manual_seed(0)
    num_images, num_gt, num_det = 6, 30, 120
    gt_xy = torch.rand(num_gt, 2, generator=g) * 60
    gt_boxes = torch.cat([gt_xy, gt_xy + 10 + torch.rand(num_gt, 2, generator=g) * 30], 1)
    gt_labels = torch.randint(1, 4, (num_gt,), generator=g)
    gt_images = torch.randint(0, num_images, (num_gt,), generator=g)
    gt_difficult = torch.rand(num_gt, generator=g) < 0.2
    src = torch.randint(0, num_gt, (num_det,), generator=g)  # detections jittered around ground truth, some far off
    det_boxes = gt_boxes[src] + torch.randn(num_det, 4, generator=g) * 4
    det_boxes[:, 2:] = torch.maximum(det_boxes[:, 2:], det_boxes[:, :2] + 1)
    det_labels = torch.where(
        torch.rand(num_det, generator=g) < 0.8, gt_labels[src], torch.randint(1, 4, (num_det,), generator=g)
    )
    det_images = torch.where(
        torch.rand(num_det, generator=g) < 0.9, gt_images[src], torch.randint(0, num_images, (num_det,), generator=g)
    )
    det_scores = torch.rand(num_det, generator=g)
    result = voc_map(det_boxes, det_scores, det_labels, det_images, gt_boxes, gt_labels, gt_difficult, gt_images)
    dets = [(int(i), int(c), float(s), b.tolist()) for i, c, s, b in zip(det_images, det_labels, det_scores, det_boxes)]
    gts = [(int(i), int(c), b.tolist(), bool(d)) for i, c, b, d in zip(gt_images, gt_labels, gt_boxes, gt_difficult)]
    expected = reference_voc07_map(dets, gts)
    assert 0.2 < expected < 0.95  # a non-trivial case
    assert result.map.item() == pytest.approx(expected, abs=1e-9)


# --------------------------------------------------------------------------- end to end


def tiny_overrides(tmp_path: Path, voc_root: Path, checkpoint: Path, frozen: bool) -> list[str]:
    return [
        "--config",
        str(CONFIG),
        "--trainer.accelerator=cpu",
        "--trainer.max_steps=2",
        "--trainer.val_check_interval=2",  # the config validates every 5000 steps
        "--trainer.logger=false",
        "--trainer.callbacks=[]",
        "--trainer.enable_checkpointing=false",
        "--trainer.enable_progress_bar=false",
        "--trainer.num_sanity_val_steps=0",
        f"--trainer.default_root_dir={tmp_path}",
        f"--model.checkpoint={checkpoint}",
        "--model.trunk.init_args.depth=tiny",  # the config's baseline trunk, unused with a checkpoint: keep it cheap
        "--model.trunk.init_args.width=0.125",
        f"--model.frozen={str(frozen).lower()}",
        "--model.min_size=64",
        "--model.max_size=96",
        "--model.anchor_sizes=[16, 32, 64]",
        "--model.rpn_pre_nms_top_n_train=64",
        "--model.rpn_post_nms_top_n_train=16",
        "--model.rpn_pre_nms_top_n_test=64",
        "--model.rpn_post_nms_top_n_test=16",
        "--model.rpn_batch_size_per_image=32",
        "--model.box_batch_size_per_image=16",
        "--model.box_score_thresh=0.0",
        "--model.box_detections_per_img=20",
        "--model.warmup_steps=1",
        "--model.optimizer.init_args.lr=0.05",
        f"--data.root={voc_root}",
        "--data.image_size=64",
        "--data.max_size=96",
        "--data.batch_size=2",
        "--data.num_workers=0",
    ]


@pytest.fixture(scope="module")
def trunk_export(tmp_path_factory) -> Path:
    torch.manual_seed(0)
    trunk = ResNetV2("tiny", width=0.125)
    path = tmp_path_factory.mktemp("trunk") / "trunk.pt"
    torch.save({"trunk_spec": trunk.spec(), "state_dict": trunk.state_dict()}, path)
    return path


@pytest.mark.parametrize("frozen", [True, False], ids=["frozen", "finetune"])
def test_fit_then_validate_from_yaml(tmp_path, voc_root, trunk_export, frozen):
    before = torch.load(trunk_export, weights_only=True)["state_dict"]
    cli = run(["fit", *tiny_overrides(tmp_path, voc_root, trunk_export, frozen)])
    model = cli.model
    assert isinstance(model, FasterRCNNDetector) and cli.trainer.global_step == 2
    assert model.model.transform.image_mean == [0.0] * 3 and model.model.transform.image_std == [1.0] * 3
    after = model.trunk.state_dict()
    assert after.keys() == before.keys()
    changed = [k for k in before if not torch.equal(before[k], after[k].cpu())]
    if frozen:
        assert changed == []  # weights and BN running statistics untouched
        assert all(not p.requires_grad for p in model.trunk.parameters())
    else:
        trunk_params = {n for n, _ in model.trunk.named_parameters()}
        assert trunk_params & set(changed), "fine-tuning did not change any trunk weight"
    for name in (
        "train/loss",
        "train/loss_classifier",
        "train/loss_box_reg",
        "train/loss_objectness",
        "train/loss_rpn_box_reg",
    ):
        assert torch.isfinite(cli.trainer.callback_metrics[name]), name
    # validation ran at the end of the (2-step) epoch
    for name in ("val/mAP50", "val/mAP50_voc07"):
        assert 0.0 <= cli.trainer.callback_metrics[name].item() <= 1.0, name

    if frozen:  # `mtssl validate` on the trained weights, restored from a Lightning checkpoint
        cli.trainer.save_checkpoint(tmp_path / "detector.ckpt")
        cli = run(
            [
                "validate",
                *tiny_overrides(tmp_path, voc_root, trunk_export, frozen),
                f"--ckpt_path={tmp_path / 'detector.ckpt'}",
            ]
        )
        metrics = cli.trainer.callback_metrics
        assert {"val/mAP50", "val/mAP50_voc07"} <= set(metrics)
        assert all(0.0 <= metrics[k].item() <= 1.0 for k in ("val/mAP50", "val/mAP50_voc07"))
