"""Tests of the exemplar task: distances, triplet mining against brute force, no host syncs, float32 under
autocast, each augmentation against an independent reference (torchvision, Kornia, torch.flip/rot90),
random parameters' ranges and probabilities, head, learning."""

from __future__ import annotations

import itertools
import math
import time

import kornia.geometry.transform as KT
import numpy as np
import pytest
import torch
import torch.nn.functional as F
import torchvision.transforms.v2.functional as TF
from host_syncs import HostSyncCounter
from photos import photo_tensors
from seeds import learning_seed
from torchvision.ops import roi_align

from mtssl_lightning.data.color import lab_gray
from mtssl_lightning.tasks import Exemplar, ExemplarSampler
from mtssl_lightning.tasks.exemplar import (
    ExemplarBatch,
    ViewParameters,
    ViewRetrievalAccuracy,
    pairwise_distances,
    triplet_loss,
)

# augmentation off: each view is the whole image resized to view_size
IDENTITY = dict(
    crop_scale=(1.0, 1.0), crop_ratio=(1.0, 1.0), rotation=0.0, flip_p=0.0, jitter_p=0.0, grey_p=0.0, blur_p=0.0
)


# --------------------------------------------------------------------------------------------
# brute-force references (pure Python, every triplet enumerated)
# --------------------------------------------------------------------------------------------


def _distances(x: list[list[float]]) -> list[list[float]]:
    return [[math.dist(a, b) for b in x] for a in x]


def _reference_semi_hard(embeddings: torch.Tensor, labels: torch.Tensor, margin: float) -> tuple[float, int]:
    """Mean over (a, p) of relu(d_ap - d_an + m), n the closest negative farther than p, else the
    farthest negative; also returns how many pairs used that fallback."""
    y = labels.tolist()
    d = _distances(embeddings.tolist())
    terms, fallbacks = [], 0
    for a, p in itertools.permutations(range(len(y)), 2):
        if y[a] != y[p]:
            continue
        negatives = [d[a][n] for n in range(len(y)) if y[n] != y[a]]
        farther = [v for v in negatives if v > d[a][p]]
        if farther:
            d_an = min(farther)
        else:
            d_an, fallbacks = max(negatives), fallbacks + 1
        terms.append(max(0.0, d[a][p] - d_an + margin))
    return sum(terms) / len(terms), fallbacks


def _reference_batch_hard(embeddings: torch.Tensor, labels: torch.Tensor, margin: float) -> float:
    """Per anchor with a positive, the largest relu(d_ap - d_an + m) over all its triplets; mean."""
    y = labels.tolist()
    d = _distances(embeddings.tolist())
    per_anchor = []
    for a in range(len(y)):
        triplets = [
            max(0.0, d[a][p] - d[a][n] + margin)
            for p in range(len(y))
            for n in range(len(y))
            if p != a and y[p] == y[a] and y[n] != y[a]
        ]
        if triplets:
            per_anchor.append(max(triplets))
    return sum(per_anchor) / len(per_anchor)


def _random_case(seed: int, n: int = 12, dim: int = 4, normalise: bool = False) -> tuple[torch.Tensor, torch.Tensor]:
    generator = torch.Generator().manual_seed(seed)
    embeddings = torch.randn(n, dim, generator=generator, dtype=torch.float64)
    if normalise:
        embeddings = F.normalize(embeddings, dim=1)
    # 3-4 labels, in random order; some seeds give a singleton label (an anchor without positive)
    classes = 3 + seed % 2
    labels = torch.randint(0, classes, (n,), generator=generator)
    labels[:classes] = torch.arange(classes)  # every class present...
    labels[classes] = 0  # ...and at least one positive pair
    return embeddings, labels[torch.randperm(n, generator=generator)]


# --------------------------------------------------------------------------------------------
# distances and the loss
# --------------------------------------------------------------------------------------------


def test_pairwise_distances_match_cdist_with_zero_diagonal() -> None:
    torch.manual_seed(0)
    for dtype, tol in ((torch.float64, 1e-10), (torch.float32, 2e-4)):
        x = torch.randn(40, 16, dtype=dtype)
        d = pairwise_distances(x)
        reference = torch.cdist(x.double(), x.double(), compute_mode="donot_use_mm_for_euclid_dist")
        assert d.shape == (40, 40) and d.dtype == dtype
        torch.testing.assert_close(d.double(), reference, atol=tol, rtol=0)
        assert torch.equal(d.diagonal(), torch.zeros(40, dtype=dtype))
        assert torch.equal(d, d.T)
    # half precision input is computed in float32
    assert pairwise_distances(torch.randn(5, 3).half()).dtype == torch.float32


def test_pairwise_distance_gradients_are_finite_for_duplicates() -> None:
    x = torch.randn(6, 5, dtype=torch.float64)
    x[3] = x[1]  # an exact duplicate: d = 0 off the diagonal too
    x.requires_grad_(True)
    d = pairwise_distances(x)
    assert d[1, 3] < 1e-6
    d.sum().backward()
    assert torch.isfinite(x.grad).all()


def test_hand_computed_one_dimensional_case() -> None:
    # points 0, 1 (label 0) and 1.5, 4 (label 1); margin 0.5
    x = torch.tensor([[0.0], [1.0], [1.5], [4.0]], dtype=torch.float64)
    labels = torch.tensor([0, 0, 1, 1])
    # semi-hard: (0,1): d_ap 1, negatives 1.5, 4 -> 1.5 -> 0;  (1,0): d_ap 1, negatives 0.5, 3 -> 3 -> 0;
    # (2,3): d_ap 2.5, negatives 1.5, 0.5, none farther -> fallback 1.5 -> 1.5;  (3,2): d_ap 2.5,
    # negatives 4, 3 -> 3 -> 0.  Mean 1.5 / 4.
    assert triplet_loss(x, labels, 0.5, "semi_hard").item() == pytest.approx(0.375)
    # batch-hard: anchors 0: 1 - 1.5 -> 0;  1: 1 - 0.5 -> 1;  2: 2.5 - 0.5 -> 2.5;  3: 2.5 - 3 -> 0
    assert triplet_loss(x, labels, 0.5, "batch_hard").item() == pytest.approx(0.875)
    # margin 0, semi-hard: only the fallback pair is positive (2.5 - 1.5)
    assert triplet_loss(x, labels, 0.0, "semi_hard").item() == pytest.approx(0.25)


