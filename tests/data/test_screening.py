"""Screening once: the fast listing, the cache keyed by the listing (only what changed is probed
again), parallel probing, videos screened and cached like images, clips drawn over clips."""

from __future__ import annotations

import logging
import os
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image
from toy_tasks import BrightnessSampler

from mtssl_lightning.data import ImageFolder, MultiTaskDataModule
from mtssl_lightning.data import sources as sources_module
from mtssl_lightning.data.clips import ClipDataset
from mtssl_lightning.data.frames import FrameFolder
from mtssl_lightning.data.screening import Listing, cache_path, list_files, read_cache, screen_folder
from mtssl_lightning.data.sources import IMAGE_EXTENSIONS, image_probe
from mtssl_lightning.data.video import VideoFolder


def _jpeg(path: Path, seed: int = 0, size: tuple[int, int] = (24, 32)) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(seed)
    Image.fromarray(rng.integers(0, 255, (*size, 3), dtype=np.uint8)).save(path, quality=90)
    return path


def _folder(root: Path, n: int = 8) -> Path:
    for i in range(n):
        _jpeg(root / f"c{i % 3}" / f"img{i}.jpg", seed=i)
    (root / "empty.jpg").write_bytes(b"")
    (root / "notes.png").write_text("not a png")
    return root


def _walk_names(root: Path, exts: tuple[str, ...]) -> list[str]:
    """What the listing replaced: os.walk and Path arithmetic per file."""
    return sorted(
        str(Path(d, f).relative_to(root)) for d, _, files in os.walk(root, followlinks=True) for f in files if f.lower().endswith(exts)
    )


def test_listing_equals_the_os_walk_listing_and_follows_links(tmp_path):
    root = _folder(tmp_path / "images")
    _jpeg(root / "deep" / "er" / "UPPER.JPEG")
    (root / "a_dir.jpg").mkdir()  # a folder named like an image is not a file
    (tmp_path / "outside").mkdir()
    _jpeg(tmp_path / "outside" / "linked.jpg")
    os.symlink(tmp_path / "outside", root / "link")
    os.symlink(root, root / "c0" / "loop")  # a link loop is listed once, never followed forever
    listing = list_files(root, IMAGE_EXTENSIONS, "image")
    assert listing.names == [n for n in _walk_names(root, IMAGE_EXTENSIONS) if not n.startswith("c0/loop/")]
    assert "link/linked.jpg" in listing.names and "deep/er/UPPER.JPEG" in listing.names
    empty = listing.names.index("empty.jpg")
    assert listing.sizes[empty] == 0 and listing.sizes.dtype == np.int64 and listing.mtimes.dtype == np.int64
    with pytest.raises(FileNotFoundError, match="no image files"):
        list_files(tmp_path / "outside" / "..", (".xyz",), "image")


def test_the_listing_key_changes_with_any_name_size_or_mtime():
    base = Listing(["a.jpg", "b.jpg"], np.array([10, 20]), np.array([1, 2]))
    assert base.key() == Listing(["a.jpg", "b.jpg"], np.array([10, 20]), np.array([1, 2])).key()
    for other in (
        Listing(["a.jpg", "c.jpg"], np.array([10, 20]), np.array([1, 2])),  # renamed
        Listing(["a.jpg", "b.jpg"], np.array([10, 21]), np.array([1, 2])),  # resized
        Listing(["a.jpg", "b.jpg"], np.array([10, 20]), np.array([1, 3])),  # rewritten
        Listing(["a.jpg"], np.array([10]), np.array([1])),  # removed
        Listing(["a.jpg\0b.jpg"], np.array([10]), np.array([1])),  # names cannot run together
    ):
        assert other.key() != base.key()


