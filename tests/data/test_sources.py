"""Image sources and crops on real files written to a temporary folder (the DataModule: test_datamodule.py)."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from PIL import Image

from mtssl_lightning.data import ImageFolder, MultiTaskDataModule, SampleImages
from toy_tasks import BrightnessSampler
from mtssl_lightning.data.datasets import CropDataset, random_resized_box
from mtssl_lightning.data.sample import SAMPLE_NAMES, SAMPLE_VAL_NAMES, sample_images


def _write_tree(root, n=6):
    rng = np.random.default_rng(0)
    paths = []
    for i in range(n):
        sub = root / f"class{i % 2}" / ("deep" if i % 3 == 0 else "")
        sub.mkdir(parents=True, exist_ok=True)
        ext = [".jpg", ".png", ".JPEG"][i % 3]
        path = sub / f"img{i}{ext}"
        Image.fromarray(rng.integers(0, 255, (40 + i, 50, 3), dtype=np.uint8)).save(path, format="PNG" if ext == ".png" else "JPEG")
        paths.append(path)
    (root / "notes.txt").write_text("not an image")
    return paths


def test_sample_photos_are_real_rgb_and_split_fixed():
    photos = sample_images("all")
    assert len(photos) >= 10 and set(photos) == set(SAMPLE_NAMES)
    for name, image in photos.items():
        assert image.dtype == np.uint8 and image.ndim == 3 and image.shape[2] == 3, name
        assert min(image.shape[:2]) >= 256, name
        # a colour photo: channels are not all identical
        assert np.abs(image[..., 0].astype(int) - image[..., 2]).mean() > 1, name
    train, val = SampleImages("train"), SampleImages("val")
    assert set(val.names) == set(SAMPLE_VAL_NAMES) and not set(train.names) & set(val.names)
    assert len(train) + len(val) == len(photos)


def test_image_folder_is_recursive_and_split_is_deterministic(tmp_path):
    paths = _write_tree(tmp_path, n=12)
    source = ImageFolder(tmp_path)
    assert len(source) == 12  # notes.txt ignored, upper-case .JPEG found, nested folders found
    assert source.load(0).mode == "RGB"
    train, val = source.split(0.25)
    train2, val2 = ImageFolder(tmp_path).split(0.25)
    assert val.names == val2.names and train.names == train2.names
    assert len(val) >= 1 and not set(train.names) & set(val.names)
    assert len(train) + len(val) == len(paths)
    # adding images never moves an existing one between the splits
    Image.fromarray(np.zeros((30, 30, 3), np.uint8)).save(tmp_path / "new.png")
    _, val3 = ImageFolder(tmp_path).split(0.25)
    assert set(val.names) <= set(val3.names) or len(val.names) == 1


def test_missing_or_empty_folder_errors_name_the_folder(tmp_path):
    with pytest.raises(FileNotFoundError, match="does not exist"):
        ImageFolder(tmp_path / "nope")
    with pytest.raises(FileNotFoundError, match="no image files"):
        ImageFolder(tmp_path)


def test_crops_have_the_requested_size_and_bad_files_are_skipped(tmp_path):
    _write_tree(tmp_path, n=4)
    (tmp_path / "broken.jpg").write_bytes(b"\xff\xd8 this is not a jpeg")
    source = ImageFolder(tmp_path)
    dataset = CropDataset(source, size=32, length=10, train=True)
    with pytest.warns(UserWarning, match="broken.jpg"):
        items = [dataset[i] for i in range(len(source))]
    for image, index in items:
        assert image.shape == (3, 32, 32) and image.dtype == torch.uint8
        assert source.names[index] != "broken.jpg"


def test_validation_crops_are_fixed_per_index():
    dataset = CropDataset(SampleImages("val"), size=48, length=6, train=False, seed=3)
    a = torch.stack([dataset[i][0] for i in range(6)])
    b = torch.stack([dataset[i][0] for i in range(6)])
    assert torch.equal(a, b)
    assert not torch.equal(a[0], a[2])  # same photo, different fixed crop


def test_random_resized_box_stays_inside_and_covers_min_scale():
    g = torch.Generator().manual_seed(0)
    for _ in range(200):
        x0, y0, x1, y1 = random_resized_box(300, 200, 0.3, g)
        assert 0 <= x0 < x1 <= 300 and 0 <= y0 < y1 <= 200
        assert (x1 - x0) * (y1 - y0) >= 0.3 * 300 * 200 * 0.97
        assert 3 / 4 * 0.97 <= (x1 - x0) / (y1 - y0) <= 4 / 3 * 1.03


# ---------------------------------------------------------------------------------------------
# A folder as real collections have it: odd modes, EXIF rotation, extreme sizes, broken files.


def _messy_folder(root):
    """Good images in every awkward form, plus four broken files; returns the broken names."""
    rng = np.random.default_rng(1)
    root.mkdir(parents=True, exist_ok=True)
    Image.fromarray(rng.integers(0, 255, (60, 80, 3), dtype=np.uint8)).save(root / "rgb.jpg")
    Image.fromarray(np.full((50, 50), 77, np.uint8)).save(root / "grey.png")
    Image.fromarray(np.full((50, 50, 4), (10, 200, 30, 128), np.uint8), "RGBA").save(root / "rgba.png")
    Image.fromarray(rng.integers(0, 255, (50, 50, 3), dtype=np.uint8)).convert("P").save(root / "palette.gif")
    Image.new("CMYK", (50, 50), (0, 255, 255, 0)).save(root / "cmyk.jpg")  # pure red in CMYK
    Image.fromarray(np.full((50, 50), 32768, np.uint16)).save(root / "sixteen.png")  # 16-bit grey, half scale
    rotated = np.zeros((20, 40, 3), np.uint8)
    rotated[:, :20] = (255, 0, 0)  # left half red: shown after a 90° clockwise turn, red is on top
    exif = Image.Exif()
    exif[0x0112] = 6  # EXIF orientation "rotate 90° CW to display", as phones write it
    Image.fromarray(rotated).save(root / "phone.jpg", exif=exif, quality=95)
    Image.fromarray(np.full((3, 4, 3), 200, np.uint8)).save(root / "tiny.png")
    Image.fromarray(rng.integers(0, 255, (2000, 3000, 3), dtype=np.uint8)).save(root / "huge.jpg", quality=50)
    good = root / "rgb.jpg"
    (root / "corrupt.jpg").write_bytes(good.read_bytes()[:200] + bytes(rng.integers(0, 255, 4000, dtype=np.uint8)))
    Image.fromarray(rng.integers(0, 255, (64, 64, 3), dtype=np.uint8)).save(root / "big.png")
    (root / "truncated.png").write_bytes((root / "big.png").read_bytes()[:2000])
    (root / "empty.jpg").write_bytes(b"")
    (root / "notes.jpg").write_text("this is a text file with an image suffix")
    return {"corrupt.jpg", "truncated.png", "empty.jpg", "notes.jpg"}


def _loaded(source, name):
    return np.asarray(source.load(source.names.index(name)))


def test_awkward_images_are_converted_to_rgb(tmp_path):
    _messy_folder(tmp_path)
    source = ImageFolder(tmp_path).check("decode")
    assert np.all(_loaded(source, "grey.png") == 77)  # grey -> R = G = B
    assert tuple(_loaded(source, "rgba.png")[0, 0]) == (10, 200, 30)  # alpha dropped
    assert _loaded(source, "palette.gif").shape == (50, 50, 3)
    red = _loaded(source, "cmyk.jpg").reshape(-1, 3).mean(0)
    assert red[0] > 200 and red[1] < 60 and red[2] < 60  # CMYK red stays red
    assert np.all(np.abs(_loaded(source, "sixteen.png").astype(int) - 128) <= 1)  # scaled, not clipped to 255
    phone = _loaded(source, "phone.jpg").astype(int)
    assert phone.shape == (40, 20, 3)  # EXIF orientation applied: portrait
    assert phone[:18, :, 0].mean() > 200 and phone[22:, :, 0].mean() < 50  # red on top
    # far smaller and far larger than the crop: both give crops of the requested size
    dataset = CropDataset(source, size=48, train=True)
    for name in ("tiny.png", "huge.jpg"):
        image, index = dataset[source.names.index(name)]
        assert image.shape == (3, 48, 48) and source.names[index] == name


def test_check_skips_each_bad_file_with_one_warning_and_logs_the_count(tmp_path, caplog):
    broken = _messy_folder(tmp_path)
    total = len(ImageFolder(tmp_path))
    with pytest.warns(UserWarning) as record, caplog.at_level("WARNING"):
        source = ImageFolder(tmp_path).check("decode")
    warned = [str(w.message) for w in record if "skipping image" in str(w.message)]
    for name in broken:
        assert sum(name in m for m in warned) == 1, (name, warned)
    assert len(warned) == len(broken) and set(source.names) == set(ImageFolder(tmp_path).names) - broken
    assert f"{len(broken)} of {total} images" in caplog.text
    # the cheap header check catches the files that are not images at all ...
    with pytest.warns(UserWarning):
        header_checked = ImageFolder(tmp_path).check("header")
    assert {"empty.jpg", "notes.jpg"}.isdisjoint(header_checked.names)
    # ... and the workers skip the ones whose pixel data is broken, counting them per batch
    assert {"corrupt.jpg", "truncated.png"} <= set(header_checked.names)
    dataset = CropDataset(header_checked, size=32, length=len(header_checked), train=True)
    with pytest.warns(UserWarning, match="skipping unreadable image"):
        batches = [dataset.collate([dataset[i] for i in range(k, min(k + 4, len(dataset)))]) for k in range(0, len(dataset), 4)]
    assert sum(b.skipped for b in batches) == 2
    assert all(header_checked.names[int(i)] not in broken for b in batches for i in b.index)


def test_a_folder_without_one_usable_image_fails_before_training(tmp_path):
    bad = tmp_path / "bad"
    bad.mkdir()
    (bad / "empty.jpg").write_bytes(b"")
    (bad / "notes.png").write_text("not a png")
    dm = MultiTaskDataModule(image_root=str(bad), num_workers=0, samplers={"a": BrightnessSampler(batch_size=2, image_size=32)})
    with pytest.warns(UserWarning), pytest.raises(ValueError, match=r"none of the 2 images .*bad.*Add readable images"):
        dm.setup("fit")


def test_training_counts_the_files_workers_skipped(tmp_path):
    import lightning.pytorch as pl
    from toy_tasks import Brightness

    from mtssl_lightning import MultiTaskSSL
    from mtssl_lightning.trunks import ResNetV2

    _messy_folder(tmp_path / "images")
    (tmp_path / "images" / "huge.jpg").unlink()  # keeps the test quick
    model = MultiTaskSSL({"b": Brightness(batch_size=4, image_size=32)}, ResNetV2("tiny", width=0.125))
    dm = MultiTaskDataModule(image_root=str(tmp_path / "images"), val_root=str(tmp_path / "images"), num_workers=0, steps_per_epoch=3)
    trainer = pl.Trainer(accelerator="cpu", max_steps=3, logger=False, enable_checkpointing=False, enable_progress_bar=False, limit_val_batches=0)
    with pytest.warns(UserWarning, match="skipping"):
        trainer.fit(model, dm)
    # header check: empty.jpg and notes.jpg screened out; corrupt.jpg and truncated.png met by the (one) worker
    assert trainer.callback_metrics["train/skipped_files"].item() == 2
