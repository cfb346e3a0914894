"""A small transfer benchmark that runs on a CPU: does self-supervised pretraining on the sample
data help a linear probe, kNN and fine-tuning on a real labelled set?

Protocol (every number from this one run):

1. **Pretrain** a ResNet-v2-26 at width 0.25 (the quickstart's trunk) on the bundled sample
   photos and video for the same number of steps under each condition: no pretraining
   (random init), each single task (RP, Col, Ex, MS) and all four tasks together (the
   quickstart's tasks, optimizer, LR schedule (its length fitted to the steps) and ``combine``, read from ``configs/quickstart.yaml``). "Same budget" = the same number of
   steps; the four-task run therefore does ~4× the work of a single task per step.
2. **Probe** the frozen trunk on scikit-learn's bundled digits (1797 real 8×8 scans of
   handwritten digits, 10 classes, upsampled to 64 px; the fixed stratified 2/3–1/3 split of
   :class:`~mtssl_lightning.evaluation.ClassificationDataModule`): a linear probe on globally
   pooled block-3 features (BN + linear, SGD), and kNN (cosine, k=20, exp-weighted vote).
3. **Probe natural images**: "which photo is this patch from", one class per sample photo; a
   linear probe (logistic regression) on the frozen trunk's pooled block-3 features learns from
   patches of the left 60 % of each photo and is tested on patches of the right 40 %. Digits
   are far from what the tasks see; this probe is not, so it can show what the pretraining did
   to the features on the CPU. Reported: whether all four tasks ≥ the best single task > random
   init beyond the seeds' spread.
4. **Fine-tune** the whole network from random init and from the four-task trunk and record
   validation top-1 against steps (the paper's "self-supervised initialisation speeds up
   training" experiment), plotted to ``docs/img/transfer_finetune.png``.

Each condition runs with several seeds (pretraining and probe seeds together); the table gives
mean ± standard deviation and says which differences from random init are within noise (less
than two standard errors of the difference). Digits are far from the photos the trunk was
pretrained on, and 19 photos are far from ImageNet: this checks the pipeline end to end and
shows what such a tiny budget can and cannot do; it does not reproduce the paper's numbers.

Run from the repository root (about 13 minutes on 2 idle CPU cores; 45 when they are busy)::

    .venv/bin/python benchmarks/bench_transfer.py            # --seeds 3 --pretrain-steps 300
"""

from __future__ import annotations

import argparse
import json
import math
import statistics
import tempfile
import time
import warnings
from pathlib import Path

import lightning.pytorch as pl
import torch

from _report import DEFAULT_OUTPUT, command_line, machine, publish
from mtssl_lightning import MultiTaskDataModule, MultiTaskSSL
from mtssl_lightning.data.sample import SAMPLE_NAMES, SAMPLE_VAL_NAMES
from mtssl_lightning.evaluation import ClassificationDataModule, ImageClassifier
from mtssl_lightning.evaluation.knn import embed, knn_predict
from mtssl_lightning.trunks import ResNetV2

CONDITIONS = ("random", "rp", "col", "ex", "ms", "all")
IMAGE_SIZE = 64


QUICKSTART = Path(__file__).resolve().parents[1] / "configs" / "quickstart.yaml"


def quickstart_model() -> dict:
    """The ``model`` section of configs/quickstart.yaml (tasks, optimizer, combine): the
    conditions train with the quickstart's own settings, so the two never drift apart."""
    import yaml

    return yaml.safe_load(QUICKSTART.read_text())["model"]


def make_tasks(names: list[str]) -> dict:
    """The quickstart's tasks (configs/quickstart.yaml), built from its ``class_path``/``init_args``."""
    from lightning.pytorch.cli import instantiate_class

    specs = quickstart_model()["tasks"]
    return {name: instantiate_class((), specs[name]) for name in names}


def trunk() -> ResNetV2:
    return ResNetV2("v2_26", width=0.25)


def quiet_trainer(**kwargs) -> pl.Trainer:
    return pl.Trainer(
        accelerator="cpu", devices=1, logger=False, enable_checkpointing=False, enable_progress_bar=False,
        enable_model_summary=False, **kwargs,
    )


def quickstart_schedule(spec: dict | None, steps: int):  # noqa: ANN201 - an LR-scheduler factory or None
    """The quickstart's ``lr_scheduler`` entry as a factory (``None`` without one), a ``T_max``
    fitted to ``steps`` (the quickstart's is its own run's length)."""
    from lightning.pytorch.cli import instantiate_class

    if not spec:
        return None
    init_args = dict(spec.get("init_args", {}))
    if "T_max" in init_args:
        init_args["T_max"] = steps
    spec = {**spec, "init_args": init_args}
    return lambda optimizer: instantiate_class(optimizer, spec)


