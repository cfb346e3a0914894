"""The pure-Python reader of TensorFlow's checkpoint format, on files the test writer makes:
dtypes, shards, byte order, many index blocks with restart points, snappy blocks, corruption,
and how a checkpoint path is given. (Checkpoints TensorFlow itself wrote: test_slim_parity.py.)"""

from __future__ import annotations

import numpy as np
import pytest
from tf_bundle import write_checkpoint

from mtssl_lightning.slim.sstable import crc32c, snappy_decompress
from mtssl_lightning.slim.tf_checkpoint import CheckpointFormatError, TFCheckpoint, resolve_prefix


def _tensors() -> dict:
    rng = np.random.default_rng(0)
    return {
        f"net/layer_{i:02d}/weights": rng.normal(size=(3, 3, 2, i + 1)).astype(np.float32) for i in range(30)
    } | {
        "net/half": rng.normal(size=(4,)).astype(np.float16),
        "net/double": rng.normal(size=(2, 2)),
        "net/bf16": np.array([1.0, -2.5, 3.140625], np.float32),  # exactly representable in bfloat16
        "global_step": np.array(1234, np.int64),
        "flags": np.array([True, False]),
        "name": "a string",
    }


@pytest.mark.parametrize(
    "layout",
    [
        {},  # one shard, one data block: what TensorFlow writes
        {"shards": 3, "per_block": 4, "restart_interval": 3},  # many blocks, keys prefix-compressed between restarts
        {"per_block": 7, "snappy": True},  # compressed index blocks
        {"big_endian": True, "shards": 2},
    ],
    ids=["plain", "shards-blocks-restarts", "snappy", "big-endian"],
)
def test_every_tensor_reads_back_exactly(tmp_path, layout):
    tensors = _tensors()
    prefix = write_checkpoint(tmp_path / "model.ckpt", tensors, bfloat16=("net/bf16",), **layout)
    ckpt = TFCheckpoint(prefix)
    assert list(ckpt.entries) == sorted(tensors)  # SSTable order
    assert ckpt.num_shards == layout.get("shards", 1)
    for name, value in tensors.items():
        entry = ckpt.entries[name]
        if isinstance(value, str):
            assert entry.dtype == "string" and entry.why_not == "dtype string has no plain array form"
            with pytest.raises(CheckpointFormatError, match="'name'.*cannot be read as an array.*string"):
                ckpt.read(name)
            continue
        array = ckpt.read(name)
        assert array.dtype == (np.float32 if name == "net/bf16" else value.dtype)
        assert array.shape == value.shape and np.array_equal(array, value)
    assert ckpt.entries["net/bf16"].dtype == "bfloat16" and ckpt.entries["global_step"].dtype == "int64"


def test_snappy_copies_with_each_offset_width():
    # "abcd" as a literal, then back-references of 1-, 2- and 4-byte offsets (overlapping copies repeat)
    literal = bytes([3 << 2]) + b"abcd"
    copy1 = bytes([((6 - 4) << 2) | 1, 4])  # length 6, offset 4 -> "abcdab"
    copy2 = bytes([((3 - 1) << 2) | 2]) + (1).to_bytes(2, "little")  # length 3, offset 1 -> "bbb"
    copy4 = bytes([((5 - 1) << 2) | 3]) + (13).to_bytes(4, "little")  # length 5, offset 13 -> "abcda"
    expected = b"abcd" + b"abcdab" + b"bbb" + b"abcda"
    assert snappy_decompress(bytes([len(expected)]) + literal + copy1 + copy2 + copy4) == expected
    with pytest.raises(CheckpointFormatError, match="back-reference"):
        snappy_decompress(bytes([8]) + bytes([(4 - 4) << 2 | 1, 9]))
    with pytest.raises(CheckpointFormatError, match="header says 9"):
        snappy_decompress(bytes([9]) + literal)


def test_crc32c_known_value():
    assert crc32c(b"123456789") == 0xE3069283  # the standard CRC-32C check value


def test_a_checkpoint_can_be_named_by_prefix_index_data_file_or_folder(tmp_path):
    prefix = write_checkpoint(tmp_path / "run" / "model.ckpt-500", {"w": np.zeros(2, np.float32)}, shards=2)
    for given in (prefix, f"{prefix}.index", f"{prefix}.data-00001-of-00002", tmp_path / "run"):
        assert resolve_prefix(given) == prefix
    (tmp_path / "run" / "checkpoint").write_text('model_checkpoint_path: "model.ckpt-500"\nall_model_checkpoint_paths: "x"\n')
    write_checkpoint(tmp_path / "run" / "model.ckpt-100", {"w": np.zeros(2, np.float32)})
    assert resolve_prefix(tmp_path / "run") == prefix  # TF's state file names the newest
    (tmp_path / "run" / "checkpoint").unlink()
    with pytest.raises(FileNotFoundError, match=r"is a folder.*model.ckpt-100.index, model.ckpt-500.index"):
        resolve_prefix(tmp_path / "run")


def test_missing_files_say_what_was_expected(tmp_path):
    with pytest.raises(FileNotFoundError, match=r"no TensorFlow checkpoint at .*nothing'.*nothing.index.*give the prefix"):
        TFCheckpoint(tmp_path / "nothing")
    single = tmp_path / "model.ckpt"
    single.write_bytes(b"V1 checkpoint")
    with pytest.raises(FileNotFoundError, match="V1.*re-saved"):
        TFCheckpoint(single)
    prefix = write_checkpoint(tmp_path / "two" / "model.ckpt", {"a": np.zeros(1, np.float32), "b": np.ones(1, np.float32)}, shards=2)
    (tmp_path / "two" / "model.ckpt.data-00001-of-00002").unlink()
    with pytest.raises(FileNotFoundError, match=r"lacks its data shard model.ckpt.data-00001-of-00002 \(2 shard"):
        TFCheckpoint(prefix)


def test_corrupt_or_foreign_files_are_refused(tmp_path):
    not_index = tmp_path / "x.ckpt"
    (tmp_path / "x.ckpt.index").write_bytes(b"\0" * 100)
    with pytest.raises(CheckpointFormatError, match="not a TensorFlow checkpoint index"):
        TFCheckpoint(not_index)
    prefix = write_checkpoint(tmp_path / "m.ckpt", {"w": np.arange(6, dtype=np.float32)})
    index = tmp_path / "m.ckpt.index"
    raw = bytearray(index.read_bytes())
    raw[3] ^= 0xFF  # inside the first data block
    index.write_bytes(bytes(raw))
    with pytest.raises(CheckpointFormatError, match="CRC mismatch"):
        TFCheckpoint(prefix)
    prefix = write_checkpoint(tmp_path / "t.ckpt", {"w": np.arange(6, dtype=np.float32)})
    data = tmp_path / "t.ckpt.data-00000-of-00001"
    data.write_bytes(data.read_bytes()[:10])
    with pytest.raises(CheckpointFormatError, match="'w'.*truncated"):
        TFCheckpoint(prefix).read("w")
    with pytest.raises(KeyError, match="'v' is not in checkpoint"):
        TFCheckpoint(prefix).read("v")
