"""The GPU check's real ``fit`` (the four-task config on the JPEG folder, decode ``cpu`` vs ``device``)
and its memory search (the largest per-GPU batch of the four-task step)."""

from __future__ import annotations

import os
import tempfile
import time
from pathlib import Path
from typing import Any

import torch
import yaml

from gpu_harness import ROOT, TASKS, Budget, Settings, StepClock, _repeat, fit_fixed, make_model, raw_batches
from gpu_parts import Record

#: what the check changes in ``configs/pretrain/all.yaml`` for its fit (besides the data folders)
FIT_OVERRIDES = (
    "trainer: logger false, no checkpoints, no validation, max_steps = warm-up + timed steps; "
    "model.compile false (each task's input shape would recompile the trunk, minutes the check does not have; "
    "the trunk part measures compile); data.num_workers = the machine's CPUs - 2 (at most 14)"
)


def _expanded(path: Path) -> dict[str, Any]:
    """A config file with its ``_base_`` files merged in (paths relative to the file)."""
    from mtssl_lightning.config_bases import expand_bases

    cwd = os.getcwd()
    os.chdir(path.parent)
    try:
        return expand_bases(yaml.safe_load(path.read_text()))
    finally:
        os.chdir(cwd)


def fit_config(s: Settings, decode: str, steps: int, warmup: int, out: Path) -> Path:
    """``configs/pretrain/all.yaml`` (+ ``configs/tiny.yaml`` in a dry run) with the check's data and
    :data:`FIT_OVERRIDES`, written to ``out/fit_<decode>.yaml``."""
    from mtssl_lightning.config_bases import merge

    config = _expanded(ROOT / "configs" / "pretrain" / "all.yaml")
    if s.dry:
        config = merge(config, _expanded(ROOT / "configs" / "tiny.yaml"))
        for task in config["model"]["tasks"].values():
            task.setdefault("init_args", {})["batch_size"] = s.task_batch
    data = dict(config.get("data") or {})
    data.update(
        image_root=str(s.data / "images"), val_root=str(s.data / "images_val"), video_root=str(s.data / "frames"),
        video_val_root=str(s.data / "frames_val"), num_workers=s.workers, decode=decode, steps_per_epoch=steps + 10,
    )
    config["data"] = {"class_path": "gpu_harness.TimedDataModule", "init_args": data}
    config["model"]["compile"] = False
    clock = {"class_path": "gpu_harness.StepClock", "init_args": {"warmup": warmup, "count_syncs": torch.cuda.is_available(), "sample_utilisation": True}}
    config["trainer"].update(
        logger=False, enable_checkpointing=False, callbacks=[clock], max_steps=steps, max_epochs=-1, limit_val_batches=0,
        num_sanity_val_steps=0, enable_progress_bar=False, enable_model_summary=False, default_root_dir=str(out / f"run_{decode}"),
    )
    path = out / f"fit_{decode}.yaml"
    path.write_text(yaml.safe_dump(config, sort_keys=False))
    return path


