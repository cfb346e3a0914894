"""Read what a W&B run logged, straight from its offline run folder (no account, no network).

A run folder (``<save_dir>/wandb/offline-run-<time>-<id>/``) holds ``run-<id>.wandb``: W&B's
record log — a 7-byte header (``:W&B``, magic ``0xBEE1``, version 0) followed by LevelDB-log
blocks of 32 KiB whose chunks (CRC32, length, type FULL/FIRST/MIDDLE/LAST) carry serialized
``wandb.proto.wandb_internal_pb2.Record`` messages. :func:`read_history` returns the logged
rows, so tests and notebooks can check what a dashboard will show before anything is synced.
"""

from __future__ import annotations

import json
import os
import struct
import time
from collections.abc import Iterable, Iterator
from pathlib import Path
from typing import Any

_HEADER = b":W&B" + struct.pack("<HB", 0xBEE1, 0)
_BLOCK = 32768
_CHUNK_HEADER = 7  # crc32 (4), length (2), type (1)
_FULL, _FIRST, _MIDDLE, _LAST = 1, 2, 3, 4


def _records(path: Path) -> list[bytes]:
    data = path.read_bytes()
    if not data.startswith(_HEADER):
        raise ValueError(f"{str(path)!r} is not a W&B run file (no ':W&B' header)")
    records, pending, offset = [], b"", len(_HEADER)
    while offset + _CHUNK_HEADER <= len(data):
        room = _BLOCK - offset % _BLOCK
        if room < _CHUNK_HEADER:  # block trailer: zero padding
            offset += room
            continue
        length, kind = struct.unpack_from("<HB", data, offset + 4)
        if offset + _CHUNK_HEADER + length > len(data):  # a chunk still being written: not a record yet
            break
        body = data[offset + _CHUNK_HEADER : offset + _CHUNK_HEADER + length]
        offset += _CHUNK_HEADER + length
        if kind == _FULL:
            records.append(body)
        elif kind == _FIRST:
            pending = body
        elif kind == _MIDDLE:
            pending += body
        elif kind == _LAST:
            records.append(pending + body)
            pending = b""
        else:  # 0: preallocated, unwritten space at the end of the file
            break
    return records


def run_file(run_dir: str | os.PathLike) -> Path:
    """The ``run-<id>.wandb`` file of an (offline) run folder."""
    found = sorted(Path(run_dir).glob("run-*.wandb"))
    if not found:
        raise FileNotFoundError(f"no run-*.wandb file in {str(run_dir)!r}; is it a W&B run folder (wandb/offline-run-…)?")
    return found[0]


def _parsed_records(run_dir: str | os.PathLike) -> Iterator[Any]:
    """The run file's records as ``wandb_internal_pb2.Record`` messages, in order."""
    from wandb.proto import wandb_internal_pb2 as pb

    for raw in _records(run_file(run_dir)):
        record = pb.Record()
        record.ParseFromString(raw)
        yield record


def wait_until_finished(run_dir: str | os.PathLike, timeout_s: float = 120.0) -> Path:
    """Wait until the run file in ``run_dir`` holds the run's ``exit`` record (its last), then return ``run_dir``.

    ``wandb-core`` writes the run file through a buffer that it flushes when it closes the file,
    which can be after ``wandb.finish()`` has returned (W&B 0.31, offline; seen in CI as a run file
    without any of the rows the run had logged 10 s before). Read a run that has just ended as
    ``read_history(wait_until_finished(run_dir))`` (or ``read_config``, ``render_dashboard``).

    Raises:
        TimeoutError: no exit record after ``timeout_s`` seconds (the run is still going, or its
            process was killed before W&B could finish it).
    """
    if not Path(run_dir).is_dir():
        raise FileNotFoundError(f"{str(run_dir)!r} is not a folder; pass a W&B run folder (wandb/offline-run-…)")
    deadline, size, last_error = time.monotonic() + timeout_s, -1, None
    while True:
        try:
            grown = run_file(run_dir).stat().st_size
            if grown != size:  # parse again only when the file has grown
                size = grown
                if any(record.WhichOneof("record_type") == "exit" for record in _parsed_records(run_dir)):
                    return Path(run_dir)
        except (FileNotFoundError, ValueError) as error:  # no run file yet, or not even its header
            last_error, size = error, -1
        if time.monotonic() >= deadline:
            raise TimeoutError(
                f"the W&B run in {str(run_dir)!r} has no exit record after {timeout_s:g} s: it is still "
                "running, or its process ended without `wandb.finish()` (killed, or `os._exit`)"
            ) from last_error
        time.sleep(0.1)


