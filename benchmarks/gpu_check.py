"""``make gpu-check``: one prepared command that measures the project on a GPU and writes it all down.

Run it once on a machine with a CUDA GPU (any torch >= 2.11, no network; what that machine's Python
lacks comes as wheels from ``make gpu-wheels``)::

    make gpu-check                              # or: python3 benchmarks/gpu_check.py --wheels build/gpu-wheels
    python3 benchmarks/gpu_check.py --dry-run   # every part on the CPU at tiny sizes (the tests run this)

It makes its own data (a few thousand JPEGs and synthetic frame folders from scikit-image's photos),
then runs its parts (``PARTS``), each with a time budget so that a slow part cannot eat the rest, the
whole under :data:`DEADLINE_S` seconds: versions and card; the trunk alone; every task's training
step; host-device synchronisations; a real ``fit`` with ``decode: cpu`` and ``device``; a one-process
NCCL DDP and task-parallel run; determinism and the evaluation modules; the memory search. Parts run
in worker processes (a few parts per process, see ``PARTS``); a part that overruns its budget is
killed with its process and recorded as timed out, and the parts after it go on in a new process.

It writes the "GPU" section of ``docs/benchmarks.md`` and ``docs/gpu_check.json`` (``--output``,
``--json``; a dry run writes nothing unless told where), prints the same tables, and exits non-zero
when any part failed or timed out.
"""

from __future__ import annotations

import argparse
import importlib.util
import json
import os
import shutil
import signal
import subprocess
import sys
import tempfile
import time
import zipfile
from pathlib import Path

HERE = Path(__file__).resolve().parent
ROOT = HERE.parent

#: part -> (function, budget in seconds on a GPU, worker group). Parts of one group share a process
#: (one start-up); ``eval`` has its own (``trainer.deterministic`` needs cuBLAS's workspace setting
#: before cuBLAS starts), and ``memory`` comes last in its own (it runs the GPU out of memory on purpose).
PARTS: dict[str, tuple[str, float, str]] = {
    "env": ("gpu_parts:part_env", 10, "main"),
    "data": ("gpu_parts:part_data", 25, "main"),
    "trunk": ("gpu_parts:part_trunk", 150, "main"),
    "tasks": ("gpu_parts:part_tasks", 50, "main"),
    "syncs": ("gpu_parts:part_syncs", 20, "main"),
    "fit": ("gpu_fit:part_fit", 70, "fit"),
    "distributed": ("gpu_correctness:part_distributed", 20, "distributed"),
    "eval": ("gpu_correctness:part_eval", 35, "eval"),
    "memory": ("gpu_fit:part_memory", 35, "memory"),
}
#: the whole check, start-ups included (the issue's limit: 8 minutes on one H100/H200)
DEADLINE_S = 455.0
#: a dry run's budgets: every part gets this many seconds (a slow CPU, not a measurement)
DRY_BUDGET_S, DRY_DEADLINE_S = 400.0, 1800.0
#: seconds past its budget before a part's process is killed (the part stops itself at its budget)
GRACE_S = float(os.environ.get("GPU_CHECK_GRACE_S", 20.0))
#: what the GPU machine may lack: distribution -> import name (the wheels of ``make gpu-wheels``)
WHEELS = {"kornia": "kornia", "kornia_rs": "kornia_rs", "jsonargparse": "jsonargparse", "docstring_parser": "docstring_parser",
          "typeshed_client": "typeshed_client", "pycocotools": "pycocotools"}


def budget_of(part: str, remaining: list[str], deadline: float, now: float, dry: bool) -> float:
    """Seconds ``part`` may take: its own budget, less when the parts after it (``remaining``) would not
    otherwise get half of theirs before ``deadline``."""
    own = _budgets(dry).get(part, PARTS[part][1])
    later = sum(_budgets(dry).get(p, PARTS[p][1]) for p in remaining)
    return max(0.0, min(own, deadline - now - 0.5 * later))


def _budgets(dry: bool) -> dict[str, float]:
    """Each part's nominal budget: :data:`PARTS`' (a dry run: :data:`DRY_BUDGET_S`), with ``--budget``'s
    overrides (passed to the workers as ``GPU_CHECK_BUDGETS``)."""
    budgets = {part: DRY_BUDGET_S if dry else seconds for part, (_, seconds, _) in PARTS.items()}
    for item in filter(None, os.environ.get("GPU_CHECK_BUDGETS", "").split(",")):
        part, _, seconds = item.partition("=")
        budgets[part] = float(seconds)
    return budgets


