"""``make gpu-check`` before a GPU is there: every part runs in ``--dry-run`` on the CPU (tiny sizes), the
watchdog kills a part that overruns its budget and the others go on, the report renders GPU results,
and every module the check imports is on the GPU machine or among the wheels ``make gpu-wheels`` carries."""

from __future__ import annotations

import json
import os
import re
import shutil
import subprocess
import sys
import time
import zipfile
from importlib import metadata
from pathlib import Path

import pytest
from packaging.markers import default_environment
from packaging.requirements import Requirement

ROOT = Path(__file__).resolve().parents[1]
BENCHMARKS = ROOT / "benchmarks"
sys.path.insert(0, str(BENCHMARKS))

import gpu_check  # noqa: E402
import gpu_report  # noqa: E402

#: what the GPU machines have, as the issue states it (Python 3.12, no registry): these and what they depend on
PREINSTALLED = ("torch", "torchvision", "lightning", "torchmetrics", "scikit-image", "matplotlib", "h5py", "pillow")
#: imported only on CUDA (not reached on the CPU), all part of the GPU machines' torch install
CUDA_ONLY_IMPORTS = {"triton": "triton"}
#: imported when present, harmless when absent: numpy.f2py's ``try: import charset_normalizer``
OPTIONAL = {"charset_normalizer"}
# litdata (our optimized-copy reader) and what it imports: here `lightning.data` imports it
# because it is installed (that module raises ModuleNotFoundError, caught, where it is not, as on
# the GPU machine); the check itself never streams from an optimized copy
OPTIONAL |= {"litdata", "boto3", "botocore", "s3transfer", "jmespath", "requests", "certifi", "urllib3", "obstore"}
#: the check's own code (the repository, not a package), and modules no distribution owns (made by Cython at run time)
OWN = {"cython_runtime", "mtssl_lightning", "benchmarks", "gpu_check", "gpu_harness", "gpu_parts", "gpu_data", "gpu_fit", "gpu_correctness", "gpu_report", "gpu_utilisation", "_report"}


def _run(args: list[str], env: dict[str, str] | None = None, timeout: float = 1500) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, str(BENCHMARKS / "gpu_check.py"), *args], cwd=ROOT, capture_output=True, text=True, timeout=timeout,
        env={**os.environ, **(env or {})},
    )


@pytest.fixture(scope="module")
def dry_run(tmp_path_factory):
    out = tmp_path_factory.mktemp("gpu-check")
    done = _run(["--dry-run", "--work", str(out / "work"), "--json", str(out / "gpu.json"), "--output", str(out / "benchmarks.md")])
    assert done.returncode == 0, done.stdout[-4000:] + done.stderr[-4000:]
    return json.loads((out / "gpu.json").read_text()), (out / "benchmarks.md").read_text(), done.stdout


@pytest.mark.slow
def test_the_dry_run_reaches_every_part_and_writes_the_report(dry_run):
    """All nine parts end "done" with no error; the only skips are the measurements that need CUDA;
    each table has its rows (tiny CPU numbers: the point is that the code runs, not the figures)."""
    results, markdown, stdout = dry_run
    parts = results["parts"]
    assert list(parts) == list(gpu_check.PARTS)
    for name, part in parts.items():
        assert part["status"] == "done" and not part["errors"], (name, part["errors"])
        assert all(reason == "no CUDA" for reason in part["skipped"].values()), (name, part["skipped"])
    values = {name: part["values"] for name, part in parts.items()}
    assert values["data"]["counts"]["images"] == 24
    for config in gpu_report.TRUNK_ROWS:
        assert values["trunk"][config]["images_per_s"] > 0, config
    assert values["trunk"]["gflops_per_image_fwd_bwd"] > 0
    for run in ("rp", "col", "ex", "ms", "four_tasks_sum", "four_tasks_alternate", "four_tasks_concurrent"):
        task = values["tasks"][run]
        assert task["timed_steps"] >= 2 and task["ratio_to_trunk"] > 0 and 0 < task["build_share"] < 1, run
    for decode in ("cpu", "device"):
        fit = values["fit"][f"decode_{decode}"]
        assert fit["images_per_s"] > 0 and 0 <= fit["data_wait_share"] < 1, decode
    assert values["fit"]["decode_device"]["decode_share"] > 0  # the JPEGs were decoded in the main process
    assert values["fit"]["decode_parity"]["max"] <= 1
    assert set(values["syncs"]) == {"alternate_decode_cpu", "sum_decode_cpu", "concurrent_decode_cpu", "alternate_decode_device"}
    assert values["distributed"]["backend"] == "gloo" and values["distributed"]["ddp"]["steps"] == 3
    assert values["distributed"]["task_parallel"]["steps"] == 3
    assert values["eval"]["deterministic_four_tasks"]["identical"]
    assert {"linear_probe", "detection", "depth"} <= set(values["eval"])
    assert values["memory"]["alternate_k1"] and values["memory"]["sum_k1"]
    assert "<!-- gpu:start -->" in markdown and "### Trunk alone" in markdown and "| four_tasks_alternate |" in markdown
    assert "### Trunk alone" in stdout  # printed too


