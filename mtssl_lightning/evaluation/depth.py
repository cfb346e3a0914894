"""NYU depth v2 transfer: monocular depth from the (pretrained) trunk with an up-projection decoder.

The paper's third transfer task (after ImageNet and PASCAL): fine-tune the trunk with a
Laina et al. (2016) style up-projection decoder on NYU depth v2 and report the share of
pixels with ``max(d / d*, d* / d) < 1.25``.

**Data** (:class:`NYUDepthDataModule`, ``data.root``), three on-disk layouts:

* the official labelled file ``nyu_depth_v2_labeled.mat`` (MATLAB v7.3 = HDF5; 1449 frames,
  ``images`` stored as ``(N, 3, W, H)`` uint8 and ``depths`` as ``(N, W, H)`` float32 metres,
  MATLAB's column-major layout, transposed back to ``(H, W)`` here). The split is the official
  ``splits.mat`` (``trainNdxs`` / ``testNdxs``, 1-based; ``data.split_file``, or a
  ``splits.mat`` beside the labelled file), otherwise a deterministic *contiguous* split: the
  last ``data.test_fraction`` of the frames are the test set (the frames are stored scene by
  scene, so at most one scene straddles the cut). The fraction split is **not** the official
  one: numbers on it are not comparable with published ones.
* a folder ``<root>/<split>/…`` (``split`` = ``train`` / ``test``, any depth of sub-folders)
  where every depth map ``<name>_depth.png`` pairs with the image ``<name>.png``,
  ``<name>.jpg`` or ``<name>.jpeg`` beside it (the single pairing rule).
* list files ``<root>/nyu2_<split>.csv`` with lines ``rgb_path,depth_path`` (DenseDepth's
  export); relative paths are resolved against ``<root>``, then against its parent.

Depth PNGs: 16-bit values times ``png_depth_scale`` metres (default 0.001: millimetres, as in
the BTS and DenseDepth test exports); 8-bit values times ``png_depth_scale_8bit`` (default
10/255: DenseDepth's 8-bit training export). A depth of 0 (or non-finite) is invalid and
masked out of the loss and the metrics. The validation loop runs on the **test split** (NYU has no
official validation split; do not select models on it if you report its numbers).

**Model** (:class:`DepthEstimator`): trunk (``frozen`` or fine-tuned) → 1×1 conv + BN →
up-projection blocks ×2 each until ``output_stride`` (default 1/4 of the input) → 3×3 conv
to one channel → bilinear to the input size → ``softplus + 1e-3``: depth in metres, always
positive (softplus rather than exp so that early, badly scaled outputs give bounded gradients).
Loss: berHu (:func:`berhu_loss`) or L1 over the valid pixels. Metrics: :class:`DepthMetrics`.
"""

from __future__ import annotations

import csv
import logging
import math
import os
import warnings
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal

import lightning.pytorch as pl
import numpy as np
import torch
import torch.nn.functional as F
from lightning.pytorch.cli import LRSchedulerCallable, OptimizerCallable
from PIL import Image
from torch import Tensor, nn
from torch.utils.data import DataLoader, Dataset
from torchmetrics import Metric

from mtssl_lightning.data.datamodule import init_worker
from mtssl_lightning.evaluation.backbone import Representation, SavesTrunkSpec, TrunkRepresentation, pretrained_trunk
from mtssl_lightning.trunks import ResNetV2, Trunk
from mtssl_lightning.trunks.base import apply_speed_options

log = logging.getLogger(__name__)

NYU_LABELED_URL = "http://horatio.cs.nyu.edu/mit/silberman/nyu_depth_v2/nyu_depth_v2_labeled.mat"
NYU_SPLITS_URL = "http://horatio.cs.nyu.edu/mit/silberman/indoor_seg_sup/splits.mat"
#: Eigen et al.'s evaluation crop of a 480×640 NYU frame (rows 45:471, columns 41:601)
EIGEN_CROP = (45, 471, 41, 601)
EIGEN_FRAME = (480, 640)
IMAGE_SUFFIXES = (".png", ".jpg", ".jpeg")
DEPTH_SUFFIX = "_depth.png"
MIN_DEPTH = 1e-3  # metres added to the softplus: a prediction is never 0 (δ and abs-rel stay finite)
INIT_DEPTH = 2.5  # metres: the decoder starts near NYU's typical depth instead of softplus(0) = 0.69

Loss = Literal["berhu", "l1"]
Upsample = Literal["unpool", "nearest"]


# --------------------------------------------------------------------------- batches
@dataclass
class DepthSample:
    """One frame after cropping/resizing (what a worker returns).

    Attributes:
        image: ``(3, H, W)`` float32 RGB in [0, 1].
        depth: ``(1, h, w)`` float32 metres, 0 where invalid (``(h, w)`` = ``(H, W)``, or the
            frame's original size for full-resolution evaluation).
        valid: ``(1, h, w)`` bool.
        index: the frame's index in its source.
    """

    image: Tensor
    depth: Tensor
    valid: Tensor
    index: int


@dataclass
class DepthBatch:
    """A batch of NYU frames.

    Attributes:
        images: ``(B, 3, H, W)`` float32 RGB in [0, 1].
        depth: ``(B, 1, h, w)`` float32 ground-truth depth in metres (0 where invalid).
        valid: ``(B, 1, h, w)`` bool, the pixels that count in losses and metrics.
        index: ``(B,)`` int64 frame index in the source (for tracing samples).
    """

    images: Tensor
    depth: Tensor
    valid: Tensor
    index: Tensor

    @staticmethod
    def collate(samples: list[DepthSample]) -> DepthBatch:
        """Stack samples; a clear error when evaluation frames of different sizes meet in one batch."""
        sizes = {tuple(s.depth.shape[-2:]) for s in samples}
        if len(sizes) > 1:
            raise ValueError(
                f"depth maps of different sizes {sorted(sizes)} in one batch: full-resolution evaluation needs "
                "frames of one size; set `data.eval_full_resolution: false` to evaluate at `data.image_size`"
            )
        return DepthBatch(
            images=torch.stack([s.image for s in samples]),
            depth=torch.stack([s.depth for s in samples]),
            valid=torch.stack([s.valid for s in samples]),
            index=torch.tensor([s.index for s in samples], dtype=torch.int64),
        )

    def __len__(self) -> int:
        return self.images.shape[0]