@pytest.mark.parametrize("mining", ["semi_hard", "batch_hard"])
@pytest.mark.parametrize("normalise", [False, True])
def test_triplet_loss_equals_brute_force(mining: str, normalise: bool) -> None:
    fallbacks = 0
    for seed in range(8):
        embeddings, labels = _random_case(seed, normalise=normalise)
        for margin in (0.0, 0.2, 0.5, 1.0):
            loss = triplet_loss(embeddings, labels, margin, mining)
            if mining == "semi_hard":
                expected, used = _reference_semi_hard(embeddings, labels, margin)
                fallbacks += used
            else:
                expected = _reference_batch_hard(embeddings, labels, margin)
            assert loss.item() == pytest.approx(expected, abs=1e-9), (seed, margin)
            # float32 input agrees to float32 precision
            assert triplet_loss(embeddings.float(), labels, margin, mining).item() == pytest.approx(expected, abs=1e-5)
    if mining == "semi_hard":
        assert fallbacks > 0  # the "no semi-hard negative" branch was exercised


def test_semi_hard_fallback_to_the_farthest_negative() -> None:
    # anchor 0's positive (10) is farther than all its negatives (1, 2): the farthest negative (2) is used
    x = torch.tensor([[0.0], [10.0], [1.0], [1.2], [2.0], [2.2]], dtype=torch.float64)
    labels = torch.tensor([0, 0, 1, 1, 2, 2])
    expected, used = _reference_semi_hard(x, labels, 0.5)
    assert used >= 1
    assert triplet_loss(x, labels, 0.5, "semi_hard").item() == pytest.approx(expected, abs=1e-12)
    # the pair (0, 1) alone: relu(10 - 2.2 + 0.5) = 8.3 (farthest negative of 0 is 2.2)
    two = triplet_loss(x[[0, 1, 2, 5]], labels[[0, 1, 2, 5]], 0.5, "semi_hard")
    # pairs: (0,1): d 10, negatives 1, 2.2 -> none farther -> 2.2 -> 8.3;  (1,0): d 10, negatives 9, 7.8 -> 9 -> 1.5
    assert two.item() == pytest.approx((8.3 + 1.5) / 2)


@pytest.mark.parametrize("mining", ["semi_hard", "batch_hard"])
def test_triplet_loss_gradients(mining: str) -> None:
    embeddings, labels = _random_case(3, n=10, dim=3)
    embeddings.requires_grad_(True)
    assert torch.autograd.gradcheck(lambda e: triplet_loss(e, labels, 0.5, mining), (embeddings,))
    # duplicates (zero distances) still give finite gradients
    duplicated = embeddings.detach().clone()
    duplicated[4] = duplicated[2]
    duplicated.requires_grad_(True)
    triplet_loss(duplicated, labels, 0.5, mining).backward()
    assert torch.isfinite(duplicated.grad).all()


def test_triplet_loss_errors() -> None:
    x = torch.randn(4, 3)
    with pytest.raises(ValueError, match="no negative"):
        triplet_loss(x, torch.zeros(4, dtype=torch.long))
    with pytest.raises(ValueError, match="no positive"):
        triplet_loss(x, torch.arange(4))
    with pytest.raises(ValueError, match="mining"):
        triplet_loss(x, torch.tensor([0, 0, 1, 1]), mining="hardest")  # type: ignore[arg-type]


# --------------------------------------------------------------------------------------------
# metric
# --------------------------------------------------------------------------------------------


def test_view_retrieval_accuracy_hand_case_and_summing() -> None:
    metric = ViewRetrievalAccuracy()
    # 1-D points 0, 1 | 1.5, 4: nearest other views 0->1 (hit), 1->1.5 (miss), 1.5->1 (miss), 4->1.5 (hit)
    metric.update(torch.tensor([[0.0], [1.0], [1.5], [4.0]]), torch.tensor([0, 0, 1, 1]))
    assert metric.compute().item() == pytest.approx(0.5)
    # two well separated pairs: 4 of 4 hits; summed over both updates: (2 + 4) / (4 + 4)
    metric.update(torch.tensor([[0.0], [0.1], [5.0], [5.1]]), torch.tensor([7, 7, 3, 3]))
    assert metric.compute().item() == pytest.approx(6 / 8)
    metric.update(torch.tensor([[1.0]]), torch.tensor([0]))  # one view: nothing to retrieve
    assert metric.compute().item() == pytest.approx(6 / 8)


# --------------------------------------------------------------------------------------------
# no host syncs; float32 under autocast
# --------------------------------------------------------------------------------------------


def test_triplet_loss_and_metric_read_no_value_on_the_host() -> None:
    """With ``check=False`` (as the task calls it) the loss and the metric's update would not make a GPU
    host wait; the values equal the checked ones."""
    torch.manual_seed(4)
    embeddings = F.normalize(torch.randn(32, 16), dim=1)
    labels = torch.arange(8).repeat_interleave(4)
    checked = {mining: triplet_loss(embeddings, labels, 0.5, mining) for mining in ("semi_hard", "batch_hard")}
    metric = ViewRetrievalAccuracy()
    task = Exemplar(batch_size=8, views=4)
    batch = ExemplarBatch(inputs=torch.zeros(32, 3, 1, 1), labels=labels, views=4)
    with HostSyncCounter() as counter:
        unchecked = {m: triplet_loss(embeddings, labels, 0.5, m, check=False) for m in ("semi_hard", "batch_hard")}
        task_loss = task.loss(embeddings, batch)
        metric.update(embeddings, labels)
    assert counter.total == 0, "\n".join(counter.where)
    for mining, value in checked.items():
        assert torch.equal(unchecked[mining], value), mining
    assert torch.equal(task_loss, checked["semi_hard"])
    # the checked path still gives its early error (by reading two values on the host)
    with HostSyncCounter() as counter:
        triplet_loss(embeddings, labels)
    assert counter.total == 2


