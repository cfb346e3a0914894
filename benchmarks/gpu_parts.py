"""The GPU check's parts (see ``gpu_check.py``): each measures one thing within its time budget, and
records every sub-measurement as a value, an error (the part fails, the others go on) or a skip with
its reason ("no CUDA" in a dry run on the CPU, "time budget spent" on a slow machine)."""

from __future__ import annotations

import gc
import json
import os
import platform
import subprocess
import time
import traceback
from collections.abc import Callable
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

import torch
from lightning.fabric.utilities.apply_func import move_data_to_device

from gpu_harness import ROOT, TASKS, Budget, Settings, fit_fixed, make_model, raw_batches
from gpu_report import TRUNK_ROWS

#: dense bf16 tensor-core peak by the vendors' datasheets, TFLOP/s (MFU's denominator), by name fragment
PEAK_BF16_TFLOPS = {
    "H200 NVL": 835.0, "H200": 989.4, "H100 NVL": 835.0, "H100 PCIe": 756.5, "H100": 989.4, "GH200": 989.4,
    "B200": 2250.0, "A100": 312.0, "L40S": 362.1, "L40": 181.0, "A10G": 70.0, "A10": 125.0, "L4": 121.0,
}


class Record:
    """What a part found, written to ``<out>/<part>.json`` after every sub-measurement (so that a part
    killed at its budget still reports what it had)."""

    def __init__(self, name: str, out: Path, budget: Budget) -> None:
        self.name, self.out, self.budget = name, out, budget
        self.values: dict[str, Any] = {}
        self.errors: dict[str, str] = {}
        self.skipped: dict[str, str] = {}
        self.info: dict[str, str] = {}  # failures of optional checks (reported, not failing the run)
        self.status = "running"
        self.flush()

    def run(self, key: str, fn: Callable[[], Any], need: float = 0.0, cuda_only: bool = False, required: bool = True) -> Any:
        """``fn()`` stored under ``key``; a skip when it needs CUDA and there is none, or when fewer than
        ``need`` seconds of the budget are left; its exception recorded (and the part failed when ``required``)."""
        if cuda_only and not torch.cuda.is_available():
            self.skipped[key] = "no CUDA"
        elif not self.budget.allows(need):
            self.skipped[key] = f"time budget spent ({self.budget.spent():.0f} of {self.budget.seconds:.0f} s, this needs ~{need:.0f} s)"
        else:
            try:
                value = fn()
                self.values[key] = value
                return value
            except Exception as err:  # noqa: BLE001 - a part goes on with its other measurements
                message = f"{type(err).__name__}: {err}"[:600]
                (self.errors if required else self.info)[key] = message + "\n" + traceback.format_exc(limit=-4)[-2000:]
            finally:
                _release()
                self.flush()
        self.flush()
        return None

    def flush(self, status: str | None = None) -> None:
        self.status = status or self.status
        state = {"status": self.status, "spent_s": round(self.budget.spent(), 1), "budget_s": self.budget.seconds,
                 "values": self.values, "errors": self.errors, "skipped": self.skipped, "info": self.info}
        tmp = self.out / f".{self.name}.json"
        tmp.write_text(json.dumps(state, indent=1, default=str))
        tmp.replace(self.out / f"{self.name}.json")


def _release() -> None:
    gc.collect()
    if torch.cuda.is_available():
        torch.cuda.empty_cache()


def _cuda() -> bool:
    return torch.cuda.is_available()


def _sync() -> None:
    if _cuda():
        torch.cuda.synchronize()


# --------------------------------------------------------------------------------------- env
def part_env(s: Settings, budget: Budget, rec: Record) -> None:
    """Versions, card, driver, CUDA, the date; the measured bf16 matrix-product rate."""
    import lightning
    import torchmetrics
    import torchvision

    rec.values["date"] = datetime.now(timezone.utc).strftime("%Y-%m-%d %H:%M UTC")
    rec.values["versions"] = {
        "python": platform.python_version(), "torch": torch.__version__, "torchvision": torchvision.__version__,
        "lightning": lightning.__version__, "torchmetrics": torchmetrics.__version__, "cuda": torch.version.cuda,
        "cudnn": torch.backends.cudnn.version(), **_optional_versions(),
    }
    rec.values["git"] = _git_revision()
    rec.values["host"] = {"cpus": os.cpu_count(), "machine": platform.machine(), "workers": s.workers}
    rec.run("device", _device_info, cuda_only=True)
    rec.run("matmul_bf16_tflops", _matmul_rate, need=5, cuda_only=True)