# --------------------------------------------------------------------------- sources
class DepthSource:
    """A sequence of RGB-D frames: ``len(source)``, ``source.names[i]``, ``source.load(i)``."""

    names: list[str]

    def __len__(self) -> int:
        return len(self.names)

    def load(self, i: int) -> tuple[np.ndarray, np.ndarray]:  # pragma: no cover - abstract
        """Frame ``i``: RGB ``(H, W, 3)`` uint8 and depth ``(H, W)`` float32 metres (0 = invalid)."""
        raise NotImplementedError

    def frame_size(self) -> tuple[int, int]:  # pragma: no cover - abstract
        """``(H, W)`` of the frames (of the first one, for file layouts)."""
        raise NotImplementedError

    def describe(self) -> str:  # pragma: no cover - abstract
        raise NotImplementedError


class NYULabeledMat(DepthSource):
    """Frames of the official ``nyu_depth_v2_labeled.mat`` (MATLAB v7.3 / HDF5), read lazily with h5py.

    MATLAB stores ``images`` (H×W×3×N) and ``depths`` (H×W×N) column-major, so HDF5 sees the
    axes reversed: ``(N, 3, W, H)`` and ``(N, W, H)``; :meth:`load` transposes back to
    ``(H, W, 3)`` / ``(H, W)``. Each process (DataLoader worker) opens its own file handle.

    Args:
        path: the ``.mat`` file.
        indices: 0-based frame indices of this split (``None``: all frames).
    """

    def __init__(self, path: str | os.PathLike, indices: list[int] | None = None) -> None:
        import h5py

        self.path = Path(path).expanduser()
        if not self.path.is_file():
            raise FileNotFoundError(
                f"NYU labelled file {str(self.path)!r} does not exist; download nyu_depth_v2_labeled.mat "
                f"({NYU_LABELED_URL}) and set `data.root` to it"
            )
        if not h5py.is_hdf5(self.path):
            raise ValueError(
                f"{str(self.path)!r} is not a MATLAB v7.3 (HDF5) file; the official nyu_depth_v2_labeled.mat is v7.3 "
                f"(re-download it from {NYU_LABELED_URL} if it is truncated), or point `data.root` at a folder layout"
            )
        try:
            with h5py.File(self.path, "r") as f:
                missing = [k for k in ("images", "depths") if k not in f]
                if missing:
                    raise ValueError(
                        f"{str(self.path)!r} has no dataset(s) {missing} (found {sorted(f.keys())}); "
                        "is it nyu_depth_v2_labeled.mat?"
                    )
                images, depths = f["images"].shape, f["depths"].shape
        except OSError as err:
            raise ValueError(f"cannot read {str(self.path)!r} as HDF5 ({err}); the file is corrupt: re-download it") from err
        if len(images) != 4 or images[1] != 3 or len(depths) != 3 or images[0] != depths[0] or images[2:] != depths[1:]:
            raise ValueError(
                f"{str(self.path)!r}: `images` {images} / `depths` {depths} are not the labelled file's layout "
                "(N, 3, W, H) / (N, W, H) (MATLAB's H×W×3×N and H×W×N, transposed by HDF5)"
            )
        self.count = images[0]
        self._size = (images[3], images[2])
        self.indices = list(range(self.count)) if indices is None else [int(i) for i in indices]
        bad = [i for i in self.indices if not 0 <= i < self.count]
        if bad:
            raise ValueError(f"frame indices {bad[:10]} out of range for the {self.count} frames of {str(self.path)!r}")
        self.names = [f"{self.path.name}[{i}]" for i in self.indices]
        self._file: Any = None
        self._pid: int | None = None

    def _handle(self) -> Any:
        import h5py

        if self._file is None or self._pid != os.getpid():  # h5py handles must not cross a fork
            self._file, self._pid = h5py.File(self.path, "r"), os.getpid()
        return self._file

    def __getstate__(self) -> dict[str, Any]:
        state = dict(self.__dict__)
        state["_file"], state["_pid"] = None, None  # reopened in the worker
        return state

    def load(self, i: int) -> tuple[np.ndarray, np.ndarray]:
        f, j = self._handle(), self.indices[i]
        rgb = np.ascontiguousarray(np.asarray(f["images"][j], dtype=np.uint8).transpose(2, 1, 0))
        depth = np.ascontiguousarray(np.asarray(f["depths"][j], dtype=np.float32).T)
        return rgb, depth

    def frame_size(self) -> tuple[int, int]:
        return self._size

    def describe(self) -> str:
        return f"{len(self)} frames of {self.path}"