def pretrain(condition: str, steps: int, seed: int, folder: Path) -> Path:
    """Pretrain under ``condition`` and export the trunk; returns the export's path."""
    pl.seed_everything(seed, workers=True, verbose=False)
    model_trunk = trunk()
    if condition != "random":
        names = list(CONDITIONS[1:5]) if condition == "all" else [condition]
        settings = quickstart_model()
        lr = settings["optimizer"]["init_args"]["lr"]
        model = MultiTaskSSL(
            make_tasks(names), model_trunk, optimizer=lambda p: torch.optim.Adam(p, lr=lr), lr_scheduler=quickstart_schedule(settings.get("lr_scheduler"), steps),
            combine=settings["combine"],
        )
        data = MultiTaskDataModule(steps_per_epoch=steps, num_workers=2)
        quiet_trainer(max_steps=steps, limit_val_batches=0).fit(model, data)
        model_trunk = model.trunk
    path = folder / f"{condition}-{seed}.pt"
    torch.save({"trunk_spec": model_trunk.spec(), "state_dict": model_trunk.state_dict()}, path)
    return path


def digits(seed: int) -> ClassificationDataModule:
    return ClassificationDataModule(dataset="digits", image_size=IMAGE_SIZE, batch_size=64, num_workers=0, pin_memory=False, seed=0)


def probe(checkpoint: Path, seed: int, epochs: int) -> tuple[float, float]:
    """Linear-probe top-1 and kNN top-1 on the digits validation split."""
    pl.seed_everything(seed, verbose=False)
    model = ImageClassifier(
        num_classes=10, checkpoint=str(checkpoint), frozen=True, bn=True,
        optimizer=lambda p: torch.optim.SGD(p, lr=0.1, momentum=0.9),
    )
    data = digits(seed)
    trainer = quiet_trainer(max_epochs=epochs, num_sanity_val_steps=0)
    trainer.fit(model, data)
    top1 = float(trainer.callback_metrics["val/top1"])
    bank, bank_labels = embed(model.trunk, data.train_eval_dataloader(), "cpu")
    queries, labels = embed(model.trunk, data.val_dataloader(), "cpu")
    predicted = knn_predict(queries, bank, bank_labels, k=20, temperature=0.07, num_classes=10)
    return top1, float((predicted == labels).float().mean())


class _Curve(pl.Callback):
    def __init__(self) -> None:
        self.points: list[tuple[int, float]] = []

    def on_validation_epoch_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        if not trainer.sanity_checking:
            self.points.append((trainer.global_step, float(trainer.callback_metrics["val/top1"])))


def finetune_curve(checkpoint: Path, seed: int, steps: int, every: int) -> list[tuple[int, float]]:
    """Validation top-1 every ``every`` steps while fine-tuning the whole network."""
    pl.seed_everything(seed, verbose=False)
    model = ImageClassifier(
        num_classes=10, checkpoint=str(checkpoint), frozen=False, bn=True,
        optimizer=lambda p: torch.optim.SGD(p, lr=0.05, momentum=0.9),
    )
    curve = _Curve()
    trainer = quiet_trainer(max_steps=steps, val_check_interval=every, check_val_every_n_epoch=None, num_sanity_val_steps=0, callbacks=[curve])
    trainer.fit(model, digits(seed))
    return curve.points


#: the natural-image probe: patch side, patches per photo from its training (left) and held-out (right) part
PATCH, TRAIN_PATCHES, VAL_PATCHES, LEFT = 64, 40, 20, 0.6


