"""The VOC on-disk format: annotations parsed exactly as written, clear errors naming the path."""

from __future__ import annotations

import pytest

from evaluation.helpers import IMAGES, write_voc
from mtssl_lightning.evaluation.detection.data import VOCDetectionDataset
from mtssl_lightning.evaluation.detection.voc import VOC_CLASSES, parse_voc_annotation


def test_annotation_parsed_exactly_as_written(voc_root):
    ann = parse_voc_annotation(voc_root / "VOC2007" / "Annotations" / "000009.xml")
    # 1-based inclusive pixels (xmin, ymin, xmax, ymax) -> 0-based pixel edges (xmin-1, ymin-1, xmax, ymax)
    assert ann.boxes.tolist() == [[19, 9, 60, 71], [60, 29, 96, 72], [0, 0, 15, 20]]
    assert ann.labels.tolist() == [VOC_CLASSES.index(c) + 1 for c in ("person", "horse", "person")]
    assert ann.difficult.tolist() == [False, False, True]
    assert (ann.width, ann.height) == (96, 72)
    # no <difficult> tag means not difficult
    assert parse_voc_annotation(voc_root / "VOC2007" / "Annotations" / "000007.xml").difficult.tolist() == [False]


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