def read_split_file(path: str | os.PathLike, count: int | None = None) -> tuple[list[int], list[int]]:
    """0-based ``(train, test)`` frame indices from the official ``splits.mat`` (``trainNdxs``/``testNdxs``, 1-based).

    Reads MATLAB v5 files (the official one) with SciPy and v7.3 (HDF5) files with h5py.
    """
    import h5py

    path = Path(path).expanduser()
    if not path.is_file():
        raise FileNotFoundError(
            f"split file {str(path)!r} does not exist; download the official splits.mat ({NYU_SPLITS_URL}) "
            "or set `data.split_file: null` for the deterministic fraction split"
        )
    arrays: dict[str, np.ndarray] = {}
    if h5py.is_hdf5(path):
        with h5py.File(path, "r") as f:
            arrays = {k: np.asarray(f[k]) for k in ("trainNdxs", "testNdxs") if k in f}
    else:
        from scipy.io import loadmat

        try:
            data = loadmat(str(path))
        except Exception as err:  # any reader error: re-raised with the file named
            raise ValueError(f"cannot read split file {str(path)!r} as a MATLAB file ({err}); re-download splits.mat") from err
        arrays = {k: data[k] for k in ("trainNdxs", "testNdxs") if k in data}
    if set(arrays) != {"trainNdxs", "testNdxs"}:
        raise ValueError(f"split file {str(path)!r} lacks `trainNdxs` and/or `testNdxs`; is it NYU's splits.mat?")
    train, test = ([int(v) - 1 for v in np.asarray(arrays[k]).reshape(-1)] for k in ("trainNdxs", "testNdxs"))
    overlap = set(train) & set(test)
    if overlap:
        raise ValueError(f"split file {str(path)!r}: frames {sorted(overlap)[:10]} are in both splits")
    if min(train + test, default=0) < 0 or (count is not None and max(train + test, default=0) >= count):
        raise ValueError(f"split file {str(path)!r} has indices outside 1..{count} (they are 1-based, MATLAB style)")
    return train, test


def fraction_split(count: int, test_fraction: float) -> tuple[list[int], list[int]]:
    """Contiguous deterministic split: the first ``1 - test_fraction`` of the frames train, the rest test."""
    if not 0.0 < test_fraction < 1.0:
        raise ValueError(f"`test_fraction` must be in (0, 1), got {test_fraction}")
    if count < 2:
        raise ValueError(f"need at least 2 frames to split, found {count}")
    cut = min(count - 1, max(1, round(count * (1.0 - test_fraction))))
    return list(range(cut)), list(range(cut, count))


class PairedFiles(DepthSource):
    """RGB-D frames stored as image files: ``pairs[i] = (rgb_path, depth_png_path)``.

    Args:
        pairs: absolute paths.
        origin: what the pairs came from (for messages).
        depth_scale: metres per unit of a 16-bit depth PNG.
        depth_scale_8bit: metres per unit of an 8-bit depth PNG.
    """

    def __init__(self, pairs: list[tuple[Path, Path]], origin: str, depth_scale: float = 0.001, depth_scale_8bit: float = 10 / 255) -> None:
        if not pairs:
            raise FileNotFoundError(f"no RGB-D pairs in {origin}")
        if depth_scale <= 0 or depth_scale_8bit <= 0:
            raise ValueError(f"depth scales must be positive, got {depth_scale} and {depth_scale_8bit}")
        self.pairs, self.origin = pairs, origin
        self.depth_scale, self.depth_scale_8bit = depth_scale, depth_scale_8bit
        self.names = [str(rgb) for rgb, _ in pairs]

    def load(self, i: int) -> tuple[np.ndarray, np.ndarray]:
        rgb_path, depth_path = self.pairs[i]
        with Image.open(rgb_path) as image:
            rgb = np.array(image.convert("RGB"), dtype=np.uint8)
        with Image.open(depth_path) as image:
            mode = image.mode
            raw = np.array(image)
        if mode == "L":
            scale = self.depth_scale_8bit
        elif mode in ("I;16", "I;16B", "I;16L", "I"):
            scale = self.depth_scale
        else:
            raise ValueError(
                f"depth map {str(depth_path)!r} has PIL mode {mode!r}; expected a one-channel 16-bit PNG "
                "(millimetres) or 8-bit PNG"
            )
        if rgb.shape[:2] != raw.shape[:2]:
            raise ValueError(
                f"image {str(rgb_path)!r} is {rgb.shape[1]}x{rgb.shape[0]} but its depth map {str(depth_path)!r} is "
                f"{raw.shape[1]}x{raw.shape[0]}; the pairs must be aligned frames of one size"
            )
        return rgb, (raw.astype(np.float64) * scale).astype(np.float32)

    def frame_size(self) -> tuple[int, int]:
        with Image.open(self.pairs[0][1]) as image:  # reads the header only
            return image.height, image.width

    def describe(self) -> str:
        return f"{len(self)} RGB-D pairs from {self.origin}"


def folder_pairs(folder: Path) -> list[tuple[Path, Path]]:
    """Every ``<name>_depth.png`` under ``folder`` (recursively) with its image ``<name>.png|.jpg|.jpeg``."""
    if not folder.is_dir():
        raise FileNotFoundError(f"folder {str(folder)!r} does not exist")
    pairs, orphans = [], []
    for dirpath, _, files in sorted(os.walk(folder, followlinks=True)):
        present = set(files)
        for name in sorted(files):
            if not name.lower().endswith(DEPTH_SUFFIX):
                continue
            stem = name[: -len(DEPTH_SUFFIX)]
            image = next((stem + s for s in IMAGE_SUFFIXES + tuple(x.upper() for x in IMAGE_SUFFIXES) if stem + s in present), None)
            if image is None:
                orphans.append(str(Path(dirpath, name)))
            else:
                pairs.append((Path(dirpath, image), Path(dirpath, name)))
    if orphans:
        raise FileNotFoundError(
            f"{len(orphans)} depth map(s) under {str(folder)!r} have no image beside them, e.g. {orphans[:3]}; "
            f"each <name>{DEPTH_SUFFIX} needs <name>.png, <name>.jpg or <name>.jpeg in the same folder"
        )
    if not pairs:
        raise FileNotFoundError(
            f"no depth maps (<name>{DEPTH_SUFFIX} with an image <name>.png|.jpg beside it) found under {str(folder)!r}"
        )
    return pairs


