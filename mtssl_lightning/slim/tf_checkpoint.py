"""TensorFlow's checkpoint format (V2 "tensor bundle"), read with the standard library and numpy.

Why not TensorFlow itself: converting the paper's released checkpoint is a one-off read of
float32 arrays, and TensorFlow is a ~2 GB install whose pins fight this project's (numpy,
protobuf); the format is small and stable (unchanged since TF 0.12, 2016). The parity test
reads checkpoints that TensorFlow itself wrote, so this reader is checked against the real
writer in CI.

The format, as TensorFlow writes it (``tensorflow/core/util/tensor_bundle``):

* ``PREFIX.index`` is an SSTable (LevelDB's table format, read by :mod:`.sstable`).
* key ``""`` holds a ``BundleHeaderProto`` (number of shards, endianness); every other key is
  a tensor name holding a ``BundleEntryProto`` (dtype, shape, shard id, offset, size, crc32c,
  slices of a partitioned variable).
* ``PREFIX.data-SSSSS-of-NNNNN`` holds the tensors' raw bytes in the header's byte order, at
  ``offset`` for ``size`` bytes.

Index blocks are CRC-checked; tensor data is not (a pure-Python CRC-32C of ~170 MB would take
minutes): data sizes are checked against dtype × shape instead.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from mtssl_lightning.slim.sstable import CheckpointFormatError, read_table, varint

__all__ = ["CheckpointFormatError", "TFCheckpoint", "TensorEntry", "resolve_prefix"]


#: TensorFlow ``DataType`` enum -> numpy dtype (little-endian); bfloat16 is widened on read
NUMPY_DTYPES: dict[int, str] = {
    1: "float32", 2: "float64", 3: "int32", 4: "uint8", 5: "int16", 6: "int8", 8: "complex64",
    9: "int64", 10: "bool", 11: "int8", 12: "uint8", 13: "int32", 14: "bfloat16", 15: "int16",
    16: "uint16", 17: "uint16", 18: "complex128", 19: "float16", 22: "uint32", 23: "uint64",
}
#: TensorFlow's names of the enum values, for reports
TF_DTYPE_NAMES: dict[int, str] = {
    1: "float32", 2: "float64", 3: "int32", 4: "uint8", 5: "int16", 6: "int8", 7: "string", 8: "complex64",
    9: "int64", 10: "bool", 11: "qint8", 12: "quint8", 13: "qint32", 14: "bfloat16", 15: "qint16",
    16: "quint16", 17: "uint16", 18: "complex128", 19: "float16", 20: "resource", 21: "variant",
    22: "uint32", 23: "uint64",
}

_DATA_FILE = re.compile(r"\.data-\d{5}-of-\d{5}$")


@dataclass(frozen=True)
class TensorEntry:
    """Where and what one saved tensor is (a ``BundleEntryProto``).

    ``dtype_enum`` is TensorFlow's ``DataType`` number, ``dtype`` its name (``float32``,
    ``int64``, ``string``, …); ``why_not`` says why :meth:`TFCheckpoint.read` cannot return the
    tensor as a numpy array (``None`` when it can).
    """

    name: str
    dtype_enum: int
    shape: tuple[int, ...]
    shard: int
    offset: int
    size: int
    num_slices: int = 0

    @property
    def dtype(self) -> str:
        return TF_DTYPE_NAMES.get(self.dtype_enum, f"DataType {self.dtype_enum}")

    @property
    def why_not(self) -> str | None:
        if self.num_slices:
            return f"a partitioned variable saved in {self.num_slices} slices"
        if self.dtype_enum not in NUMPY_DTYPES:
            return f"dtype {self.dtype} has no plain array form"
        if any(d < 0 for d in self.shape):
            return "unknown shape"
        return None


# ------------------------------------------------------------------------------ protobuf
def _proto_fields(buf: bytes) -> list[tuple[int, int | bytes]]:
    """The ``(field number, value)`` pairs of a protobuf message (varints as int, others as bytes)."""
    fields: list[tuple[int, int | bytes]] = []
    pos = 0
    while pos < len(buf):
        tag, pos = varint(buf, pos)
        number, wire = tag >> 3, tag & 7
        value: int | bytes
        if wire == 0:
            value, pos = varint(buf, pos)
        elif wire == 1:
            value, pos = buf[pos : pos + 8], pos + 8
        elif wire == 2:
            length, pos = varint(buf, pos)
            value, pos = buf[pos : pos + length], pos + length
        elif wire == 5:
            value, pos = buf[pos : pos + 4], pos + 4
        else:
            raise CheckpointFormatError(f"unsupported protobuf wire type {wire}")
        if pos > len(buf):
            raise CheckpointFormatError("truncated protobuf message")
        fields.append((number, value))
    return fields


def _signed64(value: int) -> int:
    """Protobuf int64 fields hold negative numbers as 64-bit two's complement varints."""
    return value - (1 << 64) if value >= 1 << 63 else value


