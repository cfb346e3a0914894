"""Motion masks' clean-up without host syncs: binary morphology and connected components, exact.

The clean-up used to be ``kornia.morphology.opening/closing`` and
``kornia.contrib.connected_components_union_find`` + ``bincount`` (a loop until convergence:
one host synchronisation per step). Its replacement must give the same masks, bit for bit,
and make the host wait for nothing.
"""

from __future__ import annotations

import kornia.contrib
import kornia.morphology
import numpy as np
import pytest
import scipy.ndimage
import torch
import torch.nn.functional as F
from data.test_motion import synthetic_clip
from host_syncs import HostSyncCounter

from mtssl_lightning.data.binary_masks import (
    _block_graph,
    _close,
    _drop_small_components,
    _open,
    _square,
    _union_find,
    _union_find_schedule,
    connected_components,
)
from mtssl_lightning.data.motion import MotionMaskConfig, _clean_up, _residual_motion, motion_masks
from mtssl_lightning.data.video import SampleVideos

# ---------------------------------------------------------------------------------------------
# masks that are hard for label propagation
# ---------------------------------------------------------------------------------------------


def _spiral(h: int, w: int) -> np.ndarray:
    """A 1-pixel-wide rectangular spiral from the border inwards, its turns 2 pixels apart (one component)."""
    out = np.zeros((h, w), bool)
    top, left, bottom, right = 0, 0, h - 1, w - 1
    while top <= bottom and left <= right:
        out[top, left : right + 1] = True
        if top + 2 > bottom:
            break
        out[top : bottom + 1, right] = True
        if right - 2 < left:
            break
        out[bottom, left : right + 1] = True
        if bottom - 2 < top + 2:
            break
        out[top + 2 : bottom + 1, left] = True
        if left + 2 > right - 2:
            break
        out[top + 2, left : left + 3] = True
        top, left, bottom, right = top + 2, left + 2, bottom - 2, right - 2
    return out


def _serpentine(h: int, w: int) -> np.ndarray:
    """Every other row, joined alternately at the right and the left end: one long snake."""
    out = np.zeros((h, w), bool)
    out[::2] = True
    for k, row in enumerate(range(1, h, 2)):
        out[row, w - 1 if k % 2 == 0 else 0] = True
    return out


def _zigzags(h: int, w: int) -> np.ndarray:
    """Horizontal zigzags with one pixel in each 2 × 2 block (the thinnest 8-connected chains of blocks)."""
    out = np.zeros((h, w), bool)
    for top in range(1, h - 1, 4):
        out[top, 1::2] = True
        out[top + 1, 2::2] = True
    return out


def _comb(h: int, w: int) -> np.ndarray:
    """Teeth hanging from a bottom spine: every tooth's top is a local minimum of the raster labels."""
    out = np.zeros((h, w), bool)
    out[-1] = True
    out[1:, ::2] = True
    out[1::4, ::4] = False  # notches: teeth of varying length
    return out


def _dots(h: int, w: int) -> np.ndarray:
    """Isolated pixels two apart: as many components as possible."""
    out = np.zeros((h, w), bool)
    out[::2, ::2] = True
    return out


def _random(h: int, w: int, p: float, seed: int) -> np.ndarray:
    return np.random.default_rng(seed).random((h, w)) < p