def csv_pairs(csv_path: Path) -> list[tuple[Path, Path]]:
    """The ``rgb_path,depth_path`` lines of a DenseDepth-style list file, resolved to existing files."""
    bases = (csv_path.parent, csv_path.parent.parent)
    pairs, missing = [], []
    with open(csv_path, newline="") as f:
        for line_no, row in enumerate(csv.reader(f), start=1):
            if not row or not "".join(row).strip():
                continue
            if len(row) != 2:
                raise ValueError(f"{str(csv_path)!r} line {line_no}: expected `rgb_path,depth_path`, got {row}")
            resolved = []
            for entry in row:
                path = Path(entry.strip()).expanduser()
                candidates = [path] if path.is_absolute() else [base / path for base in bases]
                found = next((c for c in candidates if c.is_file()), None)
                if found is None:
                    missing.append(f"line {line_no}: {entry.strip()}")
                resolved.append(found or candidates[0])
            pairs.append((resolved[0], resolved[1]))
    if missing:
        raise FileNotFoundError(
            f"{len(missing)} file(s) listed in {str(csv_path)!r} do not exist (looked relative to {str(bases[0])!r} "
            f"and {str(bases[1])!r}), e.g. {missing[:3]}; unpack the whole export next to the list file"
        )
    if not pairs:
        raise ValueError(f"list file {str(csv_path)!r} is empty")
    return pairs


def open_depth_sources(
    root: str | os.PathLike,
    split_file: str | os.PathLike | None = None,
    test_fraction: float = 0.45,
    depth_scale: float = 0.001,
    depth_scale_8bit: float = 10 / 255,
    train_split: str = "train",
    test_split: str = "test",
) -> tuple[DepthSource, DepthSource]:
    """``(train, test)`` sources of any supported layout under ``root`` (see the module docstring)."""
    path = Path(root).expanduser()
    layouts = (
        "set `data.root` to nyu_depth_v2_labeled.mat, to a folder with `train/` and `test/` sub-folders of "
        f"<name>.png|jpg + <name>{DEPTH_SUFFIX} pairs, or to a folder with nyu2_train.csv / nyu2_test.csv list files"
    )
    if not path.exists():
        raise FileNotFoundError(f"NYU depth data {str(path)!r} does not exist; {layouts} (download: {NYU_LABELED_URL})")
    if path.is_file():
        whole = NYULabeledMat(path)
        if split_file is None and (path.parent / "splits.mat").is_file():
            split_file = path.parent / "splits.mat"
        if split_file is not None:
            train, test = read_split_file(split_file, whole.count)
            log.info("NYU split from %s: %d train / %d test frames", split_file, len(train), len(test))
        else:
            train, test = fraction_split(whole.count, test_fraction)
            log.warning(
                "no NYU split file: using the contiguous %.0f%% / %.0f%% split of %s (not the official split; set "
                "`data.split_file` to splits.mat for comparable numbers)", 100 * (1 - test_fraction), 100 * test_fraction, path,
            )
        return NYULabeledMat(path, train), NYULabeledMat(path, test)
    sources = []
    for split in (train_split, test_split):
        listing, folder = path / f"nyu2_{split}.csv", path / split
        if listing.is_file():
            pairs, origin = csv_pairs(listing), str(listing)
        elif folder.is_dir():
            pairs, origin = folder_pairs(folder), str(folder)
        else:
            raise FileNotFoundError(f"{str(path)!r} has neither {listing.name} nor a {split}/ folder; {layouts}")
        sources.append(PairedFiles(pairs, origin, depth_scale, depth_scale_8bit))
    return sources[0], sources[1]


# --------------------------------------------------------------------------- dataset
def eigen_mask(height: int, width: int) -> Tensor:
    """``(height, width)`` bool: Eigen et al.'s crop of a 480×640 frame, scaled to this size."""
    top, bottom, left, right = EIGEN_CROP
    sy, sx = height / EIGEN_FRAME[0], width / EIGEN_FRAME[1]
    mask = torch.zeros(height, width, dtype=torch.bool)
    mask[round(top * sy) : round(bottom * sy), round(left * sx) : round(right * sx)] = True
    return mask


