"""LevelDB's table format ("SSTable"), as TensorFlow uses it for a checkpoint's ``.index``.

Data blocks of prefix-compressed ``key -> value`` entries with restart points, an index block
mapping the last key of each data block to its ``BlockHandle`` (varint offset, varint size), a
metaindex block, and a 48-byte footer ending in the magic number ``0xdb4775248b80fb57``. Every
block is followed by a 1-byte compression type (0 none, 1 snappy) and a masked CRC-32C. Pure
Python: index files are kilobytes.
"""

from __future__ import annotations

import struct
from functools import cache
from pathlib import Path


class CheckpointFormatError(ValueError):
    """The file is not a readable TensorFlow V2 checkpoint (the message names the file and why)."""


TABLE_MAGIC = 0xDB4775248B80FB57
FOOTER_SIZE = 48  # 2 block handles padded to 40 bytes + 8-byte magic
BLOCK_TRAILER_SIZE = 5  # compression type + masked CRC-32C


def varint(buf: bytes, pos: int) -> tuple[int, int]:
    """Decode a base-128 varint at ``pos``; returns (value, next position)."""
    result = shift = 0
    while True:
        if pos >= len(buf):
            raise CheckpointFormatError("truncated varint")
        byte = buf[pos]
        pos += 1
        result |= (byte & 0x7F) << shift
        if not byte & 0x80:
            return result, pos
        shift += 7
        if shift > 63:
            raise CheckpointFormatError("varint longer than 10 bytes")


@cache
def _crc32c_table() -> tuple[int, ...]:
    table = []
    for i in range(256):
        crc = i
        for _ in range(8):
            crc = (crc >> 1) ^ 0x82F63B78 if crc & 1 else crc >> 1
        table.append(crc)
    return tuple(table)


def crc32c(data: bytes) -> int:
    """CRC-32C (Castagnoli), as LevelDB/TensorFlow use it. Pure Python: meant for index blocks (KBs)."""
    table, crc = _crc32c_table(), 0xFFFFFFFF
    for byte in data:
        crc = table[(crc ^ byte) & 0xFF] ^ (crc >> 8)
    return crc ^ 0xFFFFFFFF


def masked_crc32c(data: bytes) -> int:
    """LevelDB stores CRCs rotated and offset ("masked") so that CRCs of CRCs stay well-distributed."""
    crc = crc32c(data)
    return (((crc >> 15) | (crc << 17)) + 0xA282EAD8) & 0xFFFFFFFF


def snappy_decompress(data: bytes) -> bytes:
    """Raw snappy (the block compression LevelDB tables may use): literals and back-references."""
    length, pos = varint(data, 0)
    out = bytearray()
    while pos < len(data):
        tag = data[pos]
        pos += 1
        kind = tag & 3
        if kind == 0:  # literal; lengths >= 61 spill into 1-4 following bytes
            n = tag >> 2
            if n >= 60:
                extra = n - 59
                n = int.from_bytes(data[pos : pos + extra], "little")
                pos += extra
            n += 1
            out += data[pos : pos + n]
            pos += n
            continue
        if kind == 1:  # copy with 1-byte offset
            n, offset = ((tag >> 2) & 7) + 4, ((tag >> 5) << 8) | data[pos]
            pos += 1
        elif kind == 2:  # copy with 2-byte offset
            n, offset = (tag >> 2) + 1, int.from_bytes(data[pos : pos + 2], "little")
            pos += 2
        else:  # copy with 4-byte offset
            n, offset = (tag >> 2) + 1, int.from_bytes(data[pos : pos + 4], "little")
            pos += 4
        if offset == 0 or offset > len(out):
            raise CheckpointFormatError("corrupt snappy block (bad back-reference)")
        for _ in range(n):  # byte by byte: a copy may overlap its own output
            out.append(out[-offset])
    if len(out) != length:
        raise CheckpointFormatError(f"corrupt snappy block ({len(out)} bytes, header says {length})")
    return bytes(out)


def _block_handle(buf: bytes, pos: int = 0) -> tuple[tuple[int, int], int]:
    offset, pos = varint(buf, pos)
    size, pos = varint(buf, pos)
    return (offset, size), pos


def _read_block(data: bytes, handle: tuple[int, int], where: str) -> bytes:
    offset, size = handle
    end = offset + size
    if end + BLOCK_TRAILER_SIZE > len(data):
        raise CheckpointFormatError(f"{where}: block at {offset} (+{size}) runs past the end of the file (truncated?)")
    block, kind = data[offset:end], data[end]
    (stored,) = struct.unpack_from("<I", data, end + 1)
    if masked_crc32c(data[offset : end + 1]) != stored:
        raise CheckpointFormatError(f"{where}: CRC mismatch in the block at byte {offset} (corrupt file)")
    if kind == 0:
        return block
    if kind == 1:
        return snappy_decompress(block)
    raise CheckpointFormatError(f"{where}: unknown block compression type {kind} (0 = none and 1 = snappy are known)")


def _block_entries(block: bytes, where: str) -> list[tuple[bytes, bytes]]:
    """The ``(key, value)`` entries of one block, in order.

    Keys share a prefix with the previous key (``shared`` bytes) except at restart points,
    whose offsets the block's tail lists; entries are read sequentially and the restart points
    checked (a restart entry must share nothing), which catches a misparsed block.
    """
    if len(block) < 4:
        raise CheckpointFormatError(f"{where}: block of {len(block)} bytes is too short")
    (num_restarts,) = struct.unpack_from("<I", block, len(block) - 4)
    end = len(block) - 4 - 4 * num_restarts
    if end < 0:
        raise CheckpointFormatError(f"{where}: block claims {num_restarts} restart points, more than fit")
    restarts = set(struct.unpack_from(f"<{num_restarts}I", block, end))
    entries: list[tuple[bytes, bytes]] = []
    key, pos = b"", 0
    while pos < end:
        start = pos
        shared, pos = varint(block, pos)
        unshared, pos = varint(block, pos)
        value_len, pos = varint(block, pos)
        if (start in restarts and shared) or shared > len(key) or pos + unshared + value_len > end:
            raise CheckpointFormatError(f"{where}: corrupt block entry at byte {start}")
        key = key[:shared] + block[pos : pos + unshared]
        pos += unshared
        entries.append((key, block[pos : pos + value_len]))
        pos += value_len
    return entries


def read_table(path: Path) -> list[tuple[bytes, bytes]]:
    """All ``(key, value)`` pairs of an SSTable file, in key order."""
    data = path.read_bytes()
    where = str(path)
    if len(data) < FOOTER_SIZE:
        raise CheckpointFormatError(f"{where} is {len(data)} bytes, too short for a TensorFlow checkpoint index")
    (magic,) = struct.unpack_from("<Q", data, len(data) - 8)
    if magic != TABLE_MAGIC:
        raise CheckpointFormatError(f"{where} is not a TensorFlow checkpoint index (no SSTable magic number at its end)")
    footer = data[len(data) - FOOTER_SIZE :]
    _metaindex, pos = _block_handle(footer)
    index_handle, _ = _block_handle(footer, pos)
    entries: list[tuple[bytes, bytes]] = []
    for _last_key, handle in _block_entries(_read_block(data, index_handle, where), where):
        entries += _block_entries(_read_block(data, _block_handle(handle)[0], where), where)
    return entries