def test_unchecked_triplet_loss_ignores_infinite_terms_off_the_mask() -> None:
    """Anchors without a positive (label 2) give ±inf terms off the mask: a masked ``where``-mean, not a
    product with the mask (``inf · 0 = NaN``); equal to the brute-force reference."""
    x = torch.tensor([[0.0], [1.0], [1.5], [4.0], [9.0]], dtype=torch.float64)
    labels = torch.tensor([0, 0, 1, 1, 2])
    references = {
        "semi_hard": _reference_semi_hard(x, labels, 0.5)[0],
        "batch_hard": _reference_batch_hard(x, labels, 0.5),
    }
    for mining, reference in references.items():
        loss = triplet_loss(x, labels, 0.5, mining, check=False)  # type: ignore[arg-type]
        assert loss.item() == pytest.approx(reference, abs=1e-12), mining


def _semi_hard_choices(d: torch.Tensor, labels: torch.Tensor) -> list[int]:
    """The semi-hard negative of every anchor-positive pair (brute force, as :func:`triplet_loss` documents)."""
    y, rows = labels.tolist(), d.tolist()
    choices = []
    for a, p in itertools.permutations(range(len(y)), 2):
        if y[a] != y[p]:
            continue
        negatives = [n for n in range(len(y)) if y[n] != y[a]]
        farther = [n for n in negatives if rows[a][n] > rows[a][p]]
        choices.append(min(farther, key=rows[a].__getitem__) if farther else max(negatives, key=rows[a].__getitem__))
    return choices


def _near_tie_case(groups: int = 8, dim: int = 64) -> tuple[torch.Tensor, torch.Tensor]:
    """Unit embeddings where semi-hard choices hinge on distance differences of ~5e-4.

    Per group: an anchor ``e0`` and its positive at angle 0.6 rad, and six single-view negatives at
    angles 0.6 + (-1.5, -0.5, 0.5, 1.5, 2.5, 3.5)·1e-3 rad from the anchor (each in its own plane), the
    whole group turned by a random rotation of R^dim (so no coordinate is exact in bf16)."""
    generator = torch.Generator().manual_seed(0)
    deltas = (-1.5e-3, -0.5e-3, 0.5e-3, 1.5e-3, 2.5e-3, 3.5e-3)
    rows, labels = [], []
    for group in range(groups):
        rotation, _ = torch.linalg.qr(torch.randn(dim, dim, generator=generator, dtype=torch.float64))
        angles = torch.tensor([0.0, 0.6, *(0.6 + d for d in deltas)], dtype=torch.float64)
        local = torch.zeros(len(angles), dim, dtype=torch.float64)
        local[:, 0] = angles.cos()
        local[1, 1] = angles[1].sin()
        local[2:, 2 : 2 + len(deltas)] = torch.diag(angles[2:].sin())
        rows.append(local @ rotation.T)
        first = group * (len(deltas) + 1)
        labels += [first, first] + [first + 1 + j for j in range(len(deltas))]
    return torch.cat(rows).float(), torch.tensor(labels)


def test_distances_loss_and_metric_are_float32_under_bfloat16_autocast() -> None:
    """Inside CPU bf16 autocast a matmul runs in bf16 even on float32 inputs; its d² errors (~5e-3) flip
    semi-hard choices on these embeddings (shown with the bare Gram matrix). ``pairwise_distances``, the
    loss and the metric switch autocast off: bit-identical distances, equal losses, the same choices."""
    embeddings, labels = _near_tie_case()
    reference = pairwise_distances(embeddings)
    losses = {m: triplet_loss(embeddings, labels, 0.5, m) for m in ("semi_hard", "batch_hard")}
    metric = ViewRetrievalAccuracy()
    metric.update(embeddings, labels)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        gram = embeddings @ embeddings.T  # what the old code computed under autocast
        assert gram.dtype == torch.bfloat16
        squared = embeddings.square().sum(1)
        bf16_d = (squared[:, None] + squared[None, :] - 2.0 * gram.float()).clamp_min(0.0).sqrt()
        d = pairwise_distances(embeddings)
        autocast_losses = {m: triplet_loss(embeddings, labels, 0.5, m) for m in ("semi_hard", "batch_hard")}
        autocast_metric = ViewRetrievalAccuracy()
        autocast_metric.update(embeddings, labels)
    assert d.dtype == torch.float32 and torch.equal(d, reference)
    for mining, value in losses.items():
        assert autocast_losses[mining].dtype == torch.float32
        torch.testing.assert_close(autocast_losses[mining], value, rtol=1e-6, atol=1e-6)
    assert autocast_metric.compute() == metric.compute() and autocast_metric.total == metric.total == len(labels)
    exact = _semi_hard_choices(reference, labels)
    assert exact == _semi_hard_choices(pairwise_distances(embeddings.double()), labels)  # float32 is enough
    assert _semi_hard_choices(d, labels) == exact
    flipped = sum(a != b for a, b in zip(_semi_hard_choices(bf16_d, labels), exact))
    assert flipped > 0, "the case should be one where bf16 distances change the semi-hard negatives"


# --------------------------------------------------------------------------------------------
# views
# --------------------------------------------------------------------------------------------