def _patterns() -> dict[str, np.ndarray]:
    yy, xx = np.mgrid[:31, :33]
    base = {
        "spiral": _spiral(31, 33),
        "spiral_even": _spiral(32, 32),
        "serpentine": _serpentine(31, 33),
        "zigzags": _zigzags(30, 33),
        "comb": _comb(31, 32),
        "dots": _dots(31, 33),
        "checkerboard": (yy + xx) % 2 == 0,  # one component in 8-connectivity
        "checker_2x2": (yy // 2 + xx // 2) % 2 == 0,
        "stripes": np.broadcast_to(np.arange(33) % 3 == 0, (31, 33)).copy(),  # long thin components
        "full": np.ones((31, 33), bool),
        "empty": np.zeros((30, 30), bool),
        "single_pixel": np.pad(np.ones((1, 1), bool), ((7, 8), (8, 9))),
    }
    # the same shapes in other orientations: chains then run against the raster order
    for name in ("spiral", "serpentine", "zigzags", "comb"):
        base[f"{name}_flipped"] = base[name][::-1, ::-1].copy()
        base[f"{name}_transposed"] = base[name].T.copy()
    for seed, p in enumerate((0.3, 0.45, 0.55, 0.7)):  # around the percolation threshold: long, tortuous components
        base[f"random_{p}"] = _random(29 + seed, 34 - seed, p, seed)
    return base


PATTERNS = _patterns()


def _canonical(labels: np.ndarray) -> np.ndarray:
    """Labels renumbered 1, 2, … in raster order of first appearance (0 stays 0): a partition's normal form."""
    flat = labels.reshape(-1)
    foreground = flat != 0
    values, first = np.unique(flat[foreground], return_index=True)
    rank = np.empty(len(values), np.int64)
    rank[np.argsort(first)] = np.arange(1, len(values) + 1)
    out = np.zeros(flat.shape, np.int64)
    out[foreground] = rank[np.searchsorted(values, flat[foreground])]
    return out.reshape(labels.shape)


def _scipy_labels(mask: np.ndarray) -> np.ndarray:
    return scipy.ndimage.label(mask, structure=np.ones((3, 3), int))[0]


def _kornia_drop_small_components(mask: torch.Tensor, min_pixels: float) -> torch.Tensor:
    """The previous implementation (host syncs: ``any``, the convergence loop, ``bincount``)."""
    if min_pixels <= 1 or not bool(mask.any()):
        return mask
    labels = kornia.contrib.connected_components_union_find(mask.to(torch.uint8))
    flat = labels.reshape(-1)
    areas = torch.bincount(flat, minlength=int(flat.max()) + 1)
    return mask & (areas[labels] >= min_pixels)


def _kornia_clean_up(mask: torch.Tensor, config: MotionMaskConfig) -> torch.Tensor:
    """The previous clean-up: Kornia's opening and closing, then :func:`_kornia_drop_small_components`."""
    h, w = mask.shape[-2:]
    cleaned = mask.float()
    if config.open_size > 1:
        cleaned = kornia.morphology.opening(cleaned, torch.ones(config.open_size, config.open_size))
    if config.close_size > 1:
        cleaned = kornia.morphology.closing(cleaned, torch.ones(config.close_size, config.close_size))
    return _kornia_drop_small_components(cleaned > 0.5, config.min_area * h * w)


# ---------------------------------------------------------------------------------------------
# morphology
# ---------------------------------------------------------------------------------------------


def _border_masks(h: int, w: int) -> torch.Tensor:
    """Masks that touch the border: a frame, its inverse, a corner block, lines along two sides."""
    frame = torch.zeros(h, w)
    frame[0], frame[-1], frame[:, 0], frame[:, -1] = 1, 1, 1, 1
    corner = torch.zeros(h, w)
    corner[: max(h // 3, 1), : max(w // 3, 1)] = 1
    sides = torch.zeros(h, w)
    sides[-1], sides[:, -1] = 1, 1
    return torch.stack([frame, 1 - frame, corner, sides, torch.ones(h, w), torch.zeros(h, w)])[:, None]


@pytest.mark.parametrize("h,w", [(1, 1), (2, 3), (5, 4), (8, 8), (9, 13), (16, 15), (24, 7)])
@pytest.mark.parametrize("size", [3, 5, 7, 11])
def test_opening_and_closing_equal_kornia_geodesic(h: int, w: int, size: int) -> None:
    g = torch.Generator().manual_seed(h * 100 + w * 10 + size)
    random = [(torch.rand(9, 1, h, w, generator=g) < p).float() for p in (0.2, 0.5, 0.8)]
    masks = torch.cat([*random, _border_masks(h, w)])
    binary, kernel = masks > 0.5, torch.ones(size, size)
    for engine in ("shift", "unfold"):  # Kornia's CPU and CUDA engines
        dilated, eroded = _square(binary, size, dilate=True), _square(binary, size, dilate=False)
        assert torch.equal(dilated.float(), kornia.morphology.dilation(masks, kernel, engine=engine)), engine
        assert torch.equal(eroded.float(), kornia.morphology.erosion(masks, kernel, engine=engine)), engine
        assert torch.equal(_open(binary, size).float(), kornia.morphology.opening(masks, kernel, engine=engine)), engine
        assert torch.equal(_close(binary, size).float(), kornia.morphology.closing(masks, kernel, engine=engine)), engine
    assert _open(binary, 1) is binary and _close(binary, 1) is binary


# ---------------------------------------------------------------------------------------------
# connected components
# ---------------------------------------------------------------------------------------------


@pytest.mark.parametrize("name", sorted(PATTERNS))
def test_connected_components_equal_kornia_and_scipy(name: str) -> None:
    pattern = PATTERNS[name]
    # batch > 1: the pattern, its complement and a random mask share one flattened block numbering
    h, w = pattern.shape
    batch = np.stack([pattern, ~pattern, _random(h, w, 0.5, 7)])
    mask = torch.from_numpy(batch)[:, None]
    labels = connected_components(mask)
    assert torch.equal(labels, kornia.contrib.connected_components_union_find(mask.to(torch.uint8)))
    for i in range(len(batch)):
        assert np.array_equal(_canonical(labels[i, 0].numpy()), _canonical(_scipy_labels(batch[i]))), (name, i)


def test_connected_components_on_many_random_masks() -> None:
    rng = np.random.default_rng(0)
    for trial in range(60):
        h, w = rng.integers(1, 48, size=2)
        masks = rng.random((int(rng.integers(1, 4)), h, w)) < rng.uniform(0.2, 0.8)
        mask = torch.from_numpy(masks)[:, None]
        labels = connected_components(mask)
        assert torch.equal(labels, kornia.contrib.connected_components_union_find(mask.to(torch.uint8))), trial
        for i, m in enumerate(masks):
            assert np.array_equal(_canonical(labels[i, 0].numpy()), _canonical(_scipy_labels(m))), (trial, i)


def _block_components(mask: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Foreground flag and scipy component of each 2 × 2 block of a ``(N, H, W)`` mask (blocks flattened)."""
    n, h, w = mask.shape
    padded = np.pad(mask, ((0, 0), (0, h % 2), (0, w % 2)))
    labels = np.stack([_scipy_labels(m) + i * m.size for i, m in enumerate(padded)]) * padded
    blocks = labels.reshape(n, (h + 1) // 2, 2, (w + 1) // 2, 2).max((2, 4)).reshape(-1)
    return blocks > 0, blocks


LEMMA_PATTERNS = ["spiral", "spiral_flipped", "serpentine_transposed", "zigzags", "comb", "comb_flipped", "checkerboard"]


@pytest.mark.parametrize("name", [*LEMMA_PATTERNS, "random_0.55", "random_0.7"])
def test_after_2k_rounds_every_unfinished_tree_has_2_to_the_k_blocks(name: str) -> None:
    """The lemma the fixed budget rests on (see ``_union_find_schedule``), after every even number of rounds;
    and after every round (its pointer jumps done) the forest is made of stars rooted at each tree's smallest block."""
    mask = np.stack([PATTERNS[name], PATTERNS[name][::-1].copy()])
    pixels, neighbours = _block_graph(torch.from_numpy(mask))
    blocks = pixels[0].numel()
    foreground, component = _block_components(mask)
    component_size = np.bincount(component[foreground])
    schedule = _union_find_schedule(blocks, blocks.bit_length() - 1)  # complete labelling
    for rounds in range(len(schedule) + 1):
        roots = _union_find(neighbours, schedule[:rounds]).numpy()
        assert np.array_equal(roots[roots], roots), rounds  # stars
        fg_roots = roots[foreground]
        assert np.array_equal(component[fg_roots], component[foreground])  # a tree never spans two components
        smallest = np.full(roots.size, roots.size)
        np.minimum.at(smallest, fg_roots, np.flatnonzero(foreground))
        assert np.array_equal(smallest[fg_roots], fg_roots), rounds  # the root is the tree's smallest block
        tree_size = np.bincount(fg_roots, minlength=roots.size)[fg_roots]
        whole = tree_size == component_size[component[foreground]]
        if rounds % 2 == 0:
            assert np.all(whole | (tree_size >= 2 ** (rounds // 2))), (name, rounds)
    assert np.all(whole)  # 2 floor(log2 blocks) rounds label every component completely


def test_union_find_schedule() -> None:
    # 96²: 48² = 2304 blocks; 12 rounds for min_area 0.005 (47 px -> 2^6 = 64 >= 47)
    assert _union_find_schedule(2304, 6) == [12, 12, 11, 11, 10, 10, 9, 9, 8, 8, 7, 7]
    assert _union_find_schedule(1, 0) == []
    assert _union_find_schedule(2, 1) == [1, 1]


# ---------------------------------------------------------------------------------------------
# the size filter
# ---------------------------------------------------------------------------------------------


@pytest.mark.parametrize("name", sorted(PATTERNS))
def test_drop_small_components_equals_the_kornia_bincount_rule(name: str) -> None:
    pattern = PATTERNS[name]
    h, w = pattern.shape
    batch = np.stack([pattern, _random(h, w, 0.35, 3), _random(h, w, 0.6, 4)])
    mask = torch.from_numpy(batch)[:, None]
    areas = sorted({int(a) for m in batch for a in np.bincount(_scipy_labels(m).reshape(-1))[1:]})
    # every area as threshold (a component of exactly that area stays), and just above and below it
    near_areas = {a + d for a in areas for d in (-1, -0.5, 0, 0.5, 1)}
    thresholds = sorted({0.5, 1.0, 1.5, h * w * 0.005, 2.0 * h * w} | near_areas)
    for min_pixels in thresholds:
        expected = _kornia_drop_small_components(mask, min_pixels)
        assert torch.equal(_drop_small_components(mask, min_pixels), expected), min_pixels


def test_drop_small_components_on_random_masks_and_sizes() -> None:
    rng = np.random.default_rng(1)
    for trial in range(40):
        h, w = (int(v) for v in rng.integers(2, 70, size=2))
        mask = torch.from_numpy(rng.random((2, 1, h, w)) < rng.uniform(0.2, 0.75))
        for min_pixels in (2, 5.5, 17, 46.08, 100, 251):
            expected = _kornia_drop_small_components(mask, min_pixels)
            assert torch.equal(_drop_small_components(mask, min_pixels), expected), (trial, min_pixels)


# ---------------------------------------------------------------------------------------------
# the whole clean-up, on the sample video
# ---------------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def sample_frames() -> torch.Tensor:
    """Every 2nd frame of the first 40 of SampleVideos, ``(20, 3, 272, 640)`` float in [0, 1]."""
    clip = SampleVideos("all").read_clip(0, 0, 20, 2)
    return torch.from_numpy(clip).permute(0, 3, 1, 2).float() / 255


def _sample_clips(frames: torch.Tensor, size: int, count: int = 8) -> torch.Tensor:
    """``(count, 5, 3, size, size)`` clips: frames area-resized to height ``size``, square crops at several
    places and times."""
    width = round(frames.shape[-1] * size / frames.shape[-2])
    frames = F.interpolate(frames, size=(size, width), mode="area")
    clips = []
    for k in range(count):
        start, x0 = (3 * k) % (frames.shape[0] - 4), (k * (width - size)) // max(count - 1, 1)
        clips.append(frames[start : start + 5, :, :, x0 : x0 + size])
    return torch.stack(clips)


@pytest.mark.parametrize("size", [96, 224])
@pytest.mark.parametrize(
    "config",
    [
        MotionMaskConfig(),
        MotionMaskConfig(open_size=5, close_size=11, min_area=0.02),
        MotionMaskConfig(threshold=0.02, min_area=0.001),
    ],
)
def test_masks_equal_the_kornia_clean_up_on_the_sample_video(
    sample_frames: torch.Tensor, size: int, config: MotionMaskConfig
) -> None:
    clips = _sample_clips(sample_frames, size)
    raw = _residual_motion(clips) > config.threshold
    expected = _kornia_clean_up(raw, config)
    assert 0.01 < expected.float().mean() < 0.5  # there is something to clean up and to keep
    assert torch.equal(_clean_up(raw, config), expected)
    assert torch.equal(motion_masks(clips, config), expected.float())


# ---------------------------------------------------------------------------------------------
# no host synchronisation
# ---------------------------------------------------------------------------------------------


@pytest.mark.parametrize("config", [MotionMaskConfig(), MotionMaskConfig(open_size=5, close_size=11, min_area=0.02)])
def test_motion_masks_make_the_host_wait_for_nothing(config: MotionMaskConfig) -> None:
    clips = torch.stack([synthetic_clip(pan=(1, 1), object_step=(2, 2), seed=s)[0] for s in range(3)])
    motion_masks(clips, config)  # warm-up: builds the cached window
    with HostSyncCounter() as counter:
        masks = motion_masks(clips, config)
    assert counter.total == 0, "\n".join(counter.where)
    assert masks.sum() > 0


def test_connected_components_make_the_host_wait_for_nothing() -> None:
    mask = torch.from_numpy(np.stack([PATTERNS["spiral"], PATTERNS["serpentine"]]))[:, None]
    with HostSyncCounter() as counter:
        connected_components(mask)
        _drop_small_components(mask, 20.0)
    assert counter.total == 0, "\n".join(counter.where)