def test_the_cache_is_reused_when_nothing_changed_and_only_changes_are_probed_again(tmp_path, monkeypatch):
    root = _folder(tmp_path / "images")
    cache = tmp_path / "cache"
    probed: list[str] = []

    def counting_probe(path, mode="header"):
        probed.append(Path(path).name)
        return image_probe(path, mode)

    monkeypatch.setattr(sources_module, "image_probe", counting_probe)
    first = ImageFolder(root).screen("header", cache, workers=1, progress=False)
    assert first.probed == 9 and len(probed) == 9  # 8 images + notes.png; empty.jpg needs no probe
    assert {first.names[i] for i in first.reasons} == {"empty.jpg", "notes.png"}
    assert cache_path(cache, root, "images", "header").is_file()

    probed.clear()
    again = ImageFolder(root).screen("header", cache, workers=1, progress=False)
    assert again.probed == 0 and probed == [] and again.key == first.key
    assert again.names == first.names and again.reasons == first.reasons

    # a rewritten file, a new one and a removed one: only the first two are probed
    (root / "c1" / "img1.jpg").write_text("now broken")
    _jpeg(root / "c2" / "new.jpg", seed=99)
    (root / "c0" / "img0.jpg").unlink()
    probed.clear()
    changed = ImageFolder(root).screen("header", cache, workers=1, progress=False)
    assert sorted(probed) == ["img1.jpg", "new.jpg"] and changed.key != first.key
    assert {changed.names[i] for i in changed.reasons} == {"empty.jpg", "notes.png", "c1/img1.jpg"}
    assert "c0/img0.jpg" not in changed.names and "c2/new.jpg" in changed.names
    # another mode keeps its own cache
    probed.clear()
    ImageFolder(root).screen("decode", cache, workers=1, progress=False)
    assert len(probed) == 9


def test_a_damaged_cache_is_screened_again_never_trusted(tmp_path, caplog):
    root = _folder(tmp_path / "images")
    cache = tmp_path / "cache"
    first = ImageFolder(root).screen("header", cache, workers=1, progress=False)
    path = cache_path(cache, root, "images", "header")
    path.write_bytes(path.read_bytes()[:100])
    with caplog.at_level(logging.WARNING):
        again = ImageFolder(root).screen("header", cache, workers=1, progress=False)
    assert "unreadable screening cache" in caplog.text and again.probed == 9 and again.reasons == first.reasons
    assert read_cache(path, "images", "header") is not None  # rewritten


def test_many_files_are_probed_in_processes_with_a_progress_bar(tmp_path, capsys):
    root = tmp_path / "many"
    good = _jpeg(tmp_path / "good.jpg")
    (tmp_path / "bad.jpg").write_text("not a jpeg")
    root.mkdir()
    for i in range(600):  # more than two chunks: the process pool runs
        os.link(tmp_path / ("bad.jpg" if i % 100 == 7 else "good.jpg"), root / f"{i:04d}.jpg")
    screening = screen_folder(root, (".jpg",), "images", "header", sources_module.image_probe, workers=2, progress=True)
    assert sorted(screening.reasons) == [7, 107, 207, 307, 407, 507]
    assert all("unreadable" in r for r in screening.reasons.values()) and good.is_file()
    err = capsys.readouterr().err
    assert "screening 600 images" in err and "600/600" in err and "files/s" in err


def test_check_reports_the_same_with_and_without_the_cache(tmp_path):
    root = _folder(tmp_path / "images")
    with pytest.warns(UserWarning, match="skipping image") as fresh:
        a = ImageFolder(root).check("header", tmp_path / "cache")
    with pytest.warns(UserWarning, match="skipping image") as cached:
        b = ImageFolder(root).check("header", tmp_path / "cache")
    assert a.names == b.names and len(a) == 8
    assert sorted(str(w.message) for w in fresh) == sorted(str(w.message) for w in cached)