def _sampler(size: int, views: int = 2, view_size: int | None = None, **options) -> ExemplarSampler:
    """A sampler with every augmentation off unless ``options`` turns it on."""
    options = {**IDENTITY, **options}
    return ExemplarSampler(batch_size=2, image_size=size, views=views, view_size=view_size or size, **options)


def _parameters(count: int, size: int, **values) -> ViewParameters:
    """Hand-made parameters of ``count`` views of ``size²`` images: the whole image, no rotation, no flip,
    jitter/grey/blur flags off, neutral factors; ``values`` replace any of them."""
    neutral = dict(
        box=torch.tensor([[0.0, 0.0, size, size]]).expand(count, 4),
        angle=torch.zeros(count),
        flip=torch.zeros(count, dtype=torch.bool),
        jitter=torch.zeros(count, dtype=torch.bool),
        factors=torch.tensor([[1.0, 1.0, 1.0, 0.0]]).expand(count, 4),
        grey=torch.zeros(count, dtype=torch.bool),
        blur=torch.zeros(count, dtype=torch.bool),
        sigma=torch.ones(count),
    )
    return ViewParameters(**{**neutral, **values})


def _smooth_images(batch: int, size: int) -> torch.Tensor:
    """Smooth colour images (interpolation errors stay small), values in [0.1, 0.9]."""
    y, x = torch.meshgrid(torch.arange(size).float(), torch.arange(size).float(), indexing="ij")
    channels = [
        0.5 + 0.4 * torch.sin(x / (6 + b + c) + c) * torch.cos(y / (8 + c) - b) for b in range(batch) for c in range(3)
    ]
    return torch.stack(channels).view(batch, 3, size, size)


def test_build_shapes_labels_and_range() -> None:
    torch.manual_seed(0)
    task = Exemplar(batch_size=3, image_size=64, views=5, view_size=40)
    images = torch.rand(3, 3, 64, 64)
    batch = task.build(images)
    assert isinstance(batch, ExemplarBatch)
    assert batch.inputs.shape == (15, 3, 40, 40) and batch.inputs.dtype == torch.float32
    assert torch.equal(batch.labels, torch.arange(3).repeat_interleave(5)) and batch.labels.dtype == torch.int64
    assert batch.views == 5
    assert batch.inputs.min() >= 0.0 and batch.inputs.max() <= 1.0
    # all views differ from each other, also the views of one image
    flat = batch.inputs.flatten(1)
    diff = (flat[:, None] - flat[None]).abs().amax(-1)
    assert (diff + torch.eye(15)).min() > 1e-3


def test_views_come_from_the_generator() -> None:
    """Same seed: bit-identical views; another seed: other views; ``generator=None``: torch's global RNG
    (seeded: reproducible, and the same stream as a CPU generator with that seed)."""
    sampler = ExemplarSampler(batch_size=3, image_size=48, views=4, view_size=32)
    images = torch.rand(3, 3, 48, 48)
    first = sampler.build(images, generator=torch.Generator().manual_seed(5)).inputs
    assert torch.equal(sampler.build(images, generator=torch.Generator().manual_seed(5)).inputs, first)
    other = sampler.build(images, generator=torch.Generator().manual_seed(6)).inputs
    assert (other - first).abs().flatten(1).amax(1).min() > 1e-3  # every view differs
    torch.manual_seed(5)
    global_first = sampler.build(images).inputs
    torch.manual_seed(5)
    assert torch.equal(sampler.build(images).inputs, global_first)
    assert torch.equal(global_first, first)
    # a generator draws from its own stream: the global RNG is left alone
    state = torch.get_rng_state()
    sampler.build(images, generator=torch.Generator().manual_seed(1))
    assert torch.equal(torch.get_rng_state(), state)


def test_build_reads_no_value_on_the_host() -> None:
    """Every augmentation on, with probabilities strictly between 0 and 1: no op that would make a GPU
    host wait (HostSyncCounter), with a generator and with the global RNG. (RGB views: the
    ``"lab_gray"`` harmonization is ``mtssl_lightning.data.color``'s, outside this task.)"""
    sampler = ExemplarSampler(batch_size=4, image_size=48, views=3, view_size=32)
    assert all(0 < p < 1 for p in (sampler.flip_p, sampler.jitter_p, sampler.grey_p, sampler.blur_p))
    assert sampler.rotation > 0 and sampler.blur_kernel_size >= 3 and min(sampler.brightness, sampler.hue) > 0
    images = torch.rand(4, 3, 48, 48)
    generator = torch.Generator().manual_seed(0)
    sampler.build(images, generator=generator)  # warm-up
    with HostSyncCounter() as counter:
        sampler.build(images, generator=generator)
        sampler.build(images)
    assert counter.total == 0, "\n".join(counter.where)


def test_identity_flip_and_grey_augmentations_are_exact() -> None:
    torch.manual_seed(1)
    images = torch.rand(2, 3, 32, 32)
    # the whole image resized: bilinear with align_corners=False, no antialiasing (torchvision's resize)
    resized = F.interpolate(images, size=24, mode="bilinear", align_corners=False).repeat_interleave(3, 0)
    torch.testing.assert_close(resized, TF.resize(images, [24, 24], antialias=False).repeat_interleave(3, 0))
    # (1e-5: sample positions are computed in float32, a few 1e-6 px off torch's resize)
    plain = Exemplar(batch_size=2, image_size=32, views=3, view_size=24, **IDENTITY).build(images)
    torch.testing.assert_close(plain.inputs, resized, atol=1e-5, rtol=0)
    flipped = Exemplar(batch_size=2, image_size=32, views=3, view_size=24, **{**IDENTITY, "flip_p": 1.0}).build(images)
    torch.testing.assert_close(flipped.inputs, plain.inputs.flip(-1), atol=1e-5, rtol=0)
    grey = Exemplar(batch_size=2, image_size=32, views=3, view_size=24, **{**IDENTITY, "grey_p": 1.0}).build(images)
    luminance = 0.299 * resized[:, :1] + 0.587 * resized[:, 1:2] + 0.114 * resized[:, 2:]
    torch.testing.assert_close(grey.inputs, luminance.expand(-1, 3, -1, -1), atol=1e-5, rtol=0)
    # at the image's own size the warp returns the pixels themselves
    same = Exemplar(batch_size=2, image_size=32, views=3, view_size=32, **IDENTITY).build(images)
    torch.testing.assert_close(same.inputs, images.repeat_interleave(3, 0), atol=1e-6, rtol=0)


