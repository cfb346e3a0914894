"""The GPU check's report: the "GPU" section of ``docs/benchmarks.md`` (printed too) and the JSON beside it."""

from __future__ import annotations

import json
from collections.abc import Callable
from pathlib import Path
from typing import Any

from _report import write_section

SECTION = "gpu"
#: the trunk part's configurations, in the order of the table
TRUNK_ROWS = ("fp32", "bf16", "bf16+cl", "bf16+cl+compile")
TASK_ROWS = ("rp", "col", "ex", "ms", "four_tasks_sum", "four_tasks_alternate", "four_tasks_concurrent")


def _f(value: Any, digits: int = 0, scale: float = 1.0, suffix: str = "") -> str:
    if isinstance(value, (int, float)) and value == value:
        return f"{value * scale:,.{digits}f}{suffix}"
    return "–"


def _pct(value: Any) -> str:
    return _f(value, 1, 100.0, " %")


def _why(part: dict[str, Any], key: str) -> str:
    """A cell for a missing value: the error or the reason it was skipped."""
    if key in part.get("errors", {}):
        return "**failed**: " + part["errors"][key].splitlines()[0][:120]
    if key in part.get("info", {}):
        return "fails: " + part["info"][key].splitlines()[0][:120]
    if key in part.get("skipped", {}):
        return "skipped: " + part["skipped"][key]
    return "not run"


def _rows(part: dict[str, Any], keys: tuple[str, ...], cells: Callable[[dict[str, Any]], list[str]], columns: int) -> list[str]:
    """One table row per key: ``cells(value)``, or why there is no value."""
    rows = []
    for key in keys:
        value = part.get("values", {}).get(key)
        row = cells(value) if value is not None else [_why(part, key)] + [""] * (columns - 1)
        rows.append(f"| {key} | " + " | ".join(row) + " |")
    return rows


def render(results: dict[str, Any]) -> str:
    parts = results["parts"]
    env = parts.get("env", {}).get("values", {})
    device = env.get("device", {})
    versions = env.get("versions", {})
    lines = [
        "## GPU: the project measured on a GPU (`make gpu-check`)",
        "",
        f"Command: `{results['command']}` ({results['mode']}), {results['wall_s']:.0f} s in all, on {env.get('date', '?')}, git {env.get('git', '?')}.  ",
        f"Card: {device.get('name', 'none (dry run)')}, {device.get('memory_gib', '–')} GiB, driver {device.get('driver', '–')}; "
        f"datasheet bf16 peak {_f(device.get('peak_bf16_tflops'), 0)} TFLOP/s, measured bf16 matmul {_f(env.get('matmul_bf16_tflops'), 0)} TFLOP/s.  ",
        "Versions: " + ", ".join(f"{k} {v}" for k, v in versions.items()) + ".  ",
        f"Host: {env.get('host', {}).get('cpus', '?')} CPUs; wheels unpacked for this run: {', '.join(results.get('wheels_installed') or []) or 'none needed'}.",
        "",
    ]
    lines += _trunk(parts.get("trunk", {})) + _tasks(parts.get("tasks", {})) + _fit(parts.get("fit", {}))
    lines += _syncs(parts.get("syncs", {})) + _memory(parts.get("memory", {})) + _correctness(parts)
    lines += ["### Parts", "", "| part | status | seconds (budget) | errors / skipped |", "|---|---|---:|---|"]
    for name, part in parts.items():
        notes = [f"{k}: failed" for k in part.get("errors", {})] + [f"{k}: {v}" for k, v in part.get("skipped", {}).items()]
        notes += [f"{k}: fails (optional)" for k in part.get("info", {})]
        lines.append(f"| {name} | {part['status']} | {_f(part.get('spent_s'), 0)} ({_f(part.get('budget_s'), 0)}) | {'; '.join(notes) or '–'} |")
    return "\n".join(lines) + "\n"


def _trunk(part: dict[str, Any]) -> list[str]:
    values = part.get("values", {})
    setup = values.get("setup", {})
    gflops = values.get("gflops_per_image_fwd_bwd")
    lines = [
        "### Trunk alone: forward + backward",
        "",
        f"ResNet-v2 {setup.get('trunk', {})}, batch {setup.get('batch', '?')} at {setup.get('size', '?')}², loss = mean of block 3; "
        f"model FLOPs {_f(gflops, 1 if (gflops or 0) >= 1 else 3)} GFLOP per image (forward + backward, `torch.utils.flop_counter`); MFU = achieved / datasheet bf16 peak. "
        "fp32 keeps PyTorch's defaults (cuDNN may use TF32 for convolutions).",
        "",
        "| configuration | images/s | step ms | TFLOP/s | MFU | peak GiB | first step s |",
        "|---|---:|---:|---:|---:|---:|---:|",
    ]
    def cells(v: dict[str, Any]) -> list[str]:
        return [_f(v.get("images_per_s")), _f(v.get("step_ms"), 1), _f(v.get("achieved_tflops"), 0), _pct(v.get("mfu")), _f(v.get("peak_gib"), 1), _f(v.get("first_step_s"), 1)]

    return lines + _rows(part, TRUNK_ROWS, cells, 6) + [""]


def _tasks(part: dict[str, Any]) -> list[str]:
    values = part.get("values", {})
    lines = [
        "### Task training steps (bf16-mixed, channels-last, no compile; paper task settings)",
        "",
        "Whole step through Lightning on fixed pinned batches: transfer, input building on the device, trunk, head, loss, "
        "backward, optimizer(s). *Ratio* = step time / trunk-only forward+backward on the same trunk inputs (the task "
        "machinery's overhead); *input building* = its share of the step's device time (target < 5 %).",
        "",
        "| run | images/s | step ms | trunk-only ms | **ratio** | input building | peak GiB |",
        "|---|---:|---:|---:|---:|---:|---:|",
    ]
    def cells(v: dict[str, Any]) -> list[str]:
        return [_f(v.get("images_per_s")), _f(v.get("step_ms"), 1), _f(v.get("trunk_only_ms"), 1), f"**{_f(v.get('ratio_to_trunk'), 2)}**", _pct(v.get("build_share")), _f(v.get("peak_gib"), 1)]

    return lines + _rows(part, TASK_ROWS, cells, 6) + [""]