def photo_patches(seed: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """The "which photo is this patch from" set: every sample photo (scaled to a 256 px short
    side) is one class; ``TRAIN_PATCHES`` random ``PATCH``² patches from the left ``LEFT`` of
    each photo train the probe, ``VAL_PATCHES`` from the rest (the right part, never seen by
    the probe) test it. Returns ``(train (N, 3, P, P), train labels, val, val labels)``."""
    import numpy as np
    import torch.nn.functional as F

    from mtssl_lightning.data.sample import sample_images

    generator = torch.Generator().manual_seed(1000 + seed)
    sets: dict[str, tuple[list, list]] = {"train": ([], []), "val": ([], [])}
    for label, array in enumerate(sample_images("all").values()):
        photo = torch.from_numpy(np.array(array)).permute(2, 0, 1)[None].float() / 255.0
        scale = 256 / min(photo.shape[-2:])
        photo = F.interpolate(photo, size=(round(photo.shape[-2] * scale), round(photo.shape[-1] * scale)), mode="bilinear", antialias=True)[0]
        height, width = photo.shape[-2:]
        split = int(LEFT * width)
        for name, count, (lo, hi) in (("train", TRAIN_PATCHES, (0, split - PATCH)), ("val", VAL_PATCHES, (split, width - PATCH))):
            xs = torch.randint(lo, hi + 1, (count,), generator=generator)
            ys = torch.randint(0, height - PATCH + 1, (count,), generator=generator)
            sets[name][0].extend(photo[:, y : y + PATCH, x : x + PATCH] for x, y in zip(xs.tolist(), ys.tolist()))
            sets[name][1].extend([label] * count)
    return (torch.stack(sets["train"][0]), torch.tensor(sets["train"][1]), torch.stack(sets["val"][0]), torch.tensor(sets["val"][1]))


def photo_probe(checkpoint: Path, patches: tuple[torch.Tensor, ...], weight_decay: float = 1e-3) -> float:
    """Top-1 of a linear probe telling which photo a held-out patch is from: multinomial logistic
    regression (full-batch L-BFGS, L2 ``weight_decay``) on the standardised, globally pooled
    block-3 features of the frozen trunk."""
    from mtssl_lightning.evaluation.backbone import pretrained_trunk

    model = pretrained_trunk(checkpoint).eval()
    train, train_labels, val, val_labels = patches
    with torch.no_grad():
        features = [model(x).features.mean(dim=(2, 3)).double() for x in (train, val)]
    mean, std = features[0].mean(0), features[0].std(0).clamp_min(1e-6)
    train_x, val_x = ((f - mean) / std for f in features)
    linear = torch.nn.Linear(train_x.shape[1], int(train_labels.max()) + 1, dtype=torch.float64)
    torch.nn.init.zeros_(linear.weight), torch.nn.init.zeros_(linear.bias)  # a convex problem: start anywhere
    optimizer = torch.optim.LBFGS(linear.parameters(), max_iter=300, line_search_fn="strong_wolfe")

    def closure() -> torch.Tensor:
        optimizer.zero_grad()
        loss = torch.nn.functional.cross_entropy(linear(train_x), train_labels) + weight_decay * linear.weight.square().sum()
        loss.backward()
        return loss

    optimizer.step(closure)
    with torch.no_grad():
        return float((linear(val_x).argmax(1) == val_labels).double().mean())


def mean_std(values: list[float]) -> tuple[float, float]:
    """Mean and sample standard deviation (NaN for one value)."""
    return statistics.fmean(values), (statistics.stdev(values) if len(values) > 1 else float("nan"))


def difference(values: list[float], other: list[float]) -> tuple[float, float]:
    """``mean(values) - mean(other)`` and its standard error (NaN with one value each)."""
    (m, s), (mo, so) = mean_std(values), mean_std(other)
    return m - mo, math.sqrt(s**2 / len(values) + so**2 / len(other))


def verdict(values: list[float], baseline: list[float]) -> str:
    """Whether ``values`` differ from ``baseline`` by more than two standard errors of the difference."""
    if len(values) < 2:
        return "n/a (1 seed)"
    diff, se = difference(values, baseline)
    if se == 0 or abs(diff) <= 2 * se:
        return f"{diff:+.3f}, within noise"
    return f"{diff:+.3f}, {'above' if diff > 0 else 'below'} random init"


def beyond(values: list[float], other: list[float], at_least: bool = False) -> str:
    """Whether mean(values) exceeds (or, ``at_least``, is not below) mean(other) beyond the
    seeds' spread (two standard errors of the difference)."""
    diff, se = difference(values, other)
    if not math.isfinite(se):
        return f"{diff:+.3f} (1 seed: no spread)"
    if diff > 2 * se:
        return f"yes ({diff:+.3f}, beyond the spread)"
    if at_least and diff >= -2 * se:
        return f"within noise ({diff:+.3f} ± {2 * se:.3f}), not below"
    return f"no ({diff:+.3f} ± {2 * se:.3f})"


def plot_curves(curves: dict[str, list[list[tuple[int, float]]]], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(6, 4), dpi=110)
    for (name, runs), colour in zip(curves.items(), ("tab:grey", "tab:blue")):
        for run in runs:
            steps, accs = zip(*run)
            ax.plot(steps, accs, color=colour, alpha=0.35, linewidth=1)
        steps = [s for s, _ in runs[0]]
        mean = [statistics.fmean(run[i][1] for run in runs) for i in range(len(steps))]
        ax.plot(steps, mean, color=colour, linewidth=2.5, label=f"{name} (mean of {len(runs)} seeds)")
    ax.set_xlabel("fine-tuning step")
    ax.set_ylabel("digits validation top-1")
    ax.set_title("Fine-tuning the whole network: random init vs four-task pretraining")
    ax.grid(alpha=0.3)
    ax.legend()
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path)
    plt.close(fig)