def _preinstalled() -> set[str]:
    """Distributions of :data:`PREINSTALLED` and everything they require, extras they ask for included
    (their metadata here, markers for CPython 3.12 on Linux), normalised."""
    env = {**default_environment(), "python_version": "3.12", "python_full_version": "3.12.3", "sys_platform": "linux"}
    seen: set[tuple[str, str]] = set()
    todo = [(name, "") for name in PREINSTALLED]
    while todo:
        name, extra = todo.pop()
        name = re.sub(r"[-_.]+", "-", name).lower()
        if (name, extra) in seen:
            continue
        seen.add((name, extra))
        try:
            requires = metadata.requires(name) or []
        except metadata.PackageNotFoundError:
            continue
        for line in requires:
            requirement = Requirement(line)
            if requirement.marker is None or requirement.marker.evaluate({**env, "extra": extra}):
                todo += [(requirement.name, "")] + [(requirement.name, e) for e in requirement.extras]
    return {name for name, _ in seen}


def _carried() -> set[str]:
    lines = (ROOT / "requirements" / "gpu-wheels.txt").read_text().splitlines()
    return {re.sub(r"[-_.]+", "-", line.split("==")[0]).lower() for line in lines if line and not line.startswith("#")}


@pytest.mark.slow
def test_every_module_the_check_imports_is_on_the_gpu_machine_or_carried(dry_run):
    results, _, _ = dry_run
    owners = metadata.packages_distributions()
    available = _preinstalled() | _carried()
    missing = {}
    for module in [*results["imports"], *CUDA_ONLY_IMPORTS]:
        if module in OWN or module in OPTIONAL or module.startswith("_") and module not in owners:
            continue
        dists = {re.sub(r"[-_.]+", "-", d).lower() for d in owners.get(module, [])}
        if not dists & available:
            missing[module] = sorted(dists) or "no distribution found"
    assert not missing, f"imported by the GPU check, but neither preinstalled there nor in requirements/gpu-wheels.txt: {missing}"
    assert "wandb" not in results["imports"] and "av" not in results["imports"]  # neither is on the GPU machine


def test_the_carried_wheels_are_pinned_like_the_project_and_known_to_the_check():
    constraints = {
        re.sub(r"[-_.]+", "-", line.split("==")[0]).lower(): line.split("==")[1]
        for line in (ROOT / "requirements" / "constraints.txt").read_text().splitlines()
        if "==" in line
    }
    pins = [line for line in (ROOT / "requirements" / "gpu-wheels.txt").read_text().splitlines() if line and not line.startswith("#")]
    for pin in pins:
        name, version = pin.split("==")
        assert constraints[re.sub(r"[-_.]+", "-", name).lower()] == version, pin
    assert {re.sub(r"[-_.]+", "-", name).lower() for name in gpu_check.WHEELS} == _carried()
    # what the carried distributions require (markers for CPython 3.12 on Linux) is there too
    env = {**default_environment(), "python_version": "3.12", "python_full_version": "3.12.3", "sys_platform": "linux", "extra": ""}
    available = _preinstalled() | _carried()
    for dist in _carried():
        needs = [Requirement(line) for line in metadata.requires(dist) or []]
        unmet = [str(r) for r in needs if (r.marker is None or r.marker.evaluate(env)) and re.sub(r"[-_.]+", "-", r.name).lower() not in available]
        assert not unmet, f"{dist} needs {unmet}: neither preinstalled on the GPU machine nor carried"
    folder = ROOT / "build" / "gpu-wheels"
    if (folder / "done").exists():  # `make gpu-wheels` ran here: exactly those, well under the 64 MiB a call carries
        wheels = sorted(folder.glob("*.whl"))
        assert {re.sub(r"[-_.]+", "-", w.name.split("-")[0]).lower() for w in wheels} == _carried()
        assert all("cp312" in w.name or "py3-none" in w.name for w in wheels)
        assert sum(w.stat().st_size for w in wheels) < 16 * 2**20


def test_missing_modules_are_unpacked_from_their_wheels_and_present_ones_are_not(tmp_path, monkeypatch):
    wheels = tmp_path / "wheels"
    wheels.mkdir()
    for dist in ("fake_missing", "json"):  # a module this Python lacks, and one it has (never shadowed)
        with zipfile.ZipFile(wheels / f"{dist}-1.0-py3-none-any.whl", "w") as archive:
            archive.writestr(f"{dist}/__init__.py", "CARRIED = True\n")
    monkeypatch.setattr(gpu_check, "WHEELS", {"fake_missing": "fake_missing", "json": "json"})
    monkeypatch.setattr(sys, "path", list(sys.path))
    installed, site = gpu_check.install_missing(wheels)
    assert installed == ["fake_missing"] and site in sys.path
    import fake_missing
    import json as stdlib_json

    assert fake_missing.CARRIED and not hasattr(stdlib_json, "CARRIED")
    sys.modules.pop("fake_missing")
    shutil.rmtree(site)