def test_the_datamodule_caches_beside_the_run_and_a_second_start_probes_nothing(tmp_path, monkeypatch):
    root = _folder(tmp_path / "images", n=12)
    sampler = {"a": BrightnessSampler(batch_size=2, image_size=16)}
    dm = MultiTaskDataModule(image_root=str(root), cache_dir=str(tmp_path / "cache"), num_workers=0, samplers=sampler)
    with pytest.warns(UserWarning, match="skipping image"):
        dm.prepare_data()
        dm.setup("fit")
    names = dm.train_images.names + dm.val_images.names
    assert len(names) == 12 and any(p.name.startswith("screen-images-header") for p in (tmp_path / "cache").iterdir())

    def no_probe(*args, **kwargs):
        raise AssertionError("probed although the cache covers the folder")

    monkeypatch.setattr(sources_module, "image_probe", no_probe)
    again = MultiTaskDataModule(image_root=str(root), cache_dir=str(tmp_path / "cache"), num_workers=0, samplers=sampler)
    with pytest.warns(UserWarning, match="skipping image"):  # the same report, from the cache
        again.setup("fit")
    assert again.train_images.names + again.val_images.names == names
    assert not again.prepare_data_per_node  # Lightning runs prepare_data on global rank 0 only


def test_datamodule_errors_name_the_folder_with_the_cache(tmp_path):
    sampler = {"a": BrightnessSampler(batch_size=2, image_size=16)}
    dm = MultiTaskDataModule(image_root=str(tmp_path / "nope"), cache_dir=str(tmp_path / "cache"), num_workers=0, samplers=sampler)
    dm.prepare_data()  # kept, not raised: see SharedScreenings
    with pytest.raises(FileNotFoundError, match="nope.*does not exist"):
        dm.setup("fit")


# ------------------------------------------------------------------------------------ videos


def _video(path: Path, frames: int) -> None:
    import av

    with av.open(str(path), "w") as container:
        stream = container.add_stream("mpeg4", rate=25)
        stream.width, stream.height, stream.pix_fmt = 32, 32, "yuv420p"
        for t in range(frames):
            image = np.full((32, 32, 3), (t * 8) % 255, np.uint8)
            for packet in stream.encode(av.VideoFrame.from_ndarray(image, format="rgb24")):
                container.mux(packet)
        for packet in stream.encode():
            container.mux(packet)


def test_videos_are_screened_once_and_cached_for_both_windows(tmp_path):
    root = tmp_path / "videos"
    root.mkdir()
    _video(root / "a.mp4", 20)
    _video(root / "b.mp4", 12)
    (root / "bad.mp4").write_text("not a video")
    direct = VideoFolder(root)
    expected = [direct.num_frames(i) if direct.names[i] != "bad.mp4" else None for i in range(3)]
    screening = VideoFolder(root).screen(tmp_path / "cache", workers=1, progress=False)
    assert VideoFolder(root).screen(tmp_path / "cache", workers=1, progress=False).probed == 0
    for window in ((0.0, 0.8), (0.8, 1.0)):
        source = VideoFolder(root, names=screening.names, frame_range=window)
        source.use_screening(screening)
        probe = VideoFolder(root, frame_range=window)
        for i, name in enumerate(source.names):
            if name == "bad.mp4":
                with pytest.raises(RuntimeError, match="bad.mp4"):
                    source.num_frames(i)
            else:
                assert source.num_frames(i) == probe.num_frames(i) and source._info[i] == probe._info[i]
        clip = source.read_clip(0, 0, 2)
        assert np.array_equal(clip, probe.read_clip(0, 0, 2))
    assert expected[0] == 20 and expected[1] == 12


def test_clips_are_drawn_uniformly_over_clips_not_videos(tmp_path):
    for name, frames in (("long", 40), ("short", 10)):
        folder = tmp_path / name
        folder.mkdir()
        for t in range(frames):
            Image.fromarray(np.full((8, 8, 3), t, np.uint8)).save(folder / f"{t:03d}.png")
    source = FrameFolder(tmp_path)
    dataset = ClipDataset(source, size=8, clip_length=1, length=1000, train=True)
    torch.manual_seed(0)
    drawn = [dataset[i][1] for i in range(500)]
    long_share = drawn.count(source.names.index("long")) / len(drawn)
    assert abs(long_share - 40 / 50) < 0.06  # 40 of the 50 clips are in the long video