def _fit(part: dict[str, Any]) -> list[str]:
    values = part.get("values", {})
    setup = values.get("setup", {})
    lines = [
        "### Real `fit`: the four-task config on JPEG files, decode on the CPU workers vs on the GPU",
        "",
        f"`{setup.get('config', 'configs/pretrain/all.yaml')}` on the check's JPEGs and frame folders, {setup.get('workers', '?')} "
        f"DataLoader workers, {setup.get('steps', '?')} steps; overrides: {setup.get('overrides', '–')}.",
        "",
        "| run | images/s | data-wait share | input building (decode) | GPU utilisation | syncs/step median (max) | peak GiB |",
        "|---|---:|---:|---:|---:|---:|---:|",
    ]
    def cells(v: dict[str, Any]) -> list[str]:
        syncs, util = v.get("syncs_per_step") or {}, v.get("gpu_utilisation") or {}
        building = _pct(v.get("build_share")) + (f" ({_pct(v.get('decode_share'))})" if "decode_share" in v else "")
        return [_f(v.get("images_per_s")), _pct(v.get("data_wait_share")), building, _f(util.get("mean"), 0, suffix=" %"),
                f"{syncs.get('median', '–')} ({syncs.get('max', '–')})", _f(v.get("peak_gib"), 1)]

    lines += _rows(part, ("decode_cpu", "decode_device"), cells, 6)
    utilisation = {(v.get("gpu_utilisation") or {}).get("source") or (v.get("gpu_utilisation") or {}).get("problem") for v in values.values() if isinstance(v, dict)}
    if utilisation - {None}:
        lines += ["", "GPU utilisation: the share of 0.2 s samples in which a kernel ran, from " + "; ".join(sorted(utilisation - {None})) + "."]
    parity = values.get("decode_parity")
    if parity:
        lines += ["", f"Device decoding vs the workers' (Pillow) on {parity['crops']} crops of 224² ({parity['device']}): "
                  f"max {parity['max']:.0f}, p99 {parity['p99']:.0f}, mean {parity['mean']:.3f} grey levels; {_pct(parity['share_differing'])} of values differ."]
    return lines + [""]


def _syncs(part: dict[str, Any]) -> list[str]:
    values = part.get("values", {})
    lines = ["### Host-device synchronisations per training step (`torch.cuda.set_sync_debug_mode`)", "",
             "Four tasks, no periodic check due (target: none); counted from the end of one step to the end of the next.", "",
             "| run | median | max | where (top) |", "|---|---:|---:|---|"]
    for key in ("alternate_decode_cpu", "sum_decode_cpu", "concurrent_decode_cpu", "alternate_decode_device"):
        v = values.get(key)
        if v is None or not isinstance(v.get("syncs_per_step"), dict):
            lines.append(f"| {key} | {_why(part, key) if v is None else v.get('syncs_per_step', '–')} | | |")
            continue
        counts = v["syncs_per_step"]
        where = "; ".join(f"{k} ×{n}" for k, n in list((v.get("sync_sources") or {}).items())[:3]) or "–"
        lines.append(f"| {key} | {counts['median']} | {counts['max']} | {where} |")
    return lines + [""]


def _memory(part: dict[str, Any]) -> list[str]:
    values = part.get("values", {})
    lines = ["### Memory: the four-task step", "", "| combine | batches (×1) | peak GiB at ×1 | largest ×k that fits | peak GiB by k |", "|---|---|---:|---:|---|"]
    for combine in ("alternate", "sum"):
        k1, largest = values.get(f"{combine}_k1"), values.get(f"{combine}_largest")
        big = f"×{largest['largest_k']}" + ("" if largest.get("exact") else " (at least)") if largest else _why(part, f"{combine}_largest")
        peaks = ", ".join(f"×{k}: {v}" for k, v in (largest or {}).get("peak_gib_by_k", {}).items()) or "–"
        lines.append(f"| {combine} | {values.get(f'{combine}_batch', '–')} | {_f((k1 or {}).get('peak_gib'), 1) if k1 else _why(part, f'{combine}_k1')} | {big} | {peaks} |")
    return lines + [""]


def _correctness(parts: dict[str, Any]) -> list[str]:
    lines = ["### Correctness on CUDA", "", "| check | result |", "|---|---|"]
    for part_name, keys in (("distributed", ("ddp", "task_parallel")), ("eval", ("deterministic_four_tasks", "linear_probe", "detection", "depth", "linear_probe_deterministic", "detection_deterministic", "depth_deterministic"))):
        part = parts.get(part_name, {})
        for key in keys:
            v = part.get("values", {}).get(key)
            lines.append(f"| {key} | {'ok: ' + json.dumps(v, default=str)[:150] if v is not None else _why(part, key)} |")
    return lines + [""]


def publish(results: dict[str, Any], output: Path | None, json_path: Path | None) -> str:
    body = render(results)
    print(body)
    if json_path is not None:
        json_path.parent.mkdir(parents=True, exist_ok=True)
        json_path.write_text(json.dumps(results, indent=1, default=str) + "\n")
        print(f"wrote {json_path}")
    if output is not None:
        write_section(output, SECTION, body)
        print(f"wrote {output}")
    return body