def _optional_versions() -> dict[str, str]:
    from importlib import metadata

    out = {}
    for name in ("kornia", "jsonargparse", "numpy", "pillow", "pycocotools"):
        try:
            out[name] = metadata.version(name)
        except metadata.PackageNotFoundError:
            out[name] = "absent"
    return out


def _git_revision() -> str:
    try:
        return subprocess.run(["git", "rev-parse", "--short", "HEAD"], cwd=ROOT, capture_output=True, text=True, timeout=10).stdout.strip() or "unknown"
    except (OSError, subprocess.SubprocessError):
        return "unknown"


def _device_info() -> dict[str, Any]:
    props = torch.cuda.get_device_properties(0)
    info = {"name": props.name, "capability": f"{props.major}.{props.minor}", "memory_gib": round(props.total_memory / 2**30, 1),
            "sms": props.multi_processor_count, "peak_bf16_tflops": peak_tflops(props.name)}
    try:
        query = ["nvidia-smi", "--query-gpu=driver_version", "--format=csv,noheader"]
        info["driver"] = subprocess.run(query, capture_output=True, text=True, timeout=20).stdout.strip().splitlines()[0]
    except (OSError, IndexError, subprocess.SubprocessError):
        info["driver"] = "unknown (no nvidia-smi)"
    return info


def peak_tflops(name: str) -> float | None:
    """The datasheet's dense bf16 peak of a card named ``name`` (None when not in the table)."""
    for fragment, peak in PEAK_BF16_TFLOPS.items():
        if fragment in name:
            return peak
    return None


def _matmul_rate() -> float:
    a = torch.randn(8192, 8192, device="cuda", dtype=torch.bfloat16)
    b = torch.randn_like(a)
    for _ in range(3):
        a @ b
    _sync()
    start = time.perf_counter()
    for _ in range(10):
        a @ b
    _sync()
    return 10 * 2 * 8192**3 / (time.perf_counter() - start) / 1e12


# -------------------------------------------------------------------------------------- data
def part_data(s: Settings, budget: Budget, rec: Record) -> None:
    """The JPEG folder and synthetic frame folders (``gpu_data.py``)."""
    from gpu_data import make_data

    start = time.perf_counter()
    rec.values["counts"] = make_data(s.data, s.images, s.image_sides, s.videos, s.frames, s.frame_size)
    rec.values["seconds"] = round(time.perf_counter() - start, 1)
    rec.values["images_mib"] = round(sum(f.stat().st_size for f in (s.data / "images").iterdir()) / 2**20, 1)


# ------------------------------------------------------------------------------------- trunk
#: name -> (bf16 autocast, channels-last, torch.compile)
TRUNK_CONFIGS = dict(zip(TRUNK_ROWS, [(False, False, False), (True, False, False), (True, True, False), (True, True, True)]))


def trunk_step(trunk: torch.nn.Module, x: torch.Tensor, bf16: bool) -> None:
    """One forward + backward of the trunk alone (the loss: the mean of block 3's output)."""
    with torch.autocast(x.device.type, dtype=torch.bfloat16, enabled=bf16):
        features = trunk(x).features
    features.float().mean().backward()
    for p in trunk.parameters():
        p.grad = None


def time_steps(step: Callable[[], None], warmup: int, steps: int, cap_s: float) -> tuple[float, int, float]:
    """``(seconds per step, steps timed, seconds of the first warm-up step)``: ``warmup`` untimed steps,
    then ``steps`` timed ones (fewer if ``cap_s`` seconds pass), one synchronisation at each end."""
    start = time.perf_counter()
    step()
    _sync()
    first = time.perf_counter() - start
    for _ in range(warmup - 1):
        step()
    _sync()
    start, done = time.perf_counter(), 0
    while done < steps and (done < 2 or time.perf_counter() - start < cap_s):
        step()
        done += 1
    _sync()
    return (time.perf_counter() - start) / done, done, first