def _parse_shape(buf: bytes) -> tuple[int, ...]:
    dims = []
    for number, value in _proto_fields(buf):
        if number == 2:  # repeated Dim { int64 size = 1; string name = 2; }
            size = next((v for n, v in _proto_fields(value) if n == 1), 0)  # type: ignore[arg-type]
            dims.append(_signed64(size))  # type: ignore[arg-type]
        elif number == 3 and value:  # unknown_rank
            return (-1,)
    return tuple(dims)


def _parse_entry(name: str, buf: bytes) -> TensorEntry:
    dtype, shape, shard, offset, size, slices = 0, (), 0, 0, 0, 0
    for number, value in _proto_fields(buf):
        if number == 1:
            dtype = value
        elif number == 2:
            shape = _parse_shape(value)  # type: ignore[arg-type]
        elif number == 3:
            shard = value
        elif number == 4:
            offset = value
        elif number == 5:
            size = value
        elif number == 7:
            slices += 1
    return TensorEntry(name, dtype, shape, shard, offset, size, slices)  # type: ignore[arg-type]


def resolve_prefix(path: str | Path) -> Path:
    """The checkpoint prefix that ``path`` means.

    Accepted: the prefix itself (``model.ckpt-1000``), its ``.index`` or one of its
    ``.data-*-of-*`` files, or a folder holding a TF ``checkpoint`` state file or exactly one
    ``*.index``.

    Raises:
        FileNotFoundError: nothing there, or the folder holds no (or several) checkpoints; the
            message says what was looked for.
    """
    path = Path(path).expanduser()
    text = str(path)
    if text.endswith(".index"):
        path = Path(text[: -len(".index")])
    elif _DATA_FILE.search(text):
        path = Path(_DATA_FILE.sub("", text))
    if path.is_dir():
        state = path / "checkpoint"
        if state.is_file():  # TF's text proto: model_checkpoint_path: "model.ckpt-1000"
            match = re.search(r'^model_checkpoint_path:\s*"(.*)"', state.read_text(errors="replace"), re.MULTILINE)
            if match:
                return resolve_prefix(path / match.group(1))
        indexes = sorted(path.glob("*.index"))
        if len(indexes) != 1:
            found = ", ".join(p.name for p in indexes) or "none"
            raise FileNotFoundError(
                f"{text!r} is a folder; give the checkpoint prefix inside it (the path without '.index'); "
                f"*.index files there: {found}"
            )
        return Path(str(indexes[0])[: -len(".index")])
    if not Path(f"{path}.index").is_file():
        hint = (
            " That file is no V2 checkpoint prefix: a single-file (V1, TF < 0.12) checkpoint must be re-saved "
            "with tf.compat.v1.train.Saver() first."
            if path.is_file()
            else ""
        )
        raise FileNotFoundError(
            f"no TensorFlow checkpoint at {text!r}: expected {text}.index and {text}.data-00000-of-0000N; "
            f"give the prefix (e.g. model.ckpt, not model.ckpt.index).{hint}"
        )
    return path