class NYUDepthDataset(Dataset):
    """Frames of a :class:`DepthSource` as :class:`DepthSample`, image and depth kept aligned.

    Training: resize the frame to ``image_size`` (image bilinear with antialiasing, depth
    nearest so invalid zeros are never averaged into valid depths), random ``crop_size`` crop,
    random horizontal flip (torch's RNG, seeded per worker by Lightning). Evaluation: the whole
    frame resized to ``image_size``; the depth at the frame's own size when
    ``full_resolution`` (predictions are upsampled to it, the usual protocol), else resized like
    the image; ``eigen_crop`` marks pixels outside Eigen's crop invalid.

    A frame that fails to load is replaced by an all-invalid frame (a warning names the file;
    ``bad`` counts them per process), so it adds nothing to losses or metrics and never crashes a run.
    """

    def __init__(
        self,
        source: DepthSource,
        image_size: tuple[int, int],
        crop_size: tuple[int, int] | None = None,
        train: bool = False,
        flip: bool = True,
        full_resolution: bool = True,
        eigen_crop: bool = False,
    ) -> None:
        if len(source) == 0:
            raise ValueError(f"no frames in {source.describe()}")
        self.source, self.image_size, self.train, self.flip = source, tuple(image_size), train, flip
        self.crop_size = tuple(crop_size) if crop_size is not None else None
        if self.crop_size is not None and (self.crop_size[0] > self.image_size[0] or self.crop_size[1] > self.image_size[1]):
            raise ValueError(f"`crop_size` {list(self.crop_size)} is larger than `image_size` {list(self.image_size)}")
        self.full_resolution, self.eigen_crop = full_resolution, eigen_crop
        self.frame = source.frame_size()
        self.bad: set[int] = set()

    def __len__(self) -> int:
        return len(self.source)

    def _load(self, i: int) -> tuple[np.ndarray, np.ndarray]:
        try:
            return self.source.load(i)
        except Exception as err:  # noqa: BLE001 - a corrupt file is skipped, never fatal
            self.bad.add(i)
            warnings.warn(
                f"unreadable NYU frame {self.source.names[i]!r} ({type(err).__name__}: {err}); it counts as all-invalid "
                f"({len(self.bad)} bad frame(s) in this process so far)",
                stacklevel=2,
            )
            h, w = self.frame
            return np.zeros((h, w, 3), np.uint8), np.zeros((h, w), np.float32)

    def __getitem__(self, index: int) -> DepthSample:
        rgb, depth_np = self._load(index)
        image = torch.from_numpy(rgb).permute(2, 0, 1).float().div_(255.0)[None]  # (1, 3, H0, W0)
        depth = torch.from_numpy(depth_np).float()[None, None]  # (1, 1, H0, W0)
        depth = torch.where(torch.isfinite(depth) & (depth > 0), depth, torch.zeros_like(depth))
        if self.eigen_crop and not self.train:
            depth = depth * eigen_mask(*depth.shape[-2:])
        if tuple(image.shape[-2:]) != self.image_size:
            image = F.interpolate(image, size=self.image_size, mode="bilinear", align_corners=False, antialias=True).clamp_(0, 1)
            if self.train or not self.full_resolution:
                depth = F.interpolate(depth, size=self.image_size, mode="nearest-exact")
        if self.train:
            if self.crop_size is not None:
                (h, w), (ch, cw) = self.image_size, self.crop_size
                y0 = int(torch.randint(h - ch + 1, ()))
                x0 = int(torch.randint(w - cw + 1, ()))
                image, depth = image[..., y0 : y0 + ch, x0 : x0 + cw], depth[..., y0 : y0 + ch, x0 : x0 + cw]
            if self.flip and bool(torch.rand(()) < 0.5):
                image, depth = image.flip(-1), depth.flip(-1)
        image, depth = image[0].contiguous(), depth[0].contiguous()
        return DepthSample(image=image, depth=depth, valid=depth > 0, index=index)


# --------------------------------------------------------------------------- data module
class NYUDepthDataModule(pl.LightningDataModule):
    """NYU depth v2 train / test frames as :class:`DepthBatch` (see the module docstring for layouts).

    Args:
        root: ``nyu_depth_v2_labeled.mat``, or a folder with ``train/`` + ``test/`` sub-folders
            (``<name>.png|jpg`` + ``<name>_depth.png``) or ``nyu2_train.csv`` + ``nyu2_test.csv``.
        split_file: the official ``splits.mat`` (labelled file only); ``None``: ``splits.mat``
            beside the labelled file when it exists, else the contiguous fraction split.
        test_fraction: share of the frames in the test split of the fraction split.
        image_size: ``[H, W]`` every frame is resized to (default 240×320, half of NYU's 480×640,
            as in Laina et al.).
        crop_size: ``[H, W]`` random training crop of the resized frame (default 228×304, Laina et
            al.'s input); ``None``: no crop. Evaluation always sees the whole resized frame.
        flip: random horizontal flips in training.
        eval_full_resolution: evaluate against the depth at the frame's original size
            (predictions upsampled bilinearly); otherwise against depth resized to ``image_size``.
        eigen_crop: evaluate only inside Eigen et al.'s crop (rows 45–470, columns 41–600 of a 480×640 frame).
        png_depth_scale: metres per unit of 16-bit depth PNGs (0.001 = millimetres).
        png_depth_scale_8bit: metres per unit of 8-bit depth PNGs (10/255 = DenseDepth's training export).
        batch_size: training frames per step.
        eval_batch_size: frames per validation/test batch (``None``: ``batch_size``).
        num_workers: DataLoader worker processes (decoding and resizing happen there).
        pin_memory: pin host memory; ``None`` = only when CUDA is available.
    """

    def __init__(
        self,
        root: str = "data/nyu_depth_v2_labeled.mat",
        split_file: str | None = None,
        test_fraction: float = 0.45,
        image_size: tuple[int, int] = (240, 320),
        crop_size: tuple[int, int] | None = (228, 304),
        flip: bool = True,
        eval_full_resolution: bool = True,
        eigen_crop: bool = False,
        png_depth_scale: float = 0.001,
        png_depth_scale_8bit: float = 10 / 255,
        batch_size: int = 16,
        eval_batch_size: int | None = None,
        num_workers: int = 4,
        pin_memory: bool | None = None,
    ) -> None:
        super().__init__()
        if batch_size < 1 or (eval_batch_size is not None and eval_batch_size < 1):
            raise ValueError(f"batch sizes must be >= 1, got {batch_size} / {eval_batch_size}")
        if len(image_size) != 2 or min(image_size) < 1:
            raise ValueError(f"`image_size` must be [H, W] with positive sides, got {image_size}")
        if crop_size is not None and (len(crop_size) != 2 or min(crop_size) < 1):
            raise ValueError(f"`crop_size` must be [H, W] with positive sides or null, got {crop_size}")
        self.root, self.split_file, self.test_fraction = root, split_file, test_fraction
        self.image_size = (int(image_size[0]), int(image_size[1]))
        self.crop_size = None if crop_size is None else (int(crop_size[0]), int(crop_size[1]))
        self.flip, self.eval_full_resolution, self.eigen_crop = flip, eval_full_resolution, eigen_crop
        self.png_depth_scale, self.png_depth_scale_8bit = png_depth_scale, png_depth_scale_8bit
        self.batch_size = batch_size
        self.eval_batch_size = eval_batch_size or batch_size
        self.num_workers, self.pin_memory = num_workers, pin_memory
        self.train_set: NYUDepthDataset | None = None
        self.test_set: NYUDepthDataset | None = None

    def setup(self, stage: str | None = None) -> None:
        if self.test_set is not None:
            return
        train, test = open_depth_sources(
            self.root, self.split_file, self.test_fraction, self.png_depth_scale, self.png_depth_scale_8bit
        )
        self.train_set = NYUDepthDataset(train, self.image_size, self.crop_size, train=True, flip=self.flip)
        self.test_set = NYUDepthDataset(
            test, self.image_size, train=False, full_resolution=self.eval_full_resolution, eigen_crop=self.eigen_crop
        )
        log.info("NYU depth: train %s; test %s", train.describe(), test.describe())

    def _loader(self, dataset: NYUDepthDataset | None, train: bool) -> DataLoader:
        assert dataset is not None, "call setup() first"
        batch = self.batch_size if train else self.eval_batch_size
        return DataLoader(
            dataset,
            batch_size=batch,
            shuffle=train,
            drop_last=train and len(dataset) >= batch,  # a tiny training set still gives one batch
            num_workers=self.num_workers,
            persistent_workers=self.num_workers > 0,
            pin_memory=torch.cuda.is_available() if self.pin_memory is None else self.pin_memory,
            collate_fn=DepthBatch.collate,
            worker_init_fn=init_worker,  # workers ignore SIGTERM: the pre-emption checkpoint is saved first
        )

    def train_dataloader(self) -> DataLoader:
        return self._loader(self.train_set, train=True)

    def val_dataloader(self) -> DataLoader:
        """The test split (NYU has no official validation split)."""
        return self._loader(self.test_set, train=False)

    def test_dataloader(self) -> DataLoader:
        return self._loader(self.test_set, train=False)

    def predict_dataloader(self) -> DataLoader:
        return self._loader(self.test_set, train=False)