def measure(args: argparse.Namespace) -> dict:
    """Pretrain and probe every condition for every seed; the raw figures, JSON-ready."""
    started = time.perf_counter()
    seeds = list(range(args.seeds))
    probes: dict[str, list[float]] = {c: [] for c in CONDITIONS}
    knns: dict[str, list[float]] = {c: [] for c in CONDITIONS}
    photos: dict[str, list[float]] = {c: [] for c in CONDITIONS}
    pretrain_seconds: dict[str, list[float]] = {c: [] for c in CONDITIONS}
    curves: dict[str, list] = {"random init": [], "four-task pretraining": []}
    with tempfile.TemporaryDirectory() as tmp:
        folder = Path(tmp)
        for seed in seeds:
            patches = photo_patches(seed)
            for condition in CONDITIONS:
                t0 = time.perf_counter()
                checkpoint = pretrain(condition, args.pretrain_steps, seed, folder)
                pretrain_seconds[condition].append(time.perf_counter() - t0)
                top1, knn = probe(checkpoint, seed, args.probe_epochs)
                probes[condition].append(top1)
                knns[condition].append(knn)
                photos[condition].append(photo_probe(checkpoint, patches))
                print(f"seed {seed} {condition:>6}: probe top-1 {top1:.3f}, kNN top-1 {knn:.3f}, photo probe {photos[condition][-1]:.3f}", flush=True)
            for name, condition in (("random init", "random"), ("four-task pretraining", "all")):
                curves[name].append(finetune_curve(folder / f"{condition}-{seed}.pt", seed, args.finetune_steps, args.finetune_every))
    settings = quickstart_model()
    return {
        "seeds": seeds, "probes": probes, "knns": knns, "photos": photos, "pretrain_seconds": pretrain_seconds,
        "curves": curves, "minutes": (time.perf_counter() - started) / 60, "command": command_line(),
        "lr": settings["optimizer"]["init_args"]["lr"], "combine": settings["combine"],
        "schedule": (settings.get("lr_scheduler") or {}).get("class_path", "").rpartition(".")[2] or None,
        "pretrain_steps": args.pretrain_steps, "probe_epochs": args.probe_epochs,
        "finetune_steps": args.finetune_steps, "finetune_every": args.finetune_every,
    }


