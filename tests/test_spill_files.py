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


def test_read_payload_faults_in_each_chunk_on_another_thread_before_reading_into_it(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A fresh buffer's first-touch page faults are taken off the reading thread, ahead of each read."""
    import os
    import threading

    monkeypatch.setattr(spill_files, "CHUNK", spill_files.PAGE)  # 8 chunks of this 30 KiB payload
    shape = (*SHAPE[:-1], 32)
    payload = np.random.default_rng(1).standard_normal(shape, np.float32)
    path = tmp_path / "s.kv"
    header = spill_files.FileHeader("s", (20, 20), 0, 1.0, 5, payload.dtype.name, shape, payload.nbytes)
    spill_files.write_file(path, header, payload)
    h = spill_files.read_header(path)
    base = spill_files.payload_offset(len(h.to_json()))
    faulted: list[tuple[int, int]] = []  # buffer ranges, appended once faulted in
    reads: list[tuple[int, int]] = []
    real_fault, real_preadv = spill_files._fault_in, os.preadv

    def fault_in(buf: memoryview, start: int, end: int) -> None:
        assert threading.current_thread().name.startswith("tkg-prefault")
        real_fault(buf, start, end)
        faulted.append((start, end))

    def preadv(fd: int, buffers: list[memoryview], offset: int) -> int:
        span = (offset - base, offset - base + len(buffers[0]))
        assert span in faulted, f"read into {span} before it was faulted in (faulted: {faulted})"
        reads.append(span)
        return real_preadv(fd, buffers, offset)

    monkeypatch.setattr(spill_files, "_fault_in", fault_in)
    monkeypatch.setattr(spill_files.os, "preadv", preadv)
    got = spill_files.read_payload(path, h)
    np.testing.assert_array_equal(got, payload)
    whole = spill_files._round_up(payload.nbytes, spill_files.PAGE)
    assert len(reads) == 8 and reads[0][0] == 0 and reads[-1][1] == whole
    assert sorted(faulted) == reads  # each chunk faulted in once, and nothing else