class TFCheckpoint:
    """A TensorFlow V2 checkpoint, read without TensorFlow.

    Args:
        path: the checkpoint prefix (or its ``.index``/``.data-*`` file, or its folder; see
            :func:`resolve_prefix`).

    ``entries`` maps every saved name to its :class:`TensorEntry` (in key order);
    :meth:`read` returns one tensor as a numpy array.

    Raises:
        FileNotFoundError: no checkpoint there, or a data shard is missing.
        CheckpointFormatError: the index is not a TF checkpoint index or is corrupt.
    """

    def __init__(self, path: str | Path) -> None:
        self.prefix = resolve_prefix(path)
        index = Path(f"{self.prefix}.index")
        table = read_table(index)
        if not table or table[0][0] != b"":
            raise CheckpointFormatError(f"{index} has no bundle header: not a TensorFlow V2 checkpoint index")
        header = dict(_proto_fields(table[0][1]))
        self.num_shards = int(header.get(1, 1))  # type: ignore[arg-type]
        self.byte_order = ">" if header.get(2) == 1 else "<"  # Endianness { LITTLE = 0; BIG = 1 }
        self.entries: dict[str, TensorEntry] = {}
        for key, value in table[1:]:
            if key.startswith(b"\x00"):  # slices of partitioned variables: keys in TF's OrderedCode
                continue
            name = key.decode("utf-8", errors="replace")
            self.entries[name] = _parse_entry(name, value)
        for shard in range(self.num_shards):
            if not self._data_file(shard).is_file():
                raise FileNotFoundError(
                    f"checkpoint {str(self.prefix)!r} lacks its data shard {self._data_file(shard).name} "
                    f"({self.num_shards} shard(s) are listed in the index); copy all .data-* files beside the .index"
                )

    def _data_file(self, shard: int) -> Path:
        return Path(f"{self.prefix}.data-{shard:05d}-of-{self.num_shards:05d}")

    def __contains__(self, name: object) -> bool:
        return name in self.entries

    def __len__(self) -> int:
        return len(self.entries)

    def read(self, name: str) -> np.ndarray:
        """The tensor ``name`` as a numpy array of its shape (bfloat16 widened to float32).

        Raises:
            KeyError: no such tensor (the message names the checkpoint).
            CheckpointFormatError: it has no array form (string, resource, partitioned) or its
                stored size does not fit its dtype and shape.
        """
        entry = self.entries.get(name)
        if entry is None:
            raise KeyError(f"{name!r} is not in checkpoint {str(self.prefix)!r}")
        if entry.why_not is not None:
            raise CheckpointFormatError(f"{name!r} in {str(self.prefix)!r} cannot be read as an array: {entry.why_not}")
        stored = NUMPY_DTYPES[entry.dtype_enum]
        dtype = np.dtype("uint16" if stored == "bfloat16" else stored).newbyteorder(self.byte_order)
        count = int(np.prod(entry.shape, dtype=np.int64))
        if entry.size != count * dtype.itemsize:
            raise CheckpointFormatError(
                f"{name!r} in {str(self.prefix)!r}: {entry.size} bytes stored, but {entry.dtype} {list(entry.shape)} "
                f"needs {count * dtype.itemsize}"
            )
        with open(self._data_file(entry.shard), "rb") as f:
            f.seek(entry.offset)
            raw = f.read(entry.size)
        if len(raw) != entry.size:
            raise CheckpointFormatError(f"{name!r}: data shard {self._data_file(entry.shard).name} is truncated")
        array = np.frombuffer(raw, dtype=dtype).astype(dtype.newbyteorder("="))
        if stored == "bfloat16":  # bfloat16 is the top half of a float32
            array = (array.astype(np.uint32) << 16).view(np.float32)
        return array.reshape(entry.shape)
