"""Input-pipeline benchmark: batched task builders vs a per-sample ``torchvision.transforms.v2`` pipeline.

Both pipelines turn random crops of the bundled sample photos into the same trunk inputs and
targets, for the relative-position and colorization tasks, with the same task settings:

* **ours** — 2 DataLoader workers only decode, random-resized-crop, flip and resize to a fixed
  square (:class:`~mtssl_lightning.data.datasets.CropDataset`, ``uint8`` batches collated by
  :meth:`~mtssl_lightning.data.batch.ImageBatch.collate`); the task's batched ``build`` then
  makes the inputs from the whole batch (``images.float() / 255``) in the main process;
* **baseline** — 2 DataLoader workers run one ``v2.Compose`` per sample (``ToImage``,
  ``RandomResizedCrop`` on the ``uint8`` tensor, ``RandomHorizontalFlip``, ``ToDtype``) followed
  by the task's work on that one image: for relative position the jittered grid of patches cut by
  tensor slicing, the random down-/up-sampling (``v2.functional.resize``, antialiased bilinear
  down, bilinear up) and the colour drop (one kept channel, the two others the ImageNet mean
  pixel plus noise of 1/100 of the kept channel's std); for colorization Lab with
  ``kornia.color.rgb_to_lab`` on the single image, the area-downsampled ab and the project's
  :func:`~mtssl_lightning.tasks.colorization.soft_encode` on that image; default collation.

Throughput is images per second of the consumer loop (loader + whole-batch work): a warm-up,
then the median over repeats of ``--batches`` batches. If CUDA is available it also times the
device-side ``build`` against a training step of ``ResNetV2("v2_101")`` on the built inputs.

Run from the repository root::

    .venv/bin/python benchmarks/bench_input_pipeline.py

It prints a table and writes it, with the machine and the command, to its own section of
``docs/benchmarks.md`` (between ``<!-- bench_input_pipeline:start -->`` and ``:end -->``).
"""

from __future__ import annotations

import argparse
import statistics
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path

import kornia
import kornia.color
import torch
import torch.nn.functional as F
from torch import Tensor
from torch.utils.data import DataLoader, Dataset
from torchvision.transforms import v2

from _report import DEFAULT_OUTPUT, bar_chart, command_line, machine, publish
from mtssl_lightning.data.batch import ImageBatch
from mtssl_lightning.data.datasets import CropDataset
from mtssl_lightning.data.sources import ImageSource, SampleImages
from mtssl_lightning.tasks.base import Task
from mtssl_lightning.tasks.colorization import Colorization, soft_encode
from mtssl_lightning.tasks.relative_position import DROP_FILL_RGB, RelativePosition, pair_table
from mtssl_lightning.trunks import ResNetV2

SECTION = "bench_input_pipeline"
#: smallest crop area of the random resized crops, in both pipelines (CropDataset's default)
MIN_SCALE = 0.2


# --------------------------------------------------------------------------------------------
# the cases
# --------------------------------------------------------------------------------------------


@dataclass
class Case:
    """One task configuration, benchmarked with both pipelines.

    Attributes:
        name: short name for the ``--cases`` flag and the table.
        description: the task settings, for the table.
        task: the task (its ``image_size`` is the crop side both pipelines deliver).
        per_sample: the baseline's task-specific per-sample transform of a ``(3, S, S)`` float image.
    """

    name: str
    description: str
    task: Task
    per_sample: Callable[[Tensor], dict[str, Tensor]]


