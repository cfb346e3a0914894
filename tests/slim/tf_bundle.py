"""A small writer of TensorFlow's V2 checkpoint format, for tests that need no TensorFlow.

It writes what the reader must handle but TensorFlow's own writer rarely produces: index
blocks split small (many data blocks, restart points every few keys), snappy-compressed
blocks, several data shards, big-endian data, odd dtypes. Checkpoints written by TensorFlow
itself are checked in ``test_slim_parity.py``.
"""

from __future__ import annotations

import struct
from pathlib import Path

import numpy as np

from mtssl_lightning.slim.sstable import TABLE_MAGIC, masked_crc32c

#: numpy dtype name -> TensorFlow DataType enum
TF_DTYPES = {"float32": 1, "float64": 2, "int32": 3, "uint8": 4, "int64": 9, "bool": 10, "float16": 19}
BFLOAT16 = 14
STRING = 7


def varint(n: int) -> bytes:
    n &= (1 << 64) - 1  # negative int64 as two's complement, as protobuf does
    out = bytearray()
    while n >= 0x80:
        out.append((n & 0x7F) | 0x80)
        n >>= 7
    out.append(n)
    return bytes(out)


def field_varint(number: int, value: int) -> bytes:
    return varint(number << 3) + varint(value)


def field_bytes(number: int, value: bytes) -> bytes:
    return varint(number << 3 | 2) + varint(len(value)) + value


def entry_proto(dtype: int, shape: tuple[int, ...], shard: int, offset: int, size: int, slices: int = 0) -> bytes:
    dims = b"".join(field_bytes(2, field_varint(1, d)) for d in shape)
    out = field_varint(1, dtype) + field_bytes(2, dims) + field_varint(3, shard) + field_varint(4, offset) + field_varint(5, size)
    out += struct.pack("<B", 6 << 3 | 5) + b"\0\0\0\0"  # crc32c (fixed32), not checked by the reader
    return out + b"".join(field_bytes(7, b"") for _ in range(slices))


def snappy_literal(data: bytes) -> bytes:
    """Valid snappy of ``data``: one literal run (the reader's copy paths are tested on their own)."""
    n = len(data) - 1
    header = bytes([n << 2]) if n < 60 else bytes([61 << 2]) + n.to_bytes(2, "little")
    return varint(len(data)) + header + data


def block(entries: list[tuple[bytes, bytes]], restart_interval: int) -> bytes:
    out, restarts, previous = bytearray(), [], b""
    for i, (key, value) in enumerate(entries):
        shared = 0
        if i % restart_interval == 0:
            restarts.append(len(out))
        else:
            while shared < min(len(key), len(previous)) and key[shared] == previous[shared]:
                shared += 1
        out += varint(shared) + varint(len(key) - shared) + varint(len(value)) + key[shared:] + value
        previous = key
    restarts = restarts or [0]
    return bytes(out) + struct.pack(f"<{len(restarts)}I", *restarts) + struct.pack("<I", len(restarts))


def write_table(path: Path, entries: list[tuple[bytes, bytes]], per_block: int, restart_interval: int, snappy: bool) -> None:
    """An SSTable of sorted ``entries``, ``per_block`` entries per data block."""
    data = bytearray()

    def put(contents: bytes, compress: bool) -> bytes:
        kind = 1 if compress else 0
        stored = snappy_literal(contents) if compress else contents
        handle = varint(len(data)) + varint(len(stored))
        data.extend(stored + bytes([kind]) + struct.pack("<I", masked_crc32c(stored + bytes([kind]))))
        return handle

    index = []
    for start in range(0, len(entries), per_block):
        chunk = entries[start : start + per_block]
        index.append((chunk[-1][0], put(block(chunk, restart_interval), snappy)))
    meta = put(block([], 1), False)
    index_handle = put(block(index, 1), snappy)
    footer = (meta + index_handle).ljust(40, b"\0") + struct.pack("<Q", TABLE_MAGIC)
    path.write_bytes(bytes(data) + footer)


def write_checkpoint(
    prefix: Path,
    tensors: dict[str, np.ndarray | str],
    *,
    shards: int = 1,
    big_endian: bool = False,
    bfloat16: tuple[str, ...] = (),
    per_block: int = 1000,
    restart_interval: int = 16,
    snappy: bool = False,
) -> Path:
    """Write ``tensors`` as ``prefix.index`` + ``prefix.data-*``; names in ``bfloat16`` are stored as bfloat16.

    Tensors go round-robin to the shards; a ``str`` value is stored as a TF string scalar.
    """
    prefix.parent.mkdir(parents=True, exist_ok=True)
    shard_data = [bytearray() for _ in range(shards)]
    entries = [(b"", field_varint(1, shards) + field_varint(2, int(big_endian)))]  # BundleHeaderProto
    for i, name in enumerate(sorted(tensors)):
        value, shard = tensors[name], i % shards
        if isinstance(value, str):
            raw, dtype, shape = varint(len(value)) + value.encode(), STRING, ()
        elif name in bfloat16:
            raw = (np.asarray(value, np.float32).view(np.uint32) >> 16).astype(">u2" if big_endian else "<u2").tobytes()
            dtype, shape = BFLOAT16, value.shape
        else:
            array = np.asarray(value)
            raw = array.astype(array.dtype.newbyteorder(">" if big_endian else "<")).tobytes()
            dtype, shape = TF_DTYPES[array.dtype.name], array.shape
        entries.append((name.encode(), entry_proto(dtype, shape, shard, len(shard_data[shard]), len(raw))))
        shard_data[shard] += raw
    write_table(Path(f"{prefix}.index"), entries, per_block, restart_interval, snappy)
    for shard, raw in enumerate(shard_data):
        Path(f"{prefix}.data-{shard:05d}-of-{shards:05d}").write_bytes(bytes(raw))
    return prefix