def trunk_rate(s: Settings, bf16: bool, cl: bool, compiled: bool, gflops: float | None, cap_s: float) -> dict[str, Any]:
    """Images/s of the trunk alone (forward + backward) in one configuration, its TFLOP/s and MFU."""
    from mtssl_lightning.trunks import ResNetV2

    torch.manual_seed(0)
    trunk = ResNetV2(**s.trunk).to(s.device)
    x = torch.randn(s.trunk_batch, 3, s.trunk_size, s.trunk_size, device=s.device)
    if cl:
        trunk, x = trunk.to(memory_format=torch.channels_last), x.contiguous(memory_format=torch.channels_last)
    if compiled:
        trunk.compile(**s.compile_options)
    if _cuda():
        torch.cuda.reset_peak_memory_stats()
    seconds, done, first = time_steps(lambda: trunk_step(trunk, x, bf16), s.warmup, s.steps, cap_s)
    out = {"images_per_s": s.trunk_batch / seconds, "step_ms": 1e3 * seconds, "timed_steps": done, "first_step_s": round(first, 1)}
    if gflops:
        out["achieved_tflops"] = out["images_per_s"] * gflops / 1e3
        peak = peak_tflops(torch.cuda.get_device_name()) if _cuda() else None
        if peak:
            out["mfu"] = out["achieved_tflops"] / peak
    if _cuda():
        out["peak_gib"] = torch.cuda.max_memory_allocated() / 2**30
    return out


def _trunk_rate_child(queue: Any, s: Settings, *args: Any) -> None:
    if s.dry:
        torch.set_num_threads(1)  # as in the workers (gpu_check.worker)
    try:
        queue.put(("ok", trunk_rate(s, *args)))
    except Exception as err:  # noqa: BLE001 - reported by the parent
        queue.put(("error", f"{type(err).__name__}: {err}"))


def compiled_trunk_rate(s: Settings, gflops: float | None, rec: Record, key: str, timeout: float) -> None:
    """:func:`trunk_rate` with ``torch.compile`` in a child process that gets ``timeout`` seconds: a
    compilation slower than that is recorded as skipped (the budget), not as a failure, and cannot eat
    the other parts' time."""
    import multiprocessing
    import queue as queues

    context = multiprocessing.get_context("spawn")
    results = context.Queue()
    child = context.Process(target=_trunk_rate_child, args=(results, s, True, True, True, gflops, 15.0), daemon=True)
    start = time.perf_counter()
    child.start()
    try:
        status, value = results.get(timeout=timeout)
    except queues.Empty:
        status, value = "timeout", None
    finally:
        child.join(5)
        if child.is_alive():
            child.kill()
    if status == "ok":
        value["wall_s_with_compile"] = round(time.perf_counter() - start, 1)
        rec.values[key] = value
    elif status == "timeout":
        rec.skipped[key] = f"time budget spent: compiling and timing took over {timeout:.0f} s (in a child process, stopped)"
    else:
        rec.errors[key] = value
    rec.flush()


def part_trunk(s: Settings, budget: Budget, rec: Record) -> None:
    """Trunk-only forward+backward images/s at 224² in fp32, bf16, +channels-last, +compile; FLOPs, MFU."""
    from mtssl_lightning.trunks import ResNetV2

    rec.values["setup"] = {"trunk": s.trunk, "batch": s.trunk_batch, "size": s.trunk_size}

    def flops() -> float:
        from torch.utils.flop_counter import FlopCounterMode

        trunk = ResNetV2(**s.trunk).to(s.device)
        x = torch.randn(2, 3, s.trunk_size, s.trunk_size, device=s.device)
        with FlopCounterMode(display=False) as counter:
            trunk_step(trunk, x, bf16=False)
        return counter.get_total_flops() / 2 / 1e9

    gflops = rec.run("gflops_per_image_fwd_bwd", flops, need=5)
    for name, (bf16, cl, compiled) in TRUNK_CONFIGS.items():
        if compiled:  # last: whatever the budget has left, in a child process that can be stopped
            if budget.allows(20):
                compiled_trunk_rate(s, gflops, rec, name, budget.left() - 5)
            else:
                rec.run(name, lambda: None, need=20)  # recorded as skipped
            continue
        rec.run(name, lambda bf16=bf16, cl=cl: trunk_rate(s, bf16, cl, False, gflops, 10.0), need=10)