class GridPatches:
    """Baseline relative-position inputs of one ``(3, S, S)`` image in [0, 1], per sample.

    Cuts the ``grid × grid`` lattice of ``task``'s patch size, gap and jitter (all cells: with
    ``pairs="all"`` every cell belongs to a pair), down- and up-samples each patch with
    probability ``downsample_fraction`` and applies the colour drop. Returns ``inputs``
    ``(grid², 3, p, p)`` and the pairs' ``first``, ``second`` (cells) and ``labels``.
    """

    def __init__(self, task: RelativePosition) -> None:
        if task.sampler.pairs != "all" or task.sampler.colour != "drop":
            raise ValueError("the baseline implements pairs='all' with colour='drop' only")
        self.patch_size, self.gap, self.jitter, self.grid = task.sampler.patch_size, task.sampler.gap, task.sampler.jitter, task.sampler.grid
        self.downsample_fraction = task.sampler.downsample_fraction
        self.low = max(1, round(task.sampler.downsample_scale[0] * task.sampler.patch_size))
        self.high = max(self.low, round(task.sampler.downsample_scale[1] * task.sampler.patch_size))
        self.first, self.second, self.labels = pair_table(task.sampler.grid).unbind(dim=1)
        self.fill = torch.tensor(DROP_FILL_RGB).view(3, 1, 1)

    def __call__(self, image: Tensor) -> dict[str, Tensor]:
        _, height, width = image.shape
        p, step, jitter = self.patch_size, self.patch_size + self.gap, self.jitter
        span = self.grid * p + (self.grid - 1) * self.gap
        x_origin = int(torch.randint(jitter, width - span - jitter + 1, ()))
        y_origin = int(torch.randint(jitter, height - span - jitter + 1, ()))
        patches = []
        for cell in range(self.grid * self.grid):
            dx, dy = torch.randint(-jitter, jitter + 1, (2,)).tolist()
            x = x_origin + (cell % self.grid) * step + dx
            y = y_origin + (cell // self.grid) * step + dy
            patch = image[:, y : y + p, x : x + p]
            if float(torch.rand(())) < self.downsample_fraction:
                side = int(torch.randint(self.low, self.high + 1, ()))
                small = v2.functional.resize(patch, [side, side], antialias=True)
                patch = v2.functional.resize(small, [p, p], antialias=False)
            patches.append(self.drop_colour(patch.clamp(0.0, 1.0)))
        return {"inputs": torch.stack(patches), "first": self.first, "second": self.second, "labels": self.labels}

    def drop_colour(self, patch: Tensor) -> Tensor:
        """Keep one random channel; the others become the mean pixel plus N(0, (std_kept / 100)²)."""
        keep = int(torch.randint(0, 3, ()))
        kept = patch[keep]
        out = self.fill + kept.std(unbiased=False) / 100.0 * torch.randn_like(patch)
        out[keep] = kept
        return out


class LabTargets:
    """Baseline colorization inputs and targets of one ``(3, S, S)`` image in [0, 1], per sample.

    Lab via ``kornia.color.rgb_to_lab``; returns ``inputs`` (L / 100 ×3), ``lightness``, ``ab``
    area-downsampled by ``output_stride`` and its soft encoding ``soft_targets`` ``(Q, h, w)``.
    """

    def __init__(self, task: Colorization) -> None:
        self.centres = task.centres.clone()
        self.output_stride, self.neighbours, self.sigma = task.sampler.output_stride, task.sampler.neighbours, task.sampler.sigma

    def __call__(self, image: Tensor) -> dict[str, Tensor]:
        lab = kornia.color.rgb_to_lab(image)
        lightness = lab[:1]
        size = (image.shape[-2] // self.output_stride, image.shape[-1] // self.output_stride)
        ab = F.interpolate(lab[None, 1:], size=size, mode="area")
        soft = soft_encode(ab, self.centres, self.neighbours, self.sigma)[0]
        inputs = (lightness / 100.0).expand(3, -1, -1).contiguous()
        return {"inputs": inputs, "lightness": lightness, "ab": ab[0], "soft_targets": soft}


def make_cases(batch_size: int, col_sizes: list[int]) -> dict[str, Case]:
    """The relative-position cases at the quickstart and paper scale, and colorization per size."""
    cases: dict[str, Case] = {}
    rp_scales = {
        "rp-quickstart": {"patch_size": 32, "gap": 8, "jitter": 3},
        "rp-paper": {"patch_size": 96, "gap": 48, "jitter": 7},
    }
    for name, geometry in rp_scales.items():
        rp = RelativePosition(batch_size=batch_size, pairs="all", colour="drop", **geometry)
        description = (
            f"relative position, {rp.image_size} px crops (required_size), {rp.patch_size} px patches, "
            f"gap {rp.gap}, jitter {rp.jitter}, pairs=all, colour=drop"
        )
        cases[name] = Case(name, description, rp, GridPatches(rp))
    for size in col_sizes:
        col = Colorization(batch_size=batch_size, image_size=size)
        description = f"colorization, {size} px crops, Q={col.num_bins} bins, targets at 1/{col.output_stride}"
        cases[f"col-{size}"] = Case(f"col-{size}", description, col, LabTargets(col))
    return cases


# --------------------------------------------------------------------------------------------
# the two pipelines
# --------------------------------------------------------------------------------------------


class PerSampleDataset(Dataset):
    """Baseline dataset: one ``v2`` pipeline per sample, crop to the task's square then its per-sample work."""

    def __init__(self, source: ImageSource, case: Case, length: int) -> None:
        self.source, self.length = source, length
        self.transform = v2.Compose(
            [
                v2.ToImage(),
                v2.RandomResizedCrop(case.task.image_size, scale=(MIN_SCALE, 1.0), antialias=True),
                v2.RandomHorizontalFlip(),
                v2.ToDtype(torch.float32, scale=True),
                case.per_sample,
            ]
        )

    def __len__(self) -> int:
        return self.length

    def __getitem__(self, index: int) -> dict[str, Tensor]:
        return self.transform(self.source.load(index % len(self.source)))


def ours_stream(source: ImageSource, case: Case, batch_size: int, batches: int, workers: int) -> Iterator[Tensor]:
    """Trunk inputs of ``batches`` batches: CropDataset + ImageBatch.collate, then ``task.build``."""
    dataset = CropDataset(source, case.task.image_size, length=batches * batch_size, min_scale=MIN_SCALE)
    loader = DataLoader(dataset, batch_size, num_workers=workers, collate_fn=ImageBatch.collate, drop_last=True)
    for batch in loader:
        yield case.task.build(batch.images.float() / 255.0).inputs


def loader_stream(source: ImageSource, case: Case, batch_size: int, batches: int, workers: int) -> Iterator[Tensor]:
    """Ours without the task: CropDataset + collate only, the ceiling of ours on this machine."""
    dataset = CropDataset(source, case.task.image_size, length=batches * batch_size, min_scale=MIN_SCALE)
    loader = DataLoader(dataset, batch_size, num_workers=workers, collate_fn=ImageBatch.collate, drop_last=True)
    for batch in loader:
        yield batch.images


def baseline_stream(source: ImageSource, case: Case, batch_size: int, batches: int, workers: int) -> Iterator[Tensor]:
    """Trunk inputs of ``batches`` batches of the per-sample pipeline (patches flattened to ``(B·n, 3, p, p)``)."""
    dataset = PerSampleDataset(source, case, length=batches * batch_size)
    for batch in DataLoader(dataset, batch_size, num_workers=workers, drop_last=True):
        inputs = batch["inputs"]
        yield inputs.reshape(-1, *inputs.shape[-3:])


@dataclass
class Measurement:
    """Images per second of each timed repeat, and the trunk-input shape of one batch."""

    rates: list[float]
    input_shape: tuple[int, ...]

    @property
    def median(self) -> float:
        """Median images per second over the repeats."""
        return statistics.median(self.rates)

    def cell(self) -> str:
        """``"median (min–max)"`` images per second, for the table."""
        return f"{self.median:.0f} ({min(self.rates):.0f}–{max(self.rates):.0f})"


def measure(stream: Iterator[Tensor], batch_size: int, warmup: int, batches: int, repeats: int) -> Measurement:
    """Consume ``warmup`` (>= 1) batches (worker start-up included), then time ``repeats`` runs of ``batches``."""
    shape = tuple(next(stream).shape)
    for _ in range(warmup - 1):
        next(stream)
    rates = []
    for _ in range(repeats):
        start = time.perf_counter()
        for _ in range(batches):
            next(stream)
        rates.append(batches * batch_size / (time.perf_counter() - start))
    return Measurement(rates, shape)


# --------------------------------------------------------------------------------------------
# device share (CUDA only)
# --------------------------------------------------------------------------------------------


def _median_ms(fn: Callable[[], object], device: torch.device, warmup: int, repeats: int) -> float:
    """Median wall time of ``fn()`` in ms, synchronizing ``device`` around each call."""
    times = []
    for i in range(warmup + repeats):
        torch.cuda.synchronize(device)
        start = time.perf_counter()
        fn()
        torch.cuda.synchronize(device)
        if i >= warmup:
            times.append((time.perf_counter() - start) * 1e3)
    return statistics.median(times)


def device_share(
    source: ImageSource, cases: list[Case], batch_size: int, device: torch.device, repeats: int
) -> list[tuple[Case, float, float]]:
    """Per case: median ms of ``task.build`` on the device and of an fp32 trunk training step on its inputs.

    The step is ``ResNetV2("v2_101")`` forward, ``features.square().mean()`` as a stand-in loss
    (no head), backward and an SGD update.
    """
    trunk = ResNetV2("v2_101").to(device)
    optimizer = torch.optim.SGD(trunk.parameters(), lr=1e-3)
    results = []
    for case in cases:
        task = case.task.to(device)
        dataset = CropDataset(source, task.image_size, min_scale=MIN_SCALE)
        images = torch.stack([dataset[i][0] for i in range(batch_size)]).to(device)

        def build() -> Tensor:
            return task.build(images.float() / 255.0).inputs

        inputs = build()

        def step() -> None:
            optimizer.zero_grad(set_to_none=True)
            trunk(inputs).features.square().mean().backward()
            optimizer.step()

        results.append((case, _median_ms(build, device, 2, repeats), _median_ms(step, device, 2, repeats)))
    return results


# --------------------------------------------------------------------------------------------
# report
# --------------------------------------------------------------------------------------------


def render(
    command: str,
    args: argparse.Namespace,
    results: list[tuple[Case, Measurement, Measurement, Measurement]],
    shares: list[tuple[Case, float, float]] | None,
) -> str:
    """The Markdown section: what was compared, the machine, the command and the tables."""
    lines = [
        "## Input pipeline: batched task builders vs per-sample torchvision v2",
        "",
        f"Command: `{command}`",
        "",
        f"Machine: {machine()} (at the end of the run); kornia {kornia.__version__}; the torch threads are "
        f"the main process's, and both pipelines use {args.workers} DataLoader workers (1 thread each).",
        "",
        f"Images/s, median (min–max) of {args.repeats} runs of {args.batches} batches of {args.batch_size} "
        f"after {args.warmup} warm-up batches; random crops of the bundled sample photos (train split). "
        "*Ours*: workers only crop/resize to the square (`CropDataset`, uint8), the task's batched "
        "`build` runs in the main process on the CPU, sharing the cores with the workers. "
        "*Baseline*: workers run a per-sample `torchvision.transforms.v2` pipeline "
        "(`ToImage`, `RandomResizedCrop` on uint8, flip, `ToDtype`) plus the same task work on the one "
        "image (RP: patch grid by tensor slicing, `v2.functional.resize` down/up-sampling, colour drop; "
        "colorization: `kornia.color.rgb_to_lab` and the project's brute-force dense `soft_encode` per "
        "image, i.e. distances to all Q bins), default collation. Ours encodes the colorization targets "
        "sparsely (5 bins and weights per pixel, candidates from a lookup table: the same targets, "
        "tested against the brute-force encoding).",
        "",
        "*Loader only*: ours without the task's `build` (decode, crop, collate): no batched "
        "builder fed by this loader can be faster, so *loader only / baseline* is the ceiling of "
        "*ours / baseline* on this machine.",
        "",
        "| case | trunk inputs per batch | ours img/s | baseline img/s | **ours / baseline** | loader only img/s | loader only / baseline |",
        "|---|---|---:|---:|---:|---:|---:|",
    ]
    for case, ours, baseline, loader in results:
        shape = "×".join(str(s) for s in ours.input_shape)
        lines.append(
            f"| {case.name}: {case.description} | {shape} | {ours.cell()} | {baseline.cell()} | "
            f"**{ours.median / baseline.median:.2f}×** | {loader.cell()} | {loader.median / baseline.median:.2f}× |"
        )
    lines += ["", bar_chart(
        "input_pipeline",
        [f"{case.name} ({kind})" for case, *_ in results for kind in ("ours", "loader only")],
        [m.median / baseline.median for _, ours, baseline, loader in results for m in (ours, loader)],
        "Input pipeline: images/s relative to the per-sample torchvision baseline",
        "× baseline (median; bars: min–max over runs against the baseline's median)",
        low=[min(m.rates) / baseline.median for _, ours, baseline, loader in results for m in (ours, loader)],
        high=[max(m.rates) / baseline.median for _, ours, baseline, loader in results for m in (ours, loader)],
        reference=1.0, reference_label="baseline", output=args.output, write=not args.no_write,
    ), ""]
    if shares is None:
        lines.append(
            "Device share: skipped, no CUDA device (the build vs `ResNetV2(\"v2_101\")` training-step "
            "timing runs only where `torch.cuda.is_available()`)."
        )
    else:
        lines += [
            f"Device share on {torch.cuda.get_device_name()}: median ms of the task's `build` and of an fp32 "
            "`ResNetV2(\"v2_101\")` training step (forward, stand-in loss, backward, SGD) on its inputs.",
            "",
            "| case | build ms | trunk step ms | build share of build + step |",
            "|---|---:|---:|---:|",
        ]
        for case, build_ms, step_ms in shares:
            lines.append(f"| {case.name} | {build_ms:.1f} | {step_ms:.1f} | {build_ms / (build_ms + step_ms):.1%} |")
    return "\n".join(lines) + "\n"


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    """The command-line flags (see ``--help``); sizes and counts must be positive."""
    parser = argparse.ArgumentParser(
        description=__doc__.split("\n\n")[0], formatter_class=argparse.ArgumentDefaultsHelpFormatter
    )
    parser.add_argument("--cases", nargs="+", default=None, help="subset of cases (all if not given; see --list)")
    parser.add_argument("--list", action="store_true", help="list the cases and exit")
    parser.add_argument("--col-sizes", type=int, nargs="+", default=[96, 224], help="colorization crop sides")
    parser.add_argument("--batch-size", type=int, default=32, help="images per batch")
    parser.add_argument("--batches", type=int, default=6, help="batches per timed run")
    parser.add_argument("--repeats", type=int, default=3, help="timed runs per pipeline and case")
    parser.add_argument("--warmup", type=int, default=2, help="untimed batches first (includes worker start-up)")
    parser.add_argument("--workers", type=int, default=2, help="DataLoader workers of both pipelines")
    parser.add_argument(
        "--threads", type=int, default=torch.get_num_threads(), help="torch threads of the main process"
    )
    parser.add_argument("--seed", type=int, default=0, help="torch seed")
    parser.add_argument("--output", type=Path, default=DEFAULT_OUTPUT, help="Markdown file to update")
    parser.add_argument("--no-write", action="store_true", help="print only, do not update --output")
    args = parser.parse_args(argv)
    for flag in ("batch_size", "batches", "repeats", "warmup", "threads"):
        if getattr(args, flag) < 1:
            parser.error(f"--{flag.replace('_', '-')} must be >= 1")
    return args


def main(argv: list[str] | None = None) -> None:
    """Time both pipelines on every selected case, print the table and update the Markdown file."""
    args = parse_args(argv)
    torch.set_num_threads(args.threads)
    torch.manual_seed(args.seed)
    all_cases = make_cases(args.batch_size, args.col_sizes)
    if args.list:
        for case in all_cases.values():
            print(f"{case.name}: {case.description}")
        return
    names = args.cases or list(all_cases)
    unknown = sorted(set(names) - set(all_cases))
    if unknown:
        raise SystemExit(f"unknown case(s) {unknown}; choose from {list(all_cases)}")
    cases = [all_cases[name] for name in names]
    for case in cases:
        case.task.eval()  # colorization: do not count the bin prior (the baseline does not either)

    source = SampleImages("train")
    total = args.warmup + args.repeats * args.batches
    results = []
    for case in cases:
        timed = []
        for stream_of in (ours_stream, baseline_stream, loader_stream):
            stream = stream_of(source, case, args.batch_size, total, args.workers)
            timed.append(measure(stream, args.batch_size, args.warmup, args.batches, args.repeats))
            stream.close()
        ours, baseline, loader = timed
        if ours.input_shape != baseline.input_shape:
            raise RuntimeError(f"{case.name}: ours gives inputs {ours.input_shape}, baseline {baseline.input_shape}")
        ratio = ours.median / baseline.median
        print(
            f"{case.name}: ours {ours.cell()}, baseline {baseline.cell()}, loader only {loader.cell()} img/s, "
            f"ratio {ratio:.2f}x (ceiling {loader.median / baseline.median:.2f}x)",
            flush=True,
        )
        results.append((case, ours, baseline, loader))

    shares = None
    if torch.cuda.is_available():
        shares = device_share(source, cases, args.batch_size, torch.device("cuda"), args.repeats)
    else:
        print("no CUDA device: skipping the device-side build vs ResNetV2('v2_101') training-step timing")

    body = render(command_line(), args, results, shares)
    print()
    publish(body, SECTION, args.output, write=not args.no_write)


if __name__ == "__main__":
    main()