# ---------------------------------------------------------------------------------- wheels
def install_missing(wheels: Path | None) -> tuple[list[str], str | None]:
    """Unpack the wheels of the modules this Python lacks into a temporary folder added to the path.

    Returns ``(installed distributions, folder)``. Only missing ones: a module the machine has is
    never shadowed by a carried wheel.
    """
    missing = [dist for dist, module in WHEELS.items() if importlib.util.find_spec(module) is None]
    if not missing or wheels is None or not wheels.is_dir():
        return [], None
    target = Path(tempfile.mkdtemp(prefix="gpu-check-site-"))
    installed = []
    for wheel in sorted(wheels.glob("*.whl")):
        dist = wheel.name.split("-")[0].lower().replace(".", "_")
        if dist in missing:
            with zipfile.ZipFile(wheel) as archive:
                archive.extractall(target)
            installed.append(dist)
    sys.path.append(str(target))
    return installed, str(target)


# ---------------------------------------------------------------------------------- parent
def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--dry-run", action="store_true", help="every part on the CPU at tiny sizes (no GPU needed)")
    parser.add_argument("--wheels", type=Path, default=ROOT / "build" / "gpu-wheels", help="wheels for what this Python lacks")
    parser.add_argument("--output", type=Path, help="Markdown report to write the GPU section into (default: docs/benchmarks.md on a GPU)")
    parser.add_argument("--json", type=Path, help="results as JSON (default: docs/gpu_check.json on a GPU)")
    parser.add_argument("--work", type=Path, help="folder for the data and part results (default: a temporary one)")
    parser.add_argument("--only", nargs="+", choices=list(PARTS), help="run just these parts (data is added when needed)")
    parser.add_argument("--budget", nargs="+", default=[], metavar="PART=SECONDS", help="override parts' time budgets")
    parser.add_argument("--worker", nargs="+", help=argparse.SUPPRESS)
    parser.add_argument("--deadline", type=float, help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.budget:
        os.environ["GPU_CHECK_BUDGETS"] = ",".join(args.budget)
    installed, site = install_missing(args.wheels)
    if site:
        os.environ["PYTHONPATH"] = os.pathsep.join(filter(None, [os.environ.get("PYTHONPATH"), site]))
    if args.worker:
        return worker(args.worker, args.work, args.dry_run, args.deadline)

    import torch

    version = tuple(int(v) for v in torch.__version__.split("+")[0].split(".")[:2])
    if version < (2, 11):
        print(f"gpu-check needs torch >= 2.11, found {torch.__version__}", file=sys.stderr)
        return 2
    if not args.dry_run and not torch.cuda.is_available():
        print("gpu-check: no CUDA device here; run it on a GPU machine, or use --dry-run to exercise every part on the CPU", file=sys.stderr)
        return 2
    work = args.work or Path(tempfile.mkdtemp(prefix="gpu-check-"))
    work.mkdir(parents=True, exist_ok=True)
    parts = list(PARTS) if not args.only else [p for p in PARTS if p in args.only or (p == "data" and set(args.only) - {"env", "trunk"})]
    start = time.time()
    deadline = start + (DRY_DEADLINE_S if args.dry_run else DEADLINE_S)
    statuses = orchestrate(parts, work, args.dry_run, deadline)
    results = collect(parts, work, statuses, args, start, installed)
    from gpu_report import publish

    json_path = args.json or (None if args.dry_run else ROOT / "docs" / "gpu_check.json")
    output = args.output or (None if args.dry_run else ROOT / "docs" / "benchmarks.md")
    publish(results, output, json_path)
    failed = [p for p, r in results["parts"].items() if r["status"] in ("failed", "timed out", "crashed")]
    if failed:
        print(f"gpu-check: FAILED parts: {', '.join(failed)}", file=sys.stderr)
    return 1 if failed else 0


def orchestrate(parts: list[str], work: Path, dry: bool, deadline: float) -> dict[str, str]:
    """Run ``parts`` group by group in worker processes; kill a worker whose part overruns; returns
    ``{part: "timed out" | "crashed"}`` for parts the workers did not finish themselves."""
    outcome: dict[str, str] = {}
    groups: dict[str, list[str]] = {}
    for part in parts:
        groups.setdefault(PARTS[part][2], []).append(part)
    for names in groups.values():
        todo = list(names)
        while todo:
            finished = run_worker(todo, parts, work, dry, deadline, outcome)
            left = [p for p in todo if p not in finished and p not in outcome]
            if len(left) == len(todo):  # no progress at all: do not start it again
                outcome.update(dict.fromkeys(left, "crashed"))
            todo = [p for p in left if p not in outcome]
    return outcome


def run_worker(todo: list[str], parts: list[str], work: Path, dry: bool, deadline: float, outcome: dict[str, str]) -> list[str]:
    command = [sys.executable, str(HERE / "gpu_check.py"), "--worker", *todo, "--work", str(work), "--deadline", str(deadline)]
    if dry:
        command.append("--dry-run")
    env = dict(os.environ, PYTHONUNBUFFERED="1", GPU_CHECK_PARTS=",".join(parts))
    if "eval" in todo:
        env["CUBLAS_WORKSPACE_CONFIG"] = ":4096:8"  # trainer.deterministic on CUDA needs it before cuBLAS starts
    process = subprocess.Popen(command, cwd=ROOT, env=env, start_new_session=True)
    current = work / ".current"
    while process.poll() is None:
        time.sleep(0.5)
        try:
            name, started = current.read_text().split()
        except (OSError, ValueError):
            continue
        remaining = parts[parts.index(name) + 1 :]
        limit = budget_of(name, remaining, deadline, float(started), dry) + GRACE_S
        if time.time() - float(started) > limit:
            os.killpg(process.pid, signal.SIGKILL)
            process.wait()
            outcome[name] = "timed out"
            print(f"gpu-check: part {name!r} overran its budget ({limit - GRACE_S:.0f} s); killed, going on", flush=True)
    finished = [p for p in todo if _status(work, p) in ("done", "failed")]
    if process.returncode and process.returncode != -signal.SIGKILL:
        for p in todo:
            if p not in finished and p not in outcome:
                outcome[p] = "crashed"  # the worker died in it (the log above says how)
                break
    current.unlink(missing_ok=True)
    return finished


def _status(work: Path, part: str) -> str | None:
    try:
        return json.loads((work / f"{part}.json").read_text())["status"]
    except (OSError, ValueError, KeyError):
        return None


def collect(parts: list[str], work: Path, outcome: dict[str, str], args: argparse.Namespace, start: float, installed: list[str]) -> dict:
    results: dict = {"mode": "dry-run (CPU, tiny sizes)" if args.dry_run else "GPU", "wall_s": round(time.time() - start, 1),
                     "command": "make gpu-check" if not args.dry_run else "python benchmarks/gpu_check.py --dry-run",
                     "wheels_installed": installed, "parts": {}}
    for part in parts:
        try:
            state = json.loads((work / f"{part}.json").read_text())
        except (OSError, ValueError):
            state = {"status": "not run", "values": {}, "errors": {}, "skipped": {}, "info": {}}
        if part in outcome:
            state["status"] = outcome[part]
        results["parts"][part] = state
    # every top-level module the parts imported (tests/test_gpu_check.py checks that the GPU machine has each one)
    imported = set(_imported())
    for path in work.glob("imports-*.txt"):
        imported.update(path.read_text().split())
    results["imports"] = sorted(imported)
    return results


def _imported() -> list[str]:
    """Top-level modules imported in this process, less the standard library."""
    return sorted({m.split(".")[0] for m in list(sys.modules)} - set(sys.stdlib_module_names) - {"__main__"})


# ---------------------------------------------------------------------------------- worker
def worker(names: list[str], work: Path, dry: bool, deadline: float) -> int:
    """Run the parts ``names`` in this process, in order, each within its budget."""
    sys.path[:0] = [str(ROOT), str(HERE)]
    os.environ["PYTHONPATH"] = os.pathsep.join(filter(None, [str(ROOT), str(HERE), os.environ.get("PYTHONPATH")]))
    import importlib
    import warnings

    from gpu_harness import Budget, Settings
    from gpu_parts import Record

    warnings.filterwarnings("ignore", category=DeprecationWarning)
    settings = Settings.make(dry, work / "data")
    if dry:  # a few tiny steps: one thread (on a busy small CPU, two threads' spin-waits cost 50x more)
        import torch

        torch.set_num_threads(1)
    everything = os.environ.get("GPU_CHECK_PARTS", ",".join(names)).split(",")
    hang = os.environ.get("GPU_CHECK_HANG")  # tests: this part never ends (the parent must kill it)
    for name in names:
        remaining = everything[everything.index(name) + 1 :]  # as the parent reckons it
        now = time.time()
        (work / ".current").write_text(f"{name} {now}")
        budget = Budget(budget_of(name, remaining, deadline, now, dry))
        record = Record(name, work, budget)
        if budget.seconds < 3:
            record.skipped["all"] = "no time left before the check's deadline"
            record.flush("done")
            continue
        module, _, function = PARTS[name][0].partition(":")
        if name == hang:
            time.sleep(10**6)
        try:
            getattr(importlib.import_module(module), function)(settings, budget, record)
        except Exception as err:  # noqa: BLE001 - recorded, the next part runs
            record.errors["part"] = f"{type(err).__name__}: {err}"
        record.flush("failed" if record.errors else "done")
        print(f"gpu-check: {name} {record.status} in {budget.spent():.0f} s", flush=True)
        (work / f"imports-{os.getpid()}.txt").write_text("\n".join(_imported()))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