# ------------------------------------------------------------------------------------- tasks
def _trunk_only_ms(s: Settings, model: Any, raw: dict[str, Any]) -> float:
    """Trunk-only forward+backward time (bf16, channels-last) on exactly the trunk inputs the tasks'
    samplers build from ``raw`` (RP's patches, exemplar's views …), summed over the tasks."""
    device = s.device
    trunk = model.trunk.to(device).to(memory_format=torch.channels_last)
    total = 0.0
    for name, sampler in model.task_samplers().items():
        inputs = sampler.prepare(move_data_to_device(raw[name], device)).inputs
        inputs = inputs.contiguous(memory_format=torch.channels_last)
        seconds, _, _ = time_steps(lambda: trunk_step(trunk, inputs, True), 2, max(3, s.steps // 2), 5.0)
        total += seconds
    return 1e3 * total


def part_tasks(s: Settings, budget: Budget, rec: Record) -> None:
    """Each task's whole training step and the four-task step (sum, alternate, concurrent) in images/s,
    as a ratio to the trunk alone on the same inputs; input building's share; peak memory."""
    runs = [((name,), "sum") for name in TASKS] + [(TASKS, "sum"), (TASKS, "alternate"), (TASKS, "concurrent")]
    rec.values["setup"] = {"precision": "bf16-mixed", "channels_last": True, "compile": False, "batches": "paper configs (configs/tasks/*.yaml)" if s.task_batch is None else s.task_batch}
    for names, combine in runs:
        key = names[0] if len(names) == 1 else f"four_tasks_{combine}"

        def measure(names: tuple[str, ...] = names, combine: str = combine) -> dict[str, Any]:
            model = make_model(s, names, combine, channels_last=True, check_every_n_steps=10**6)
            raw = raw_batches(s, model)
            out = fit_fixed(s, model, raw, s.warmup + s.steps, s.warmup)
            out["trunk_only_ms"] = _trunk_only_ms(s, model, raw)
            out["ratio_to_trunk"] = out["step_ms"] / out["trunk_only_ms"]
            return out

        rec.run(key, measure, need=8 if len(names) == 1 else 15)


# ------------------------------------------------------------------------------------- syncs
def part_syncs(s: Settings, budget: Budget, rec: Record) -> None:
    """Host-device synchronisations per four-task training step (no periodic check due), with the
    DataModule's input building and the dashboard callback; decode: cpu and device."""
    from mtssl_lightning.callbacks import TrainingDashboard

    for combine, encoded in (("alternate", False), ("sum", False), ("concurrent", False), ("alternate", True)):
        key = f"{combine}_decode_{'device' if encoded else 'cpu'}"

        def measure(combine: str = combine, encoded: bool = encoded) -> dict[str, Any]:
            model = make_model(s, TASKS, combine, channels_last=True, check_every_n_steps=10**6)
            raw = raw_batches(s, model, encoded=encoded)
            extra = [TrainingDashboard(media_every_n_steps=0)]
            out = fit_fixed(s, model, raw, 2 + max(2, s.steps // 5), 2, count_syncs=_cuda(), extra_callbacks=extra)
            if not _cuda():
                out["syncs_per_step"] = "not counted: no CUDA (tests/test_gpu_paths.py counts them on the CPU)"
            return {k: out[k] for k in ("syncs_per_step", "sync_sources", "timed_steps") if k in out}

        rec.run(key, measure, need=10)
