"""Readers of NYU depth v2 on disk: RGB-D frames from the labelled .mat file, PNG folders or CSV lists.

Three on-disk layouts (:func:`open_depth_sources`, ``data.root``):

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
10/255: DenseDepth's 8-bit training export). A depth of 0 (or non-finite) is invalid.
"""

from __future__ import annotations

import csv
import logging
import os
from pathlib import Path
from typing import Any

import numpy as np
from PIL import Image

log = logging.getLogger(__name__)

NYU_LABELED_URL = "http://horatio.cs.nyu.edu/mit/silberman/nyu_depth_v2/nyu_depth_v2_labeled.mat"
NYU_SPLITS_URL = "http://horatio.cs.nyu.edu/mit/silberman/indoor_seg_sup/splits.mat"
IMAGE_SUFFIXES = (".png", ".jpg", ".jpeg")
DEPTH_SUFFIX = "_depth.png"


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