def part_fit(s: Settings, budget: Budget, rec: Record) -> None:
    """``mtssl fit`` of the four-task config on the check's JPEGs and frame folders, with the machine's
    workers, ``data.decode`` cpu then device: images/s, data-wait share, GPU utilisation, syncs; and how
    far nvJPEG's crops are from the workers' (Pillow's)."""
    from mtssl_lightning.cli import run

    rec.values["setup"] = {"config": "configs/pretrain/all.yaml", "overrides": FIT_OVERRIDES, "workers": s.workers, "steps": s.fit_steps}
    out = Path(tempfile.mkdtemp(prefix="gpu-check-fit-"))
    warmup = max(1, s.fit_steps // 5)
    for decode in ("cpu", "device"):
        def measure(decode: str = decode) -> dict[str, Any]:
            start = time.perf_counter()
            cli = run(["fit", "--config", str(fit_config(s, decode, s.fit_steps, warmup, out))])
            clock = next(c for c in cli.trainer.callbacks if isinstance(c, StepClock))
            result = clock.results()
            result["wall_s"] = round(time.perf_counter() - start, 1)
            if torch.cuda.is_available():
                result["peak_gib"] = torch.cuda.max_memory_allocated() / 2**30
                torch.cuda.reset_peak_memory_stats()
            return result

        rec.run(f"decode_{decode}", measure, need=25 if not s.dry else 5)
    rec.run("decode_parity", lambda: decode_parity(s), need=5)


def decode_parity(s: Settings, files: int = 64, size: int = 224) -> dict[str, Any]:
    """Crops of ``files`` JPEGs by the workers' path (Pillow) and by the device path (``decode_jpeg`` on
    the device + Pillow's weights): grey-level differences."""
    from mtssl_lightning.data.datasets import CropDataset
    from mtssl_lightning.data.device_decode import EncodedCropDataset, decode_batch
    from mtssl_lightning.data.sources import ImageFolder

    source = ImageFolder(s.data / "images")
    files = min(files, len(source))
    cpu = CropDataset(source, size, files, train=False)
    dev = EncodedCropDataset(source, size, files, train=False)
    worker = cpu.collate([cpu[i] for i in range(files)]).images
    batch = dev.collate([dev[i] for i in range(files)])
    batch.images = batch.images.to(s.device)
    device = decode_batch(batch).images.cpu()
    encoded = batch.encoded
    diff = (worker[encoded].int() - device[encoded].int()).abs().float()
    return {
        "device": str(s.device), "crops": len(encoded), "max": diff.max().item(), "mean": diff.mean().item(),
        "p99": diff.flatten().kthvalue(max(1, int(0.99 * diff.numel()))).values.item(), "share_differing": (diff > 0).float().mean().item(),
    }


# ------------------------------------------------------------------------------------ memory
def part_memory(s: Settings, budget: Budget, rec: Record) -> None:
    """Peak memory of the four-task step (sum and alternate) at the paper batch sizes, and the largest
    multiple k of them (every task's batch × k) that fits one GPU (doubling, then bisecting)."""
    for combine in ("alternate", "sum"):
        model = make_model(s, TASKS, combine, channels_last=True, check_every_n_steps=10**6)
        base = raw_batches(s, model)
        sizes = {name: len(b) for name, b in base.items()}
        rec.values[f"{combine}_batch"] = sizes

        def step(k: int, model: Any = model, base: dict[str, Any] = base) -> float:
            raw = {name: _pinned(_repeat(b, k)) if k > 1 else b for name, b in base.items()}
            for p in model.parameters():
                p.grad = None
            out = fit_fixed(s, model, raw, 2, 1)
            return out.get("peak_gib", float("nan"))

        first = rec.run(f"{combine}_k1", lambda step=step: {"peak_gib": step(1)}, need=10)
        if first is None:
            continue
        rec.run(f"{combine}_largest", lambda step=step: largest_batch(step, budget, 60 if combine == "alternate" else 30), cuda_only=True, need=15)


def _pinned(batch: Any) -> Any:
    return batch.pin_memory() if torch.cuda.is_available() else batch


def largest_batch(step: Any, budget: Budget, seconds: float) -> dict[str, Any]:
    """The largest k for which ``step(k)`` runs without running out of memory, within ``seconds``."""
    deadline = min(budget.left() - 5, seconds) + time.perf_counter()
    peaks: dict[int, float] = {}
    good, bad, k = 1, None, 2
    while bad is None and time.perf_counter() < deadline:
        if fits(step, k, peaks):
            good, k = k, k * 2
        else:
            bad = k
    while bad is not None and bad - good > 1 and time.perf_counter() < deadline:
        mid = (good + bad) // 2
        if fits(step, mid, peaks):
            good = mid
        else:
            bad = mid
    return {"largest_k": good, "first_oom_k": bad, "exact": bad is not None and bad - good == 1, "peak_gib_by_k": peaks}


#: how a batch too large for the card shows besides ``torch.cuda.OutOfMemoryError``: cuDNN and cuBLAS
#: report a failed workspace allocation, and cuDNN a tensor too large for its kernels, as a plain ``RuntimeError``
OOM_MESSAGES = ("out of memory", "CUDNN_STATUS_ALLOC_FAILED", "CUBLAS_STATUS_ALLOC_FAILED", "CUDNN_STATUS_NOT_SUPPORTED")


def fits(step: Any, k: int, peaks: dict[int, float]) -> bool:
    """Whether ``step(k)`` runs without running out of memory (its peak GiB into ``peaks``); any other
    error propagates."""
    try:
        peaks[k] = round(step(k), 2)
        return True
    except torch.cuda.OutOfMemoryError:
        return False
    except RuntimeError as err:
        if any(message in str(err) for message in OOM_MESSAGES):
            return False
        raise
    finally:
        _free()


def _free() -> None:
    import gc

    gc.collect()
    torch.cuda.empty_cache()