def report(results: dict, plot_name: str) -> str:
    """The Markdown section for ``results`` (:func:`measure`'s dict)."""
    r = results
    probes, knns, photos, curves = r["probes"], r["knns"], r["photos"], r["curves"]
    labels = {"random": "random init (no pretraining)", "rp": "relative position", "col": "colorization",
              "ex": "exemplar", "ms": "motion segmentation", "all": "all four tasks"}
    lines = [
        "## Transfer: sample-data pretraining → digits (linear probe, kNN, fine-tuning) and a natural-image probe",
        "",
        f"Machine: {machine()}.  ",
        f"Command: `{r['command']}` ({r['minutes']:.1f} min in all).  ",
        f"Trunk ResNet-v2-26 × 0.25, pretrained {r['pretrain_steps']} steps per condition on the sample photos and video "
        f"(configs/quickstart.yaml's tasks, Adam lr {r['lr']:g}, LR schedule {r.get('schedule') or 'none'}, combine: {r['combine']}); probe: frozen trunk, BN + linear on pooled block 3, {r['probe_epochs']} epochs "
        f"SGD 0.1 on scikit-learn's digits at {IMAGE_SIZE} px (1198 train / 599 val); kNN: cosine, k = 20, exp-weighted. "
        f"Mean ± std over {len(r['seeds'])} seeds; \"vs random\" = difference of means, called within noise when it is under "
        "two standard errors of the difference.",
        "",
        "| pretraining | pretrain time / seed | probe top-1 | vs random | kNN top-1 | vs random |",
        "|---|---|---|---|---|---|",
    ]
    for c in CONDITIONS:
        pm, ps = mean_std(probes[c])
        km, ks = mean_std(knns[c])
        vs_p = "—" if c == "random" else verdict(probes[c], probes["random"])
        vs_k = "—" if c == "random" else verdict(knns[c], knns["random"])
        lines.append(
            f"| {labels[c]} | {statistics.fmean(r['pretrain_seconds'][c]):.0f} s | {pm:.3f} ± {ps:.3f} | {vs_p} | {km:.3f} ± {ks:.3f} | {vs_k} |"
        )
    singles = {c: statistics.fmean(photos[c]) for c in CONDITIONS[1:5]}
    best = max(singles, key=singles.get)
    lines += [
        "",
        "**Natural images: which photo is a patch from** (the same pretrained trunks): "
        f"each of the {len(SAMPLE_NAMES)} sample photos (pretraining's {len(SAMPLE_NAMES) - len(SAMPLE_VAL_NAMES)} training and "
        f"{len(SAMPLE_VAL_NAMES)} validation photos) is a class; a logistic-regression probe "
        f"on the frozen trunk's pooled block-3 features learns from {TRAIN_PATCHES} random {PATCH}² patches of the left "
        f"{LEFT:.0%} of each photo and is tested on {VAL_PATCHES} patches of the right part (chance {1 / len(SAMPLE_NAMES):.3f}).",
        "",
        "| pretraining | photo probe top-1 | vs random |",
        "|---|---|---|",
        *[
            f"| {labels[c]} | {mean_std(photos[c])[0]:.3f} ± {mean_std(photos[c])[1]:.3f} | "
            f"{'—' if c == 'random' else verdict(photos[c], photos['random'])} |"
            for c in CONDITIONS
        ],
        "",
        f"All four ≥ best single task ({labels[best]}): {beyond(photos['all'], photos[best], at_least=True)}; "
        f"best single > random: {beyond(photos[best], photos['random'])}. What this leaves out: at equal steps the "
        "four-task run sees four tasks' batches per step (about four times the pretraining work of a single task), "
        "and the probe's photos are the pretraining photos (left parts; the pretraining crops also covered the right "
        "parts of the 24 training photos), so it measures features for these scenes, not transfer to new ones.",
    ]
    finals = {name: [run[-1][1] for run in runs] for name, runs in curves.items()}
    firsts = {name: [run[0][1] for run in runs] for name, runs in curves.items()}
    lines += [
        "",
        f"Fine-tuning the whole network ({r['finetune_steps']} steps, SGD 0.05, validation every {r['finetune_every']} steps), "
        "digits validation top-1:",
        "",
        f"| initialisation | after {r['finetune_every']} steps | after {r['finetune_steps']} steps |",
        "|---|---|---|",
    ]
    for name in curves:
        (m1, s1), (m2, s2) = mean_std(firsts[name]), mean_std(finals[name])
        lines.append(f"| {name} | {m1:.3f} ± {s1:.3f} | {m2:.3f} ± {s2:.3f} |")
    lines += [
        "",
        f"Early gap (four-task − random after {r['finetune_every']} steps): "
        f"{verdict(firsts['four-task pretraining'], firsts['random init'])}; "
        f"final gap: {verdict(finals['four-task pretraining'], finals['random init'])}.",
        "",
        f"![fine-tuning curves](img/{plot_name})",
    ]
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--seeds", type=int, default=3)
    parser.add_argument("--pretrain-steps", type=int, default=300)
    parser.add_argument("--probe-epochs", type=int, default=3)
    parser.add_argument("--finetune-steps", type=int, default=120)
    parser.add_argument("--finetune-every", type=int, default=15)
    parser.add_argument("--output", type=Path, default=DEFAULT_OUTPUT)
    parser.add_argument("--plot", type=Path, default=DEFAULT_OUTPUT.parent / "img" / "transfer_finetune.png")
    parser.add_argument("--results", type=Path, default=None,
                        help="also write the raw figures (JSON) here, to re-report them later with --report-only")
    parser.add_argument("--report-only", type=Path, default=None, metavar="RESULTS",
                        help="do not measure: report (and plot) the raw figures a --results run saved")
    args = parser.parse_args()
    warnings.filterwarnings("ignore")
    torch.set_num_threads(2)
    if args.report_only is not None:
        results = json.loads(args.report_only.read_text())
    else:
        results = measure(args)
        if args.results is not None:
            args.results.write_text(json.dumps(results, indent=1))
    plot_curves(results["curves"], args.plot)
    publish(report(results, args.plot.name), "transfer", args.output)


if __name__ == "__main__":
    main()
