"""`tkg.server.spill_files`: the disk tier's files round-trip every KV dtype byte for byte."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest

from tkg import dtypes
from tkg.server import spill_files

SHAPE = (2, 2, 3, 5, 4, 8)  # [num_layers, 2, Hkv, num_blocks, block_len, head_dim]


@pytest.mark.parametrize("dtype", [dtypes.FLOAT32, dtypes.FLOAT16, dtypes.BFLOAT16, dtypes.FLOAT8_E4M3],
                         ids=lambda d: d.name)  # fmt: skip
def test_a_payload_of_every_kv_dtype_round_trips_byte_for_byte(tmp_path: Path, dtype: dtypes.DType) -> None:
    """bfloat16 and fp8 (ml_dtypes) have no buffer-protocol format: the write must not depend on one."""
    payload = np.random.default_rng(0).standard_normal(SHAPE, np.float32).astype(dtype.numpy)
    path = tmp_path / "s.kv"
    header = spill_files.FileHeader("s", (20, 20), 0, 1.0, 5, payload.dtype.name, SHAPE, payload.nbytes)
    size = spill_files.write_file(path, header, payload)
    assert size == path.stat().st_size and size % spill_files.PAGE == 0
    got = spill_files.read_payload(path, spill_files.read_header(path))
    assert got.dtype == payload.dtype and got.shape == SHAPE
    assert got.view(np.uint8).tobytes() == payload.view(np.uint8).tobytes()


def test_a_flipped_payload_byte_fails_its_chunk_checksum(tmp_path: Path) -> None:
    payload = np.arange(np.prod(SHAPE), dtype=np.float32).reshape(SHAPE).astype(dtypes.BF16)
    path = tmp_path / "s.kv"
    header = spill_files.FileHeader("s", (20, 20), 0, 1.0, 5, payload.dtype.name, SHAPE, payload.nbytes)
    spill_files.write_file(path, header, payload)
    h = spill_files.read_header(path)
    raw = bytearray(path.read_bytes())
    raw[spill_files.payload_offset(len(h.to_json())) + 7] ^= 0x10
    path.write_bytes(bytes(raw))
    with pytest.raises(spill_files.CorruptFile, match="chunk 0 checksum mismatch"):
        spill_files.read_payload(path, spill_files.read_header(path))