def _put_items(target: dict[str, Any], items: Iterable[Any]) -> dict[str, Any]:
    """Store W&B's ``(key | nested_key, value_json)`` items in ``target``; a logged dict (e.g. a
    picture: ``{"_type": "images/separated", "filenames": …}``) arrives flattened into nested
    keys and is rebuilt."""
    for item in items:
        value = json.loads(item.value_json)
        path = [item.key] if item.key else list(item.nested_key)
        node = target
        for part in path[:-1]:
            node = node.setdefault(part, {})
        node[path[-1]] = value
    return target


def read_history(run_dir: str | os.PathLike) -> list[dict[str, Any]]:
    """Every ``wandb.log`` row of the run in ``run_dir``, as ``{key: value}`` (JSON-decoded values;
    pictures appear as dicts: ``{"_type": "images/separated", "filenames": [...], "width": …}``
    for a logged list of images, ``{"_type": "image-file", "path": …}`` for one image)."""
    return [_put_items({}, r.history.item) for r in _parsed_records(run_dir) if r.WhichOneof("record_type") == "history"]


def read_config(run_dir: str | os.PathLike) -> dict[str, Any]:
    """The run's config as last updated (``wandb.config``), ``{key: value}``."""
    config: dict[str, Any] = {}
    for record in _parsed_records(run_dir):
        kind = record.WhichOneof("record_type")
        if kind in ("config", "run"):
            _put_items(config, (record.config if kind == "config" else record.run.config).update)
    return config


def image_path(value: Any) -> str | None:
    """The file (relative to the run's ``files/``) of a logged picture value, or ``None`` for anything else."""
    if not isinstance(value, dict):
        return None
    if value.get("_type") == "image-file":
        return value.get("path")
    if value.get("_type") == "images/separated" and value.get("filenames"):
        return value["filenames"][0]
    return None


def render_dashboard(run_dir: str | os.PathLike, output: str | os.PathLike, max_media: int = 5) -> Path:
    """Draw what the run's W&B dashboard shows into one PNG, from the offline run folder alone.

    Panels: per-task training losses, learning rates, throughput and data-wait share, per-task
    trunk gradient norms, then the newest pictures the run logged (task media and the lasso
    heatmap). Used for the README's dashboard picture; handy to glance at an unsynced run.
    """
    import matplotlib

    matplotlib.use("Agg", force=False)
    import matplotlib.image as mpimg
    import matplotlib.pyplot as plt

    rows = read_history(run_dir)

    def series(prefix: str, suffix: str = "") -> dict[str, tuple[list[float], list[float]]]:
        out: dict[str, tuple[list[float], list[float]]] = {}
        for row in rows:
            step = row.get("trainer/global_step", row.get("_step", 0))
            for key, value in row.items():
                if key.startswith(prefix) and key.endswith(suffix) and isinstance(value, (int, float)):
                    xs, ys = out.setdefault(key, ([], []))
                    xs.append(step)
                    ys.append(value)
        return out

    curves = [
        ("training loss per task", series("train/", "/loss_step")),
        ("learning rate per optimizer", series("lr/")),
        ("throughput and data wait", series("perf/")),
        ("trunk gradient norm per task", series("grad_norm/")),
    ]
    media: dict[str, str] = {}
    for row in rows:
        for key, value in row.items():
            path = image_path(value)
            if path is not None:
                media[key] = path  # the newest one wins
    shown = sorted(media)[:max_media]
    columns = max(len(curves), len(shown), 1)
    fig, axes = plt.subplots(2, columns, figsize=(4.2 * columns, 7.5), dpi=100, squeeze=False)
    for ax, (title, data) in zip(axes[0], curves):
        for key, (xs, ys) in sorted(data.items()):
            ax.plot(xs, ys, label=key.split("/", 1)[1].removesuffix("/loss_step"), linewidth=1.2)
        ax.set_title(title, fontsize=10)
        ax.set_xlabel("step", fontsize=8)
        if data:
            ax.legend(fontsize=7)
        ax.grid(alpha=0.3)
    for ax, key in zip(axes[1], shown):
        ax.imshow(mpimg.imread(Path(run_dir) / "files" / media[key]))
        ax.set_title(key, fontsize=9)
        ax.axis("off")
    for ax in list(axes[0][len(curves):]) + list(axes[1][len(shown):]):
        ax.axis("off")
    fig.suptitle(f"W&B run {Path(run_dir).name}: what its dashboard shows", fontsize=11)
    fig.tight_layout()
    output = Path(output)
    output.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(output)
    plt.close(fig)
    return output