# --------------------------------------------------------------------------- losses
def berhu_loss(pred: Tensor, target: Tensor, valid: Tensor, fraction: float = 0.2) -> Tensor:
    """Reverse Huber (berHu) loss of Laina et al. 2016, averaged over the valid pixels.

    With ``x = pred - target`` and ``c = fraction · max |x|`` over the batch's valid pixels
    (a constant: no gradient through the max), ``B(x) = |x|`` for ``|x| <= c`` and
    ``(x² + c²) / (2c)`` above (the two meet at ``|x| = c``).

    Args:
        pred, target: ``(B, 1, H, W)`` depth in metres.
        valid: ``(B, 1, H, W)`` bool.

    Returns a scalar; 0 (still differentiable) when no pixel is valid.
    """
    diff = (pred - target).abs()[valid]
    if diff.numel() == 0:
        return pred.sum() * 0.0
    c = fraction * diff.detach().max()
    quadratic = (diff.square() + c.square()) / (2.0 * c.clamp_min(1e-12))
    return torch.where(diff <= c, diff, quadratic).mean()


def l1_loss(pred: Tensor, target: Tensor, valid: Tensor) -> Tensor:
    """Mean ``|pred - target|`` over the valid pixels (shapes as :func:`berhu_loss`)."""
    diff = (pred - target).abs()[valid]
    return diff.mean() if diff.numel() else pred.sum() * 0.0


# --------------------------------------------------------------------------- metrics
class DepthMetrics(Metric):
    """The standard NYU depth metrics, pooled pixel-wise over every valid pixel of every image.

    Sums over all valid pixels of the whole set (float64, summed across processes), then:

    * ``delta1``, ``delta2``, ``delta3``: **fraction** (0–1, not percent) of pixels with
      ``max(d / d*, d* / d) < 1.25``, ``1.25²``, ``1.25³``;
    * ``abs_rel``: mean of ``|d - d*| / d*``;
    * ``rmse``: ``sqrt`` of the mean of ``(d - d*)²`` (metres), one root over the whole set;
    * ``log10``: mean of ``|log10 d - log10 d*|``.

    Every pixel weighs the same, so images with more valid pixels weigh more (some papers
    instead average per-image RMSEs; the numbers differ slightly). ``update(pred, target,
    valid)`` takes ``(B, 1, H, W)`` metres and bool; ``compute()`` returns a dict of scalars.
    """

    full_state_update = False
    NAMES = ("delta1", "delta2", "delta3", "abs_rel", "rmse", "log10")

    def __init__(self, **kwargs: Any) -> None:
        super().__init__(**kwargs)
        for name in ("count", "delta1", "delta2", "delta3", "abs_rel", "squared", "log10"):
            self.add_state(name, torch.zeros((), dtype=torch.float64), dist_reduce_fx="sum")

    def update(self, pred: Tensor, target: Tensor, valid: Tensor) -> None:
        if pred.shape != target.shape or valid.shape != target.shape:
            raise ValueError(f"pred {tuple(pred.shape)}, target {tuple(target.shape)} and valid {tuple(valid.shape)} must match")
        valid = valid & (target > 0)
        d = pred.detach()[valid].to(torch.float64).clamp_min(MIN_DEPTH)
        t = target[valid].to(torch.float64)
        ratio = torch.maximum(d / t, t / d)
        self.count += t.numel()
        self.delta1 += (ratio < 1.25).sum()
        self.delta2 += (ratio < 1.25**2).sum()
        self.delta3 += (ratio < 1.25**3).sum()
        self.abs_rel += ((d - t).abs() / t).sum()
        self.squared += (d - t).square().sum()
        self.log10 += (torch.log10(d) - torch.log10(t)).abs().sum()

    def compute(self) -> dict[str, Tensor]:
        n = self.count.clamp_min(1.0)
        values = {
            "delta1": self.delta1 / n,
            "delta2": self.delta2 / n,
            "delta3": self.delta3 / n,
            "abs_rel": self.abs_rel / n,
            "rmse": (self.squared / n).sqrt(),
            "log10": self.log10 / n,
        }
        return {k: v.to(torch.float32) for k, v in values.items()}