@pytest.mark.skipif(not (ROOT / "build" / "gpu-wheels" / "done").exists(), reason="`make gpu-wheels` has not run here")
def test_a_python_without_site_packages_gets_every_carried_module_from_the_wheel_folder():
    """As on the GPU machine, where none of them is installed: ``python -S`` (no site-packages) finds
    each carried module in the folder the check unpacks (the cp312 binaries are not imported here)."""
    script = (
        "import importlib.util, sys; from pathlib import Path; sys.path.insert(0, 'benchmarks'); import gpu_check; "
        "installed, site = gpu_check.install_missing(Path('build/gpu-wheels')); "
        "print(sorted(installed)); print(all(importlib.util.find_spec(m).origin.startswith(site) for m in gpu_check.WHEELS.values())); "
        "import shutil; shutil.rmtree(site)"
    )
    done = subprocess.run([sys.executable, "-S", "-c", script], cwd=ROOT, capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stderr
    assert done.stdout.split("\n")[:2] == [str(sorted(gpu_check.WHEELS)), "True"], done.stdout


def test_budgets_leave_the_later_parts_half_of_theirs():
    parts = list(gpu_check.PARTS)
    total = sum(seconds for _, seconds, _ in gpu_check.PARTS.values())
    assert total < gpu_check.DEADLINE_S <= 8 * 60 - 20  # start-ups and the report fit in the 8 minutes
    start = 1000.0
    assert gpu_check.budget_of("trunk", parts[3:], start + gpu_check.DEADLINE_S, start, dry=False) == gpu_check.PARTS["trunk"][1]
    late = start + gpu_check.DEADLINE_S - 100  # 100 s left, 230 s of later budgets: trunk gets none
    assert gpu_check.budget_of("trunk", parts[3:], start + gpu_check.DEADLINE_S, late, dry=False) == 0


@pytest.mark.slow
def test_a_part_that_overruns_its_budget_is_killed_and_the_next_one_runs(tmp_path):
    # 4 s: above the 3 s under which a worker skips a part instead of starting it
    done = _run(
        ["--dry-run", "--only", "env", "data", "--budget", "env=4", "--work", str(tmp_path / "w"), "--json", str(tmp_path / "r.json")],
        env={"GPU_CHECK_HANG": "env", "GPU_CHECK_GRACE_S": "1"}, timeout=600,
    )
    results = json.loads((tmp_path / "r.json").read_text())
    assert done.returncode == 1 and "FAILED parts: env" in done.stderr
    assert results["parts"]["env"]["status"] == "timed out" and results["parts"]["data"]["status"] == "done"


def test_the_report_shows_gpu_figures():
    """What a GPU run records (the CUDA-only fields the dry run cannot fill) renders in every table."""
    ok = {"status": "done", "spent_s": 10, "budget_s": 20, "errors": {}, "skipped": {}, "info": {}}
    step = {"images_per_s": 2400.0, "step_ms": 53.3, "trunk_only_ms": 48.0, "ratio_to_trunk": 1.11, "build_share": 0.031, "peak_gib": 21.5}
    results = {
        "mode": "GPU", "wall_s": 431.0, "command": "make gpu-check", "wheels_installed": ["kornia"],
        "parts": {
            "env": {**ok, "values": {"date": "2026-12-01", "git": "abc", "versions": {"torch": "2.11.0"}, "matmul_bf16_tflops": 780.0,
                                     "device": {"name": "NVIDIA H200", "memory_gib": 139.8, "driver": "580.1", "peak_bf16_tflops": 989.4}}},
            "trunk": {**ok, "values": {"gflops_per_image_fwd_bwd": 41.2, "bf16+cl": {"images_per_s": 9000.0, "step_ms": 14.2, "achieved_tflops": 370.8, "mfu": 0.375, "peak_gib": 30.0, "first_step_s": 0.4}},
                      "errors": {"fp32": "RuntimeError: boom\ntrace"}, "skipped": {"bf16+cl+compile": "time budget spent"}},
            "tasks": {**ok, "values": {"rp": step, "four_tasks_alternate": step}},
            "fit": {**ok, "values": {"decode_cpu": {"images_per_s": 1800.0, "data_wait_share": 0.2, "build_share": 0.04, "gpu_utilisation": {"mean": 71.0}, "syncs_per_step": {"median": 0, "max": 2}, "peak_gib": 30.1},
                                     "decode_parity": {"device": "cuda", "crops": 63, "max": 9.0, "p99": 2.0, "mean": 0.3, "share_differing": 0.2}}},
            "syncs": {**ok, "values": {"alternate_decode_cpu": {"syncs_per_step": {"median": 0, "max": 0, "steps": 6}, "sync_sources": {}}}},
            "memory": {**ok, "values": {"alternate_batch": {"rp": 32}, "alternate_k1": {"peak_gib": 20.0}, "alternate_largest": {"largest_k": 5, "first_oom_k": 6, "exact": True, "peak_gib_by_k": {"2": 38.0, "4": 75.9}}}},
            "eval": {**ok, "values": {"linear_probe": {"steps": 3}}, "info": {"detection_deterministic": "RuntimeError: roi_align_backward_kernel does not have a deterministic implementation"}},
        },
    }
    text = gpu_report.render(results)
    for expected in ("NVIDIA H200", "| bf16+cl | 9,000 | 14.2 | 371 | 37.5 % | 30.0 | 0.4 |", "**failed**: RuntimeError: boom",
                     "skipped: time budget spent", "| four_tasks_alternate | 2,400 | 53.3 | 48.0 | **1.11** | 3.1 % | 21.5 |",
                     "| decode_cpu | 1,800 | 20.0 % | 4.0 % | 71 % | 0 (2) | 30.1 |", "max 9, p99 2", "×5", "| alternate_decode_cpu | 0 | 0 | – |",
                     "fails: RuntimeError: roi_align_backward_kernel"):
        assert expected in text, expected


def test_utilisation_is_read_from_nvidia_smi_when_torch_has_no_nvml(tmp_path, monkeypatch):
    """The GPU machines' torch has no ``pynvml``: the sampler falls back to ``nvidia-smi --loop-ms``
    (here a stand-in script that prints what the real one prints, and the arguments it was given)."""
    import gpu_utilisation

    smi = tmp_path / "nvidia-smi"
    smi.write_text(f'#!/bin/sh\necho "$@" > {tmp_path}/args\nwhile true; do echo 37; echo 55; sleep 0.05; done\n')
    smi.chmod(0o755)
    monkeypatch.setenv("PATH", f"{tmp_path}{os.pathsep}{os.environ['PATH']}")
    monkeypatch.setenv("CUDA_VISIBLE_DEVICES", "3")
    monkeypatch.setattr(gpu_utilisation.torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(gpu_utilisation.torch.cuda, "current_device", lambda: 0)

    def no_nvml() -> int:
        raise ModuleNotFoundError("pynvml does not seem to be installed or it can't be imported.")

    monkeypatch.setattr(gpu_utilisation.torch.cuda, "utilization", no_nvml)
    sampler = gpu_utilisation.UtilisationSampler()
    sampler.start()
    deadline = time.time() + 20
    while len(sampler.samples) < 4 and time.time() < deadline:
        time.sleep(0.05)
    sampler.stop()
    summary = sampler.summary()
    assert summary is not None and summary["source"] == "nvidia-smi" and summary["min"] == 37 and 37 < summary["mean"] < 55
    assert (tmp_path / "args").read_text().split() == ["--query-gpu=utilization.gpu", "--format=csv,noheader,nounits", "-i", "3", "--loop-ms=200"]
    assert sampler._process is not None and sampler._process.poll() is not None  # stopped with the sampler


def test_without_cuda_the_sampler_says_so():
    import gpu_utilisation

    if gpu_utilisation.torch.cuda.is_available():
        pytest.skip("a CUDA device is here")
    sampler = gpu_utilisation.UtilisationSampler()
    sampler.start()
    sampler.stop()
    assert sampler.summary() is None and sampler.problem == "no CUDA"


def test_the_memory_search_finds_the_largest_batch_and_lets_other_errors_through():
    """Doubling then bisecting; cuDNN's allocation failures count as "does not fit" like an OOM."""
    import gpu_fit
    import torch
    from gpu_harness import Budget

    tried = []

    def step(k: int) -> float:
        tried.append(k)
        if k > 5:
            raise torch.cuda.OutOfMemoryError("CUDA out of memory") if k % 2 else RuntimeError("cuDNN error: CUDNN_STATUS_ALLOC_FAILED")
        return 2.0 * k

    found = gpu_fit.largest_batch(step, Budget(60), 30)
    assert found == {"largest_k": 5, "first_oom_k": 6, "exact": True, "peak_gib_by_k": {2: 4.0, 4: 8.0, 5: 10.0}}
    assert tried == [2, 4, 8, 6, 5]

    def broken(k: int) -> float:
        raise RuntimeError("Expected all tensors to be on the same device")

    with pytest.raises(RuntimeError, match="same device"):
        gpu_fit.largest_batch(broken, Budget(60), 30)
