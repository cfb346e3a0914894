"""Screening a folder once: a fast listing, every file probed in parallel under a progress bar, and
the result cached beside the run, keyed by the listing.

At ImageNet scale (1.28 M files) screening costs minutes; a job of 8–64 ranks that screened on
every rank, and again on every resume, paid that many times. Here one process screens
(:class:`~mtssl_lightning.data.datamodule.MultiTaskDataModule` does it in ``prepare_data``), writes
the result to a cache file, and every other rank reads that file. The cache is keyed by the
folder's *listing* — every file's relative name, size and modification time — so an unchanged
folder starts at once and a changed one is screened again, only the files that are new or
changed (per-file entries are kept by ``(name, size, mtime)``).

The cache file is a NumPy ``.npz`` archive read with ``allow_pickle=False`` (opening it cannot run
code): the names as one ``\\0``-separated UTF-8 blob, sizes and modification times as int64
arrays, and the results (reasons for unusable files, per-file probe data) as JSON text.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import stat
import time
from collections.abc import Callable, Sequence
from concurrent.futures import ProcessPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

log = logging.getLogger(__name__)

#: bump when what a probe checks or the file layout changes: older caches are then screened again
CACHE_VERSION = 1

#: ``probe(path) -> (reason the file is unusable or None, JSON-able per-file data or None)``;
#: a module-level function (or a ``functools.partial`` of one), so that worker processes can run it
Probe = Callable[[str], tuple[str | None, Any]]

#: files per task handed to a screening process (large enough to amortise the hand-over)
CHUNK = 256


@dataclass(frozen=True)
class Listing:
    """The files of a folder that screening looks at: relative names (sorted), sizes and mtimes (ns)."""

    names: list[str]
    sizes: np.ndarray
    mtimes: np.ndarray

    def __len__(self) -> int:
        return len(self.names)

    def key(self) -> str:
        """A hash of the listing (names, sizes, modification times): any added, removed, resized or
        rewritten file changes it."""
        digest = hashlib.sha256(_pack_names(self.names))
        digest.update(np.ascontiguousarray(self.sizes, dtype=np.int64).tobytes())
        digest.update(np.ascontiguousarray(self.mtimes, dtype=np.int64).tobytes())
        return digest.hexdigest()


def list_files(root: str | os.PathLike, extensions: tuple[str, ...], kind: str) -> Listing:
    """Every file under ``root`` (recursively, following links to folders) whose suffix is one of
    ``extensions`` (case-insensitive), with its size and modification time.

    ``os.scandir`` with relative names built as strings: about 4× faster than ``os.walk`` plus
    ``Path`` arithmetic per file (``docs/benchmarks.md``), and one ``stat`` per file that the
    cache key needs anyway. A folder reached twice through links is listed once.

    Raises:
        FileNotFoundError: no such file under ``root`` (the message names the folder).
    """
    root = str(Path(root).expanduser())
    exts = tuple(e.lower() for e in extensions)
    names: list[str] = []
    sizes: list[int] = []
    mtimes: list[int] = []
    seen: set[tuple[int, int]] = set()
    stack = [("", root)]
    while stack:
        prefix, folder = stack.pop()
        try:
            info = os.stat(folder)
        except OSError:
            continue
        if (info.st_dev, info.st_ino) in seen:  # a link loop, or a folder linked twice
            continue
        seen.add((info.st_dev, info.st_ino))
        try:
            entries = os.scandir(folder)
        except OSError as err:
            log.warning("cannot list %s (%s); its files are left out", folder, err)
            continue
        with entries:
            for entry in entries:
                try:
                    if entry.is_dir():  # follows links, like os.walk(followlinks=True)
                        stack.append((prefix + entry.name + "/", entry.path))
                    elif entry.name.lower().endswith(exts):
                        st = entry.stat()
                        if stat.S_ISREG(st.st_mode):
                            names.append(prefix + entry.name)
                            sizes.append(st.st_size)
                            mtimes.append(st.st_mtime_ns)
                except OSError:  # a dangling link or a file removed while listing: not a file
                    continue
    if not names:
        raise FileNotFoundError(f"no {kind} files ({', '.join(exts)}) found under {root!r}")
    order = sorted(range(len(names)), key=names.__getitem__)
    return Listing(
        [names[i] for i in order],
        np.asarray(sizes, dtype=np.int64)[order],
        np.asarray(mtimes, dtype=np.int64)[order],
    )


@dataclass
class Screening:
    """What screening found in one folder.

    Attributes:
        root: the folder.
        names: every listed file (relative, sorted).
        reasons: ``{index: why the file is unusable}``.
        info: per-file probe data (e.g. a video's frame count and timestamps), or ``None`` when
            the probe records none.
        key: the listing's :meth:`Listing.key`.
        probed: files probed this time (the others came from the cache).
        seconds: time spent listing and probing.
    """

    root: Path
    names: list[str]
    reasons: dict[int, str]
    info: list[Any] | None
    key: str
    probed: int = 0
    seconds: float = 0.0
    sizes: np.ndarray | None = field(default=None, repr=False)
    mtimes: np.ndarray | None = field(default=None, repr=False)

    def usable(self) -> list[int]:
        """Indices of the files without a reason."""
        return [i for i in range(len(self.names)) if i not in self.reasons]


def cache_path(cache_dir: str | os.PathLike, root: str | os.PathLike, kind: str, mode: str) -> Path:
    """Where the screening of ``root`` (``kind`` ``images``/``videos``, checked as ``mode``) is cached:
    one file per folder and mode, so that the train and validation folders, and ``header`` and
    ``decode`` screens, keep their own."""
    where = str(Path(root).expanduser().resolve())
    tag = hashlib.sha256(f"{where}\0{kind}\0{mode}".encode()).hexdigest()[:16]
    return Path(cache_dir).expanduser() / f"screen-{kind}-{mode}-{tag}.npz"


def _pack_names(names: Sequence[str]) -> bytes:
    return "\0".join(names).encode("utf-8", "surrogateescape")


def _unpack_names(blob: bytes) -> list[str]:
    return blob.decode("utf-8", "surrogateescape").split("\0") if blob else []


def write_cache(path: Path, screening: Screening, kind: str, mode: str) -> None:
    """Write ``screening`` to ``path`` atomically (a temporary file renamed into place), so that a
    reader never sees half a file and concurrent writers of the same result cannot corrupt it."""
    path.parent.mkdir(parents=True, exist_ok=True)
    meta = {
        "version": CACHE_VERSION,
        "root": str(screening.root),
        "kind": kind,
        "mode": mode,
        "key": screening.key,
        "reasons": {str(i): r for i, r in screening.reasons.items()},
        "info": screening.info,
    }
    tmp = path.with_name(f".{path.name}.{os.uname().nodename}.{os.getpid()}.tmp")
    with open(tmp, "wb") as f:
        np.savez(
            f,
            names=np.frombuffer(_pack_names(screening.names), dtype=np.uint8),
            sizes=np.asarray(screening.sizes, dtype=np.int64),
            mtimes=np.asarray(screening.mtimes, dtype=np.int64),
            meta=np.frombuffer(json.dumps(meta).encode(), dtype=np.uint8),
        )
    os.replace(tmp, path)


def read_cache(path: Path, kind: str, mode: str) -> Screening | None:
    """The screening cached at ``path``, or ``None`` when there is none, it is of another version,
    kind or mode, or it cannot be read (a damaged cache is screened again, never trusted)."""
    if not path.is_file():
        return None
    try:
        with np.load(path, allow_pickle=False) as data:
            meta = json.loads(data["meta"].tobytes().decode())
            if meta.get("version") != CACHE_VERSION or meta.get("kind") != kind or meta.get("mode") != mode:
                return None
            names = _unpack_names(data["names"].tobytes())
            sizes, mtimes = data["sizes"], data["mtimes"]
        if not len(names) == len(sizes) == len(mtimes):
            raise ValueError("arrays of different lengths")
        reasons = {int(i): r for i, r in meta["reasons"].items()}
        return Screening(Path(meta["root"]), names, reasons, meta["info"], meta["key"], sizes=sizes, mtimes=mtimes)
    except Exception as err:  # noqa: BLE001 - any damage means "screen again"
        log.warning("ignoring the unreadable screening cache %s (%s: %s); screening again", path, type(err).__name__, err)
        return None


def _probe_chunk(probe: Probe, paths: list[str]) -> list[tuple[str | None, Any]]:
    return [probe(p) for p in paths]


def probe_all(
    probe: Probe, paths: list[str], workers: int, progress: bool, description: str
) -> list[tuple[str | None, Any]]:
    """``probe(path)`` for every path, in ``workers`` processes (in this one for ``workers <= 1``
    or few paths), with a ``tqdm`` progress bar (files/s, ETA) when ``progress``.

    Processes, not threads: a header probe is mostly Python (Pillow's parsers), which threads
    would run one at a time under the GIL (16 threads were 2.7× *slower* than one on 2 cores).
    """
    from tqdm.auto import tqdm

    results: list[tuple[str | None, Any]] = []
    chunks = [paths[k : k + CHUNK] for k in range(0, len(paths), CHUNK)]
    with tqdm(total=len(paths), desc=description, unit=" files", disable=not progress or not paths, mininterval=1.0, dynamic_ncols=True) as bar:
        if workers <= 1 or len(chunks) <= 1:
            for chunk in chunks:
                results.extend(_probe_chunk(probe, chunk))
                bar.update(len(chunk))
            return results
        with ProcessPoolExecutor(max_workers=min(workers, len(chunks))) as pool:
            for chunk, done in zip(chunks, pool.map(_probe_chunk, [probe] * len(chunks), chunks)):
                results.extend(done)
                bar.update(len(chunk))
    return results


def listed(root: Path, names: list[str] | None, extensions: tuple[str, ...], kind: str) -> tuple[list[str], Listing | None]:
    """``(names, None)`` when ``names`` are given (a split), else the folder's names and its
    listing (kept: screening's cache is keyed by it, so the folder is listed only once)."""
    if names is not None:
        return names, None
    listing = list_files(root, extensions, kind)
    return listing.names, listing


def default_workers() -> int:
    """Processes that screen: the CPU cores this process may use."""
    try:
        return len(os.sched_getaffinity(0))
    except AttributeError:  # not on Linux
        return os.cpu_count() or 1


def screen_folder(
    root: str | os.PathLike,
    extensions: tuple[str, ...],
    kind: str,
    mode: str,
    probe: Probe,
    cache_dir: str | os.PathLike | None = None,
    workers: int | None = None,
    progress: bool = True,
    listing: Listing | None = None,
) -> Screening:
    """List ``root`` and probe every file that the cache does not already cover.

    Args:
        root: the folder.
        extensions: file suffixes to list (case-insensitive).
        kind: ``"images"`` or ``"videos"`` (messages and the cache's name).
        mode: what the probe checks (``header``/``decode`` …; part of the cache's identity).
        probe: the per-file check (see :data:`Probe`); empty files are reported without it.
        cache_dir: where the cache lives (read, then rewritten when anything changed); ``None``
            = no cache.
        workers: screening processes; ``None`` = :func:`default_workers`.
        progress: show a progress bar while probing.
        listing: the folder's listing when the caller already has it.

    Returns:
        :class:`Screening` of every listed file.
    """
    start = time.perf_counter()
    root = Path(root).expanduser()
    listing = listing if listing is not None else list_files(root, extensions, kind)
    key = listing.key()
    path = cache_path(cache_dir, root, kind, mode) if cache_dir is not None else None
    cached = read_cache(path, kind, mode) if path is not None else None
    if cached is not None and cached.key == key:
        cached.root, cached.seconds = root, time.perf_counter() - start
        return cached
    # reuse what the cache knows about files with the same name, size and mtime; probe the rest
    known: dict[str, int] = {}
    if cached is not None:
        known = {name: i for i, name in enumerate(cached.names)}
    results: list[tuple[str | None, Any] | None] = [None] * len(listing)
    todo: list[int] = []
    reused = 0
    for i, name in enumerate(listing.names):
        j = known.get(name)
        if j is not None and cached.sizes[j] == listing.sizes[i] and cached.mtimes[j] == listing.mtimes[i]:
            results[i] = (cached.reasons.get(j), cached.info[j] if cached.info is not None else None)
            reused += 1
        elif listing.sizes[i] == 0:
            results[i] = ("empty file (0 bytes)", None)
        else:
            todo.append(i)
    where = str(root)
    description = f"screening {len(todo)} {kind} under {where}" + (f" ({reused} cached)" if reused else "")
    probed = probe_all(probe, [os.path.join(where, listing.names[i]) for i in todo], workers or default_workers(), progress, description)
    for i, result in zip(todo, probed):
        results[i] = result
    reasons = {i: r[0] for i, r in enumerate(results) if r[0] is not None}
    infos = [r[1] for r in results]
    screening = Screening(
        root, listing.names, reasons, infos if any(x is not None for x in infos) else None, key, probed=len(todo),
        sizes=listing.sizes, mtimes=listing.mtimes,
    )
    if path is not None:
        try:
            write_cache(path, screening, kind, mode)
        except OSError as err:  # a read-only cache folder costs the next start, not this run
            log.warning("could not write the screening cache %s (%s); the next start screens again", path, err)
    screening.seconds = time.perf_counter() - start
    if todo:
        log.info(
            "screened %d %s under %s in %.1f s (%.0f files/s)%s", len(todo), kind, where, screening.seconds,
            len(todo) / max(screening.seconds, 1e-9), f"; {reused} from the cache" if reused else "",
        )
    return screening


def load_screening(cache_dir: str | os.PathLike, root: str | os.PathLike, kind: str, mode: str, key: str) -> Screening | None:
    """The cached screening of ``root`` when its listing key is ``key`` (what the screening rank
    announced), else ``None`` (no cache visible here, or another listing)."""
    cached = read_cache(cache_path(cache_dir, root, kind, mode), kind, mode)
    if cached is None or cached.key != key:
        return None
    cached.root = Path(root).expanduser()
    return cached