# --------------------------------------------------------------------------- model
def unpool2x(x: Tensor) -> Tensor:
    """Laina et al.'s unpooling: ``(B, C, h, w) -> (B, C, 2h, 2w)``, each value at the top-left
    of its 2×2 cell, zeros elsewhere."""
    b, c, h, w = x.shape
    out = x.new_zeros(b, c, h, 2, w, 2)
    out[:, :, :, 0, :, 0] = x
    return out.view(b, c, 2 * h, 2 * w)


class UpProjection(nn.Module):
    """Up-projection block (Laina et al. 2016): ×2 up, then
    ``ReLU(BN(conv3(ReLU(BN(conv5(x))))) + BN(conv5'(x)))``.

    ``(B, in_channels, h, w) -> (B, out_channels, 2h, 2w)``; ``upsample``: ``"unpool"`` (the
    paper's zero-filled unpooling) or ``"nearest"``.
    """

    def __init__(self, in_channels: int, out_channels: int, upsample: Upsample = "unpool") -> None:
        super().__init__()
        if upsample not in ("unpool", "nearest"):
            raise ValueError(f"`upsample` must be 'unpool' or 'nearest', got {upsample!r}")
        self.upsample = upsample
        self.conv1 = nn.Conv2d(in_channels, out_channels, 5, padding=2, bias=False)
        self.bn1 = nn.BatchNorm2d(out_channels)
        self.conv2 = nn.Conv2d(out_channels, out_channels, 3, padding=1, bias=False)
        self.bn2 = nn.BatchNorm2d(out_channels)
        self.project = nn.Conv2d(in_channels, out_channels, 5, padding=2, bias=False)
        self.bn_project = nn.BatchNorm2d(out_channels)

    def forward(self, x: Tensor) -> Tensor:
        x = unpool2x(x) if self.upsample == "unpool" else F.interpolate(x, scale_factor=2.0, mode="nearest")
        branch = self.bn2(self.conv2(F.relu(self.bn1(self.conv1(x)))))
        return F.relu(branch + self.bn_project(self.project(x)))