@pytest.mark.parametrize("rotation", [0.0, 20.0])
def test_crop_box_equals_roi_align_and_torchvision_resized_crop(rotation: float) -> None:
    """Hand-made boxes (up- and down-sampling, touching the image's edges, fractional) against
    ``roi_align`` (aligned, one bilinear sample at each output pixel's centre) everywhere, and integer
    boxes against ``torchvision``'s ``resized_crop`` (bilinear, no antialiasing) inside the outermost
    ring of pixels (there, when upsampling, ``resized_crop`` clamps at the box's edge where we read the
    image's pixels just beyond it). With the rotation on and angle 0 the corner weighting changes nothing."""
    images = torch.rand(2, 3, 40, 40)
    boxes = [(0, 0, 40, 40), (3, 5, 20, 12), (17, 0, 23, 40), (0, 29, 11, 11), (2.5, 7.25, 30.5, 17.75)]  # x0, y0, w, h
    sampler = _sampler(40, views=5, view_size=24, rotation=rotation)
    parameters = _parameters(10, 40, box=torch.tensor(boxes, dtype=torch.float32).repeat(2, 1))
    views = sampler.augment(images, parameters).view(2, 5, 3, 24, 24)
    for b, (view, (x0, y0, w, h)) in itertools.product(range(2), zip(range(5), boxes)):
        box = torch.tensor([[0.0, x0, y0, x0 + w, y0 + h]])
        expected = roi_align(images[b : b + 1], box, (24, 24), 1.0, sampling_ratio=1, aligned=True)[0]
        torch.testing.assert_close(views[b, view], expected, atol=1e-5, rtol=0)
        if all(float(v).is_integer() for v in (x0, y0, w, h)):
            expected = TF.resized_crop(images[b], int(y0), int(x0), int(h), int(w), [24, 24], antialias=False)
            torch.testing.assert_close(views[b, view, :, 1:-1, 1:-1], expected[:, 1:-1, 1:-1], atol=1e-5, rtol=0)


def test_rotation_direction_black_corners_and_composition() -> None:
    """Positive angles turn counter-clockwise as displayed (90° = ``torch.rot90``); a rotated constant
    image is constant inside and black in the corners; crop -> rotation -> flip in one warp matches
    torchvision's ``resized_crop``, then Kornia's ``rotate`` (zero padding), then ``torch.flip``, applied
    one after the other (two interpolations, so within a small tolerance on smooth images)."""
    images = torch.rand(2, 3, 32, 32)
    sampler = _sampler(32, views=2, rotation=90.0)
    turned = sampler.augment(images, _parameters(4, 32, angle=torch.tensor([90.0, -90.0, 90.0, 180.0])))
    torch.testing.assert_close(turned[0::2], torch.rot90(images, 1, (-2, -1)), atol=2e-5, rtol=0)
    torch.testing.assert_close(turned[1], torch.rot90(images[0], -1, (-2, -1)), atol=2e-5, rtol=0)
    torch.testing.assert_close(turned[3], torch.rot90(images[1], 2, (-2, -1)), atol=2e-5, rtol=0)

    constant = torch.full((1, 3, 32, 32), 0.7)
    angles = torch.tensor([12.0, -12.0])
    tilted = _sampler(32, views=2, rotation=20.0).augment(constant, _parameters(2, 32, angle=angles))
    torch.testing.assert_close(tilted[:, :, 8:24, 8:24], torch.full((2, 3, 16, 16), 0.7), atol=1e-6, rtol=0)
    for corner in (tilted[..., 0, 0], tilted[..., 0, -1], tilted[..., -1, 0], tilted[..., -1, -1]):
        assert torch.equal(corner, torch.zeros(2, 3))
    assert ((tilted > 0) & (tilted < 0.7 - 1e-6)).any()  # a soft one-pixel edge, as bilinear zero padding

    smooth = _smooth_images(2, 64)
    boxes = torch.tensor([[10.0, 6.0, 40.0, 48.0], [0.0, 20.0, 44.0, 44.0]])  # x0, y0, w, h
    angles, flips = torch.tensor([15.0, -20.0]), torch.tensor([True, False])
    sampler = _sampler(64, views=2, view_size=32, rotation=20.0, flip_p=0.5)
    views = sampler.augment(smooth[:1], _parameters(2, 64, box=boxes, angle=angles, flip=flips))
    for b in range(2):
        x0, y0, w, h = (int(v) for v in boxes[b].tolist())
        crop = TF.resized_crop(smooth[:1], y0, x0, h, w, [32, 32], antialias=False)
        expected = KT.rotate(crop, angles[b : b + 1], padding_mode="zeros")
        expected = expected.flip(-1) if flips[b] else expected
        error = (views[b] - expected[0]).abs()
        assert error.max() < 0.03 and error.mean() < 3e-3, (b, float(error.max()), float(error.mean()))
        assert (expected[0] == 0).any() and (views[b] == 0).any()  # both have black corners