class UpProjectionDecoder(nn.Module):
    """1×1 conv + BN to ``channels``, then ``blocks`` up-projections (halving the channels each
    time, at least 8), then a 3×3 conv to one channel.

    ``(B, in_channels, h, w) -> (B, 1, h · 2^blocks, w · 2^blocks)`` (pre-activation depth).
    """

    def __init__(self, in_channels: int, channels: int, blocks: int, upsample: Upsample = "unpool") -> None:
        super().__init__()
        self.reduce = nn.Sequential(nn.Conv2d(in_channels, channels, 1, bias=False), nn.BatchNorm2d(channels))
        layers = []
        for _ in range(blocks):
            out = max(8, channels // 2)
            layers.append(UpProjection(channels, out, upsample))
            channels = out
        self.blocks = nn.Sequential(*layers)
        self.head = nn.Conv2d(channels, 1, 3, padding=1)
        for m in self.modules():
            if isinstance(m, nn.Conv2d):
                nn.init.kaiming_normal_(m.weight, mode="fan_out", nonlinearity="relu")
        nn.init.normal_(self.head.weight, std=1e-3)
        nn.init.constant_(self.head.bias, math.log(math.expm1(INIT_DEPTH - MIN_DEPTH)))  # softplus⁻¹

    def forward(self, features: Tensor) -> Tensor:
        return self.head(self.blocks(self.reduce(features)))


class DepthEstimator(SavesTrunkSpec, pl.LightningModule):
    """NYU depth v2 transfer: trunk + up-projection decoder, berHu or L1 loss, :class:`DepthMetrics`.

    Args:
        checkpoint: pretraining checkpoint or trunk export to transfer (``None``: ``trunk`` as
            initialised, the random-init baseline).
        trunk: the trunk when ``checkpoint`` is ``None`` (default ResNet-v2-101 cut after block 3).
        frozen: keep the trunk fixed (weights and BN statistics) and train only the decoder;
            default ``False``: the whole network is fine-tuned, as in the paper's depth transfer.
        representation: ``"features"`` (block output) or ``"lasso"`` (a new lasso row over the
            last block's units, trained with the decoder).
        decoder_channels: channels after the 1×1 reduction (``None``: half the trunk's, as
            Laina et al.'s 2048 → 1024); every up-projection halves them.
        output_stride: stride of the decoder's output relative to the input (4 or 2, or any
            power of two below the trunk's); one up-projection per factor 2 from the trunk's stride.
        upsample: ``"unpool"`` (Laina et al.) or ``"nearest"`` in the up-projections.
        loss: ``"berhu"`` (Laina et al.) or ``"l1"``.
        berhu_fraction: berHu's ``c`` as a fraction of the batch's largest absolute residual.
        optimizer: builds the optimizer from the trainable parameters (default: SGD, lr 0.01,
            momentum 0.9, an assumption after Laina et al.; the paper gives no settings).
        lr_scheduler: optional; stepped every training step.
        channels_last: on CUDA, the trunk runs in channels-last memory format.
        compile: on CUDA, ``torch.compile`` the trunk in place.

    ``forward((B, 3, H, W) RGB in [0, 1]) -> (B, 1, H, W)`` depth in metres (> 0). Logs
    ``train/loss``, ``{val,test}/loss`` and ``{val,test}/{delta1,delta2,delta3,abs_rel,rmse,log10}``.
    """

    def __init__(
        self,
        checkpoint: str | None = None,
        trunk: Trunk | None = None,
        frozen: bool = False,
        representation: Representation = "features",
        decoder_channels: int | None = None,
        output_stride: int = 4,
        upsample: Upsample = "unpool",
        loss: Loss = "berhu",
        berhu_fraction: float = 0.2,
        optimizer: OptimizerCallable | None = None,
        lr_scheduler: LRSchedulerCallable | None = None,
        channels_last: bool = False,
        compile: bool = False,
    ) -> None:
        super().__init__()
        self.save_hyperparameters(ignore=["trunk", "optimizer", "lr_scheduler"])
        if loss not in ("berhu", "l1"):
            raise ValueError(f"`loss` must be 'berhu' or 'l1', got {loss!r}")
        if not 0.0 < berhu_fraction <= 1.0:
            raise ValueError(f"`berhu_fraction` must be in (0, 1], got {berhu_fraction}")
        if checkpoint is None and trunk is None:
            trunk = ResNetV2()
        self.backbone = TrunkRepresentation(pretrained_trunk(checkpoint, trunk), frozen=frozen, representation=representation)
        stride = self.backbone.out_stride
        if output_stride < 1 or output_stride & (output_stride - 1) or output_stride >= stride:
            raise ValueError(
                f"`output_stride` must be a power of two below the trunk's output stride {stride}, got {output_stride}"
            )
        if stride & (stride - 1):
            raise ValueError(f"the trunk's output stride {stride} is not a power of two; the decoder doubles resolution")
        channels = decoder_channels or max(8, self.backbone.out_channels // 2)
        blocks = round(math.log2(stride // output_stride))
        self.decoder = UpProjectionDecoder(self.backbone.out_channels, channels, blocks, upsample)
        self.loss_name, self.berhu_fraction = loss, berhu_fraction
        self.optimizer_factory, self.scheduler_factory = optimizer, lr_scheduler
        self.channels_last, self.compile_trunk = channels_last, compile
        self.val_metrics, self.test_metrics = DepthMetrics(), DepthMetrics()

    @property
    def trunk(self) -> Trunk:
        """The (pretrained) trunk inside the representation."""
        return self.backbone.trunk

    def forward(self, images: Tensor) -> Tensor:
        if self.channels_last and images.is_cuda:
            images = images.contiguous(memory_format=torch.channels_last)
        x = self.decoder(self.backbone(images))
        x = F.interpolate(x.float(), size=images.shape[-2:], mode="bilinear", align_corners=False)
        return F.softplus(x) + MIN_DEPTH

    def criterion(self, pred: Tensor, target: Tensor, valid: Tensor) -> Tensor:
        """The configured loss (:func:`berhu_loss` or :func:`l1_loss`) over the valid pixels."""
        if self.loss_name == "berhu":
            return berhu_loss(pred, target, valid, self.berhu_fraction)
        return l1_loss(pred, target, valid)

    def predict_depth(self, batch: DepthBatch) -> Tensor:
        """``(B, 1, h, w)`` metres at the size of ``batch.depth`` (bilinear from the input size)."""
        pred = self(batch.images)
        if pred.shape[-2:] != batch.depth.shape[-2:]:
            pred = F.interpolate(pred, size=batch.depth.shape[-2:], mode="bilinear", align_corners=False)
        return pred

    def on_fit_start(self) -> None:
        apply_speed_options(self.trunk, self.device, self.channels_last, self.compile_trunk)

    def training_step(self, batch: DepthBatch, batch_idx: int) -> Tensor:
        loss = self.criterion(self.predict_depth(batch), batch.depth, batch.valid)
        self.log("train/loss", loss, batch_size=len(batch), prog_bar=True, on_step=True, on_epoch=True)
        return loss

    def _eval_step(self, batch: DepthBatch, stage: str, metrics: DepthMetrics) -> None:
        pred = self.predict_depth(batch)
        loss = self.criterion(pred, batch.depth, batch.valid)
        self.log(f"{stage}/loss", loss, batch_size=len(batch), on_step=False, on_epoch=True, sync_dist=True)
        metrics.update(pred, batch.depth, batch.valid)

    def _log_metrics(self, stage: str, metrics: DepthMetrics) -> None:
        values = metrics.compute()  # synchronised across processes
        self.log_dict({f"{stage}/{k}": v for k, v in values.items()}, prog_bar=stage == "val")
        metrics.reset()

    def validation_step(self, batch: DepthBatch, batch_idx: int) -> None:
        self._eval_step(batch, "val", self.val_metrics)

    def on_validation_epoch_end(self) -> None:
        self._log_metrics("val", self.val_metrics)

    def test_step(self, batch: DepthBatch, batch_idx: int) -> None:
        self._eval_step(batch, "test", self.test_metrics)

    def on_test_epoch_end(self) -> None:
        self._log_metrics("test", self.test_metrics)

    def predict_step(self, batch: DepthBatch, batch_idx: int, dataloader_idx: int = 0) -> Tensor:
        """``(B, 1, h, w)`` predicted depth in metres, at the size of the batch's depth maps."""
        return self.predict_depth(batch)

    def configure_optimizers(self) -> Any:
        params = [p for p in self.parameters() if p.requires_grad]  # a frozen trunk's are left out
        if self.optimizer_factory is None:
            optimizer = torch.optim.SGD(params, lr=0.01, momentum=0.9)
        else:
            optimizer = self.optimizer_factory(params)
        if self.scheduler_factory is None:
            return optimizer
        return {"optimizer": optimizer, "lr_scheduler": {"scheduler": self.scheduler_factory(optimizer), "interval": "step"}}