@pytest.mark.parametrize("adjustment", ["brightness", "contrast", "saturation", "hue"])
def test_colour_jitter_equals_torchvision(adjustment: str) -> None:
    """One adjustment on, per-view factors, against ``torchvision``'s ``adjust_*`` on each view; views
    whose jitter flag is off come out bit-identical. Contrast and saturation blend with the BT.601 luma
    (0.299 R), torchvision with 0.2989 R: up to 1e-4 apart."""
    torch.manual_seed(2)
    count = 8
    images = torch.rand(count // 2, 3, 16, 16)
    images[0, :, :4] = images[0, :1, :4]  # grey pixels (hue undefined)
    images[1] = (images[1] * 4).round() / 4  # ties between channels
    strengths = {name: 0.0 for name in ("brightness", "contrast", "saturation", "hue")}
    strengths[adjustment] = 0.1 if adjustment == "hue" else 0.4
    sampler = _sampler(16, views=2, jitter_p=0.8, **strengths)
    factor = torch.linspace(-0.45, 0.45, count) if adjustment == "hue" else torch.linspace(0.0, 2.0, count)
    column = ("brightness", "contrast", "saturation", "hue").index(adjustment)
    factors = torch.tensor([1.0, 1.0, 1.0, 0.0]).repeat(count, 1)
    factors[:, column] = factor
    selected = torch.tensor([True, True, False, True, True, True, True, False])
    views = sampler.augment(images, _parameters(count, 16, jitter=selected, factors=factors))
    plain = images.repeat_interleave(2, 0)
    reference = getattr(TF, f"adjust_{adjustment}")
    for i in range(count):
        if selected[i]:
            expected = reference(plain[i], float(factor[i]))
            tolerance = 1e-4 if adjustment in ("contrast", "saturation") else 3e-6
            torch.testing.assert_close(views[i], expected, atol=tolerance, rtol=0)
        else:
            assert torch.equal(views[i], plain[i])


def test_blur_equals_torchvision_gaussian_blur() -> None:
    sampler = _sampler(32, views=3, blur_p=0.5, blur_sigma=(0.1, 2.0))
    kernel = sampler.blur_kernel_size
    assert kernel == 13
    images = torch.rand(2, 3, 32, 32)
    sigma = torch.tensor([0.1, 0.7, 1.3, 2.0, 1.0, 0.5])
    selected = torch.tensor([True, True, True, True, False, True])
    views = sampler.augment(images, _parameters(6, 32, blur=selected, sigma=sigma))
    plain = images.repeat_interleave(3, 0)
    for i in range(6):
        if selected[i]:
            expected = TF.gaussian_blur(plain[i], [kernel, kernel], [float(sigma[i])] * 2)
            torch.testing.assert_close(views[i], expected, atol=2e-6, rtol=0)
        else:
            assert torch.equal(views[i], plain[i])


def test_grey_flags_select_views() -> None:
    sampler = _sampler(16, views=2, grey_p=0.5)
    images = torch.rand(2, 3, 16, 16)
    selected = torch.tensor([False, True, True, False])
    views = sampler.augment(images, _parameters(4, 16, grey=selected))
    plain = images.repeat_interleave(2, 0)
    luma = (0.299 * plain[:, 0] + 0.587 * plain[:, 1] + 0.114 * plain[:, 2])[:, None].expand(-1, 3, -1, -1)
    torch.testing.assert_close(views[selected], luma[selected], atol=1e-6, rtol=0)
    assert torch.equal(views[~selected], plain[~selected])


def test_random_parameters_ranges_and_probabilities() -> None:
    """Over 40 000 views: flags with their configured probabilities (within 5 standard errors), every
    draw in its range, crop boxes inside the image with area fraction and aspect ratio in range; with a
    scale range where every candidate fits, area uniform and log-aspect symmetric."""
    count, size = 40_000, 96
    sampler = ExemplarSampler(
        batch_size=2, image_size=size, crop_scale=(0.1, 0.5), flip_p=0.3, jitter_p=0.8, grey_p=0.2, blur_p=0.6
    )
    p = sampler.draw_parameters(count, size, size, generator=torch.Generator().manual_seed(3))
    for flags, rate in ((p.flip, 0.3), (p.jitter, 0.8), (p.grey, 0.2), (p.blur, 0.6)):
        assert flags.dtype == torch.bool and flags.shape == (count,)
        assert abs(flags.float().mean().item() - rate) < 5 * math.sqrt(rate * (1 - rate) / count), rate
    assert p.angle.abs().max() <= 20.0 and p.angle.mean().abs() < 0.3
    assert p.angle.std().item() == pytest.approx(20 / math.sqrt(3), rel=0.02)
    low = torch.tensor([0.6, 0.6, 0.6, -0.1])
    assert (p.factors >= low).all() and (p.factors <= torch.tensor([1.4, 1.4, 1.4, 0.1])).all()
    assert p.sigma.min() >= 0.1 and p.sigma.max() <= 2.0
    x0, y0, w, h = p.box.unbind(1)
    assert (x0 >= 0).all() and (y0 >= 0).all() and (x0 + w <= size + 1e-3).all() and (y0 + h <= size + 1e-3).all()
    area, aspect = w * h / size**2, w / h
    assert area.min() >= 0.1 - 1e-5 and area.max() <= 0.5 + 1e-5 and area.mean().item() == pytest.approx(0.3, abs=0.003)
    assert aspect.min() >= 0.75 - 1e-5 and aspect.max() <= 4 / 3 + 1e-5 and aspect.log().mean().abs() < 0.003
    assert (x0 / (size - w)).mean().item() == pytest.approx(0.5, abs=0.01)  # uniform position

    # the default ranges on a square image: candidates that do not fit are skipped, never clipped
    p = ExemplarSampler().draw_parameters(count, size, size, generator=torch.Generator().manual_seed(4))
    x0, y0, w, h = p.box.unbind(1)
    area, aspect = w * h / size**2, w / h
    assert (x0 + w <= size + 1e-3).all() and (y0 + h <= size + 1e-3).all()
    assert area.min() >= 0.25 - 1e-5 and area.max() <= 1.0 + 1e-5
    assert aspect.min() >= 0.75 - 1e-5 and aspect.max() <= 4 / 3 + 1e-5


def test_crop_falls_back_to_the_centred_box() -> None:
    """No candidate fits (aspect 2–3 at 90–100 % of a square image's area): torchvision's fallback, the
    whole width at the nearest allowed aspect ratio, centred; on a wide image the whole height."""
    sampler = ExemplarSampler(batch_size=2, image_size=60, crop_scale=(0.9, 1.0), crop_ratio=(2.0, 3.0))
    p = sampler.draw_parameters(50, 60, 60, generator=torch.Generator().manual_seed(0))
    torch.testing.assert_close(p.box, torch.tensor([[0.0, 15.0, 60.0, 30.0]]).expand(50, 4))
    p = sampler.draw_parameters(50, 10, 60, generator=torch.Generator().manual_seed(0))  # ratio 6 > 3
    torch.testing.assert_close(p.box, torch.tensor([[15.0, 0.0, 30.0, 10.0]]).expand(50, 4))


@pytest.mark.parametrize("scale", [0.25, 0.64])
def test_crop_scale_is_an_area_fraction(scale: float) -> None:
    # a horizontal ramp 0..1: a square crop of area fraction s spans sqrt(s) of the width
    size = 101
    ramp = torch.linspace(0.0, 1.0, size).expand(1, 3, size, size).contiguous()
    task = Exemplar(batch_size=2, image_size=size, views=50, view_size=32, **{**IDENTITY, "crop_scale": (scale, scale)})
    views = task.build(ramp).inputs[:, 0]
    span = views.amax(dim=(1, 2)) - views.amin(dim=(1, 2))
    torch.testing.assert_close(span, torch.full_like(span, math.sqrt(scale)), atol=0.03, rtol=0)
    # and the crops are placed at different positions
    assert views.mean(dim=(1, 2)).std() > 0.05


def test_lab_gray_views_are_the_harmonized_rgb_views() -> None:
    images = torch.rand(2, 3, 48, 48)
    torch.manual_seed(2)
    rgb = Exemplar(batch_size=2, image_size=48, views=4, view_size=32).build(images)
    torch.manual_seed(2)
    grey = Exemplar(batch_size=2, image_size=48, views=4, view_size=32, input_mode="lab_gray").build(images)
    assert torch.equal(grey.inputs[:, 0], grey.inputs[:, 1]) and torch.equal(grey.inputs[:, 0], grey.inputs[:, 2])
    torch.testing.assert_close(grey.inputs, lab_gray(rgb.inputs), atol=1e-5, rtol=0)


def test_one_image_batch_and_bad_configs() -> None:
    from mtssl_lightning.trunks import ResNetV2

    trunk = ResNetV2("tiny", width=0.25)
    task = Exemplar(batch_size=2, image_size=32, views=3, view_size=32, hidden=16, embedding_dim=8)
    task.attach(trunk.out_channels, trunk.out_stride)
    # a one-image batch still builds its views, but has no negatives for the loss
    batch = task.build(torch.rand(1, 3, 32, 32))
    assert batch.inputs.shape == (3, 3, 32, 32)
    with pytest.raises(ValueError, match="single image"):
        task.loss(task(trunk(batch.inputs).features, batch), batch)
    with pytest.raises(ValueError, match="batch_size"):
        Exemplar(batch_size=1)
    with pytest.raises(ValueError, match="views"):
        Exemplar(views=1)
    with pytest.raises(ValueError, match="mining"):
        Exemplar(mining="hardest")  # type: ignore[arg-type]
    with pytest.raises(ValueError, match="crop_scale"):
        Exemplar(crop_scale=(0.5, 1.5))
    with pytest.raises(ValueError, match="view per image"):
        task.loss(torch.zeros(4, 8), ExemplarBatch(inputs=torch.zeros(4, 3, 1, 1), labels=torch.arange(4), views=1))
    with pytest.raises(ValueError, match="generator"):
        task.build(torch.rand(2, 3, 32, 32, device="meta"), generator=torch.Generator())


def test_defaults_and_rescale() -> None:
    task = Exemplar()
    assert (task.image_size, task.sampler.view_size, task.sampler.views, task.margin, task.mining) == (224, 168, 8, 0.5, "semi_hard")
    assert task.data_request().image_size == 224 and task.sampler.blur_kernel_size == 13
    assert task.state_dict() == {}  # no augmentation ranges in checkpoints (they follow the config)
    task.rescale(0.25)  # configs/tiny.yaml
    assert (task.image_size, task.sampler.view_size) == (56, 42)
    assert task.sampler.blur_sigma == pytest.approx((0.025, 0.5)) and task.sampler.blur_kernel_size == 5
    assert task.build(torch.rand(2, 3, 56, 56)).inputs.shape == (16, 3, 42, 42)


def test_head_gives_unit_embeddings_and_gradients_reach_the_trunk() -> None:
    from mtssl_lightning.trunks import ResNetV2

    torch.manual_seed(3)
    trunk = ResNetV2("tiny", width=0.25)
    task = Exemplar(batch_size=4, image_size=64, views=3, view_size=48, hidden=32, embedding_dim=16)
    task.attach(trunk.out_channels, trunk.out_stride)
    batch = task.build(torch.rand(4, 3, 64, 64))
    embeddings = task(trunk(batch.inputs).features, batch)
    assert embeddings.shape == (12, 16)
    torch.testing.assert_close(embeddings.norm(dim=1), torch.ones(12), atol=1e-5, rtol=0)
    loss = task.loss(embeddings, batch)
    assert torch.isfinite(loss) and loss > 0
    loss.backward()
    grads = [p.grad for p in trunk.parameters() if p.requires_grad]
    assert all(g is not None for g in grads) and sum(g.abs().sum() for g in grads) > 0
    metrics = task.make_metrics()
    metrics.update(*task.metric_inputs(embeddings, batch))
    assert 0.0 <= float(metrics.compute()["retrieval_acc"]) <= 1.0


# --------------------------------------------------------------------------------------------
# learning check on the bundled sample photos
# --------------------------------------------------------------------------------------------


def _crops(photos: list[torch.Tensor], which: torch.Tensor, size: int, generator: torch.Generator) -> torch.Tensor:
    """One random square crop (40–70 % of the short side) of ``photos[i]`` for each ``i`` in ``which``,
    resized to ``size``: ``(len(which), 3, size, size)``. Each crop is a distinct exemplar "image"."""
    crops = []
    for i in which.tolist():
        photo = photos[i]
        height, width = photo.shape[-2:]
        side = float(torch.empty(()).uniform_(0.4, 0.7, generator=generator)) * min(height, width)
        x0 = float(torch.rand((), generator=generator)) * (width - side)
        y0 = float(torch.rand((), generator=generator)) * (height - side)
        box = torch.tensor([[0.0, x0, y0, x0 + side, y0 + side]])
        crops.append(roi_align(photo, box, (size, size), 1.0, sampling_ratio=0, aligned=True))
    return torch.cat(crops).clamp(0.0, 1.0)


def _retrieval_accuracy(
    task: Exemplar, trunk: torch.nn.Module, photos: list[torch.Tensor], crops: int, seed: int, batches: int = 8
) -> tuple[float, int]:
    """Retrieval accuracy (eval mode) over ``batches`` batches of ``crops`` fresh crops, spread as
    evenly as possible over ``photos``; fixed seeds."""
    torch.manual_seed(seed)  # the views come from the global RNG
    generator = torch.Generator().manual_seed(seed)
    metric = ViewRetrievalAccuracy()
    with torch.no_grad():
        for _ in range(batches):
            rounds = -(-crops // len(photos))  # ceil
            which = torch.cat([torch.randperm(len(photos), generator=generator) for _ in range(rounds)])
            batch = task.build(_crops(photos, which[:crops], task.image_size, generator))
            metric.update(task(trunk(batch.inputs).features, batch), batch.labels)
    return float(metric.compute()), int(metric.total)


@pytest.mark.slow
def test_learns_to_match_views_on_sample_photos() -> None:
    """Train a tiny trunk + head from scratch for 1000 steps on one core, then check view retrieval.

    Each step takes 16 random crops of distinct training photos as 16 exemplar "images", 4 views
    each (64 px crops, 48 px views). Retrieval is measured in eval mode on fresh crops: 8 batches
    of 16 crops of the 3 held-out *val* photos (so most negatives are other crops of the same
    photo) and of the training photos; chance is 3/63 = 0.048 (binomial std 0.009 over 512
    views). An untrained network is already well above chance (views of one crop share its
    colours), so the test also requires a clear gain over the same network before training.
    Spread over training seeds 0–4 (``MTSSL_LEARNING_SEED``, tests/seeds.py; same evaluation
    crops): val photos 0.234–0.297 before, 0.391–0.455 after, gain 0.127–0.219; training photos
    0.764–0.807 after, gain 0.43–0.51; last / first loss 0.60–0.63. The bounds (val ≥ 0.22 and
    a gain ≥ 0.03; training photos ≥ 0.6 and a gain ≥ 0.2; loss ratio < 0.8) lie well outside
    that spread, so a machine whose arithmetic takes another path still passes.
    """
    from mtssl_lightning.trunks import ResNetV2

    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        torch.manual_seed(learning_seed())
        generator = torch.Generator().manual_seed(learning_seed())
        train_photos, val_photos = photo_tensors("train", 160), photo_tensors("val", 160)
        views, crops = 4, 16
        task = Exemplar(batch_size=crops, image_size=64, views=views, view_size=48, hidden=128, embedding_dim=64)
        trunk = ResNetV2("tiny", width=0.25)
        task.attach(trunk.out_channels, trunk.out_stride)
        parameters = list(trunk.parameters()) + list(task.parameters())

        trunk.eval(), task.eval()
        untrained_val, _ = _retrieval_accuracy(task, trunk, val_photos, crops, seed=123)
        untrained_train, _ = _retrieval_accuracy(task, trunk, train_photos, crops, seed=321)

        optimizer = torch.optim.Adam(parameters, lr=1e-3)
        trunk.train(), task.train()
        start, losses = time.perf_counter(), []
        for _ in range(1000):
            which = torch.randperm(len(train_photos), generator=generator)[:crops]
            if len(which) < crops:
                which = torch.randint(0, len(train_photos), (crops,), generator=generator)
            batch = task.build(_crops(train_photos, which, task.image_size, generator))
            loss = task.loss(task(trunk(batch.inputs).features, batch), batch)
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            optimizer.step()
            losses.append(loss.item())
        train_time = time.perf_counter() - start

        trunk.eval(), task.eval()
        val_accuracy, queries = _retrieval_accuracy(task, trunk, val_photos, crops, seed=123)
        train_accuracy, _ = _retrieval_accuracy(task, trunk, train_photos, crops, seed=321)
        chance = (views - 1) / (crops * views - 1)
        first, last = float(np.mean(losses[:20])), float(np.mean(losses[-50:]))
        print(
            f"\nexemplar learning check: {len(losses)} steps in {train_time:.1f}s, loss {first:.3f} -> {last:.3f}; "
            f"view retrieval on fresh crops ({queries} views each, chance {chance:.3f}): val photos "
            f"{untrained_val:.3f} -> {val_accuracy:.3f}, train photos {untrained_train:.3f} -> {train_accuracy:.3f}"
        )
        assert last < 0.8 * first
        assert val_accuracy >= 0.22  # chance + 18 binomial std
        assert val_accuracy >= untrained_val + 0.03  # seeds 0–4: +0.127 to +0.219
        assert train_accuracy >= 0.6 and train_accuracy >= untrained_train + 0.2
    finally:
        torch.set_num_threads(threads)
