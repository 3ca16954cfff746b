"""The disk tier's files: one file per sequence, checksummed, written by atomic rename.

A file holds one sequence whole (every layer, K and V) as one run, so a spill or a restore is a
few large sequential transfers rather than a copy per block (vLLM's offloading got its speed from
making each moved unit large):

    [0, 8)     magic b"TKGKV\\0\\1\\0"
    [8, 12)    header length H, uint32 little-endian
    [12, 16)   crc32 of the header bytes
    [16, 16+H) the header, JSON: sequence id, lengths, base position, last use (wall clock),
               block count, dtype, payload shape, payload bytes, chunk size, crc32 per chunk
    [PAYLOAD_OFFSET or the next page, ...)  the payload `[num_layers, 2, Hkv, num_blocks, block_len,
               head_dim]` in the KV dtype, raw, padded with zeros to a whole page

Writes go to a temporary name in the same directory, are fsynced and renamed over the final
name, and the directory is fsynced: a reader sees the old file or the new one, never a mix. A
torn or corrupted file fails its header check (at start) or a chunk's crc32 (at restore) and is
reported as `CorruptFile`, never read as numbers.

Reads bypass the page cache (O_DIRECT, into page-aligned memory) where the file system allows:
a restore is read once, and the bench compares it against the disk's own O_DIRECT bandwidth.
Each chunk's crc32 runs on a second thread while the next chunk is read (zlib releases the GIL),
and a third faults in the fresh buffer's pages a few chunks ahead of the read.

The spec file (`SPEC_FILE`) records what the stored bytes mean (`spec_fingerprint`); a server
refuses a directory whose fingerprint differs (`check_spec`), naming the first differing field.
"""

from __future__ import annotations

import json
import mmap
import os
import struct
import zlib
from collections.abc import Iterator
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

MAGIC = b"TKGKV\x00\x01\x00"
PAGE = 4096
PAYLOAD_OFFSET = PAGE  # headers above a page push the payload to the next page boundary
CHUNK = 4 << 20  # bytes per read and per crc32 (a multiple of PAGE)
SUFFIX = ".kv"
SPEC_FILE = "tkg-spill.json"
FORMAT_VERSION = 1

_checksums = ThreadPoolExecutor(1, thread_name_prefix="tkg-crc")  # overlaps crc32 with the next read
# Faults in the pages of the chunks ahead of the read: a fresh 512 MiB buffer's first-touch faults
# (the kernel zeroing each page) cost about half of the disk's own read time when the read thread
# takes them itself; here they run while that thread waits on the disk.
_faults = ThreadPoolExecutor(1, thread_name_prefix="tkg-prefault")
FAULT_AHEAD = 2  # chunks faulted in ahead of the read


class CorruptFile(Exception):
    """A spill file failed a check (magic, header crc, payload crc, size); the message says which."""


class SpecMismatch(Exception):
    """The spill directory holds data of another model spec; the message names the field."""


@dataclass(frozen=True)
class FileHeader:
    """What a spill file says about its sequence (see the module docstring)."""

    sequence_id: str  # the cache's id (tenant namespace included)
    lengths: tuple[int, ...]  # tokens per layer
    base_position: int
    last_used: float  # wall-clock seconds (time.time()) of the last use
    num_blocks: int
    dtype: str  # numpy dtype name of the payload
    shape: tuple[int, ...]  # [num_layers, 2, Hkv, num_blocks, block_len, head_dim]
    payload_bytes: int
    chunk_crcs: tuple[int, ...] = ()

    def to_json(self) -> bytes:
        d = dict(self.__dict__)
        return json.dumps(d, separators=(",", ":")).encode()

    @staticmethod
    def from_json(raw: bytes) -> FileHeader:
        d: dict[str, Any] = json.loads(raw)
        return FileHeader(
            sequence_id=str(d["sequence_id"]), lengths=tuple(int(x) for x in d["lengths"]),
            base_position=int(d["base_position"]), last_used=float(d["last_used"]),
            num_blocks=int(d["num_blocks"]), dtype=str(d["dtype"]), shape=tuple(int(x) for x in d["shape"]),
            payload_bytes=int(d["payload_bytes"]), chunk_crcs=tuple(int(x) for x in d["chunk_crcs"]),
        )  # fmt: skip


def _round_up(n: int, to: int) -> int:
    return -(-n // to) * to


def _chunks(n: int) -> Iterator[tuple[int, int]]:
    for start in range(0, n, CHUNK):
        yield start, min(n, start + CHUNK)


def payload_offset(header_bytes: int) -> int:
    return _round_up(16 + header_bytes, PAGE)


def aligned_empty(nbytes: int) -> memoryview:
    """`nbytes` (rounded up to a page) of page-aligned anonymous memory (O_DIRECT's requirement)."""
    return memoryview(mmap.mmap(-1, max(PAGE, _round_up(nbytes, PAGE))))


def write_file(path: Path, header: FileHeader, payload: np.ndarray) -> int:
    """Write `payload` (C-contiguous) and `header` (its crcs filled in here) to `path` atomically;
    returns the file's size in bytes."""
    # As bytes through a uint8 view: the buffer protocol refuses ml_dtypes' bfloat16 and fp8 ('E', 'V').
    data = memoryview(np.ascontiguousarray(payload).reshape(-1).view(np.uint8))
    crcs = tuple(zlib.crc32(data[a:b]) for a, b in _chunks(len(data)))
    header = FileHeader(**{**header.__dict__, "payload_bytes": len(data), "chunk_crcs": crcs})
    raw = header.to_json()
    offset = payload_offset(len(raw))
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    size = offset + _round_up(len(data), PAGE)
    with open(tmp, "wb") as f:
        f.write(MAGIC + struct.pack("<II", len(raw), zlib.crc32(raw)) + raw)
        f.write(b"\0" * (offset - 16 - len(raw)))
        f.write(data)
        f.write(b"\0" * (size - offset - len(data)))
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)
    _fsync_dir(path.parent)
    return size


def _fsync_dir(d: Path) -> None:
    fd = os.open(d, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def read_header(path: Path) -> FileHeader:
    """The header of `path`, checked (magic, crc, sizes); CorruptFile if any check fails."""
    with open(path, "rb") as f:
        head = f.read(16)
        if len(head) < 16 or head[:8] != MAGIC:
            raise CorruptFile(f"{path.name}: not a tkg spill file (bad magic)")
        n, crc = struct.unpack("<II", head[8:16])
        raw = f.read(n)
        size = os.fstat(f.fileno()).st_size
    if len(raw) != n or zlib.crc32(raw) != crc:
        raise CorruptFile(f"{path.name}: header checksum mismatch (torn or corrupted write)")
    try:
        header = FileHeader.from_json(raw)
    except (ValueError, KeyError, TypeError) as exc:
        raise CorruptFile(f"{path.name}: unreadable header ({exc})") from None
    want = int(np.prod(header.shape)) * np.dtype(header.dtype).itemsize
    if header.payload_bytes != want or size < payload_offset(n) + header.payload_bytes:
        raise CorruptFile(
            f"{path.name}: {size} bytes on disk for a payload of {header.payload_bytes} (shape {list(header.shape)})"
        )
    if len(header.chunk_crcs) != len(list(_chunks(header.payload_bytes))):
        raise CorruptFile(f"{path.name}: {len(header.chunk_crcs)} chunk checksums for {header.payload_bytes} bytes")
    return header


def read_payload(path: Path, header: FileHeader, direct: bool = True) -> np.ndarray:
    """The payload of `path` as an array of `header.shape` (page-aligned memory), every chunk's
    crc32 checked; CorruptFile on a mismatch. `direct`: bypass the page cache when possible."""
    nbytes = header.payload_bytes
    offset = _payload_offset_of(path)
    buf = aligned_empty(nbytes)
    spans = [(a, b, _round_up(b - a, PAGE)) for a, b in _chunks(nbytes)]  # O_DIRECT reads whole pages
    # The fault thread only writes (zeros, over zeros) to chunks no read has started on: chunk i is
    # read only once its fault job is done, and jobs run FAULT_AHEAD chunks ahead, so the two threads
    # never touch the same bytes at once. No job outlives this call (the finally below).
    faulted = [_faults.submit(_fault_in, buf, a, a + want) for a, _, want in spans[:FAULT_AHEAD]]
    fd = _open_read(path, direct)
    pending: list[tuple[int, Future[int]]] = []
    try:
        for i, (a, b, want) in enumerate(spans):
            faulted[i].result()
            if i + FAULT_AHEAD < len(spans):
                ahead = spans[i + FAULT_AHEAD]
                faulted.append(_faults.submit(_fault_in, buf, ahead[0], ahead[0] + ahead[2]))
            got = os.preadv(fd, [buf[a : a + want]], offset + a)  # buf is whole pages (the file is padded to one)
            if got < b - a:
                raise CorruptFile(f"{path.name}: short read at payload byte {a} ({got} of {b - a})")
            pending.append((i, _checksums.submit(zlib.crc32, buf[a:b])))
    finally:
        os.close(fd)
        for fut in faulted:  # none left touching `buf` after an early exit
            fut.cancel() or fut.exception()
    for i, fut in pending:
        if fut.result() != header.chunk_crcs[i]:
            raise CorruptFile(f"{path.name}: payload chunk {i} checksum mismatch (corrupted data)")
    return np.frombuffer(buf, dtype=np.dtype(header.dtype), count=nbytes // np.dtype(header.dtype).itemsize).reshape(
        header.shape
    )


def _fault_in(buf: memoryview, start: int, end: int) -> None:
    """Touch one byte of each page of `buf[start:end]` (a fresh anonymous mapping: zeros stay zeros).
    Numpy's strided store runs without the GIL."""
    np.frombuffer(buf, np.uint8, count=end - start, offset=start)[::PAGE] = 0


def _payload_offset_of(path: Path) -> int:
    with open(path, "rb") as f:
        head = f.read(16)
    (n,) = struct.unpack("<I", head[8:12])
    return payload_offset(n)


def _open_read(path: Path, direct: bool) -> int:
    if direct and hasattr(os, "O_DIRECT"):
        try:
            return os.open(path, os.O_RDONLY | os.O_DIRECT)
        except OSError:  # tmpfs and some others refuse O_DIRECT: read through the page cache
            pass
    return os.open(path, os.O_RDONLY)


# ---- the directory's spec ------------------------------------------------------------------------


def check_spec(directory: Path, fingerprint: dict[str, Any]) -> None:
    """Adopt `directory` for `fingerprint` (what stored bytes mean): write it when the directory
    has none, else raise SpecMismatch naming the first field that differs."""
    directory.mkdir(parents=True, exist_ok=True)
    path = directory / SPEC_FILE
    want = {"format": FORMAT_VERSION, **fingerprint}
    if not path.exists():
        tmp = path.with_name(f".{SPEC_FILE}.{os.getpid()}.tmp")
        tmp.write_text(json.dumps(want, indent=1, sort_keys=True))
        os.replace(tmp, path)
        _fsync_dir(directory)
        return
    try:
        have = json.loads(path.read_text())
    except ValueError as exc:
        raise SpecMismatch(f"{path}: unreadable ({exc}); expected the spec file tkg wrote") from None
    for key in [*want, *(k for k in have if k not in want)]:  # the spec's own order: kv_dtype before io_dtype
        if have.get(key) != want.get(key):
            raise SpecMismatch(
                f"--spill-dir {directory}: field {key!r} is {have.get(key)!r} in the stored data, "
                f"{want.get(key)!r} in this server's spec; expected the same (stored KV would mean something else)"
            )


# ---- write-back logs ------------------------------------------------------------------------------
# `--persist write-back`: a sequence's blocks, full at every layer, appended as they fill to
# `<id hash>.wb`: a header page like a spill file's (its `shape` is one block's `[num_layers, 2,
# Hkv, block_len, head_dim]`), then one record per block in order: 16 bytes (block index uint32,
# crc32 uint32, payload bytes uint64, little-endian) and the block's bytes. A record is whole or it
# is the torn tail a kill left: reading stops at the first record that is short or fails its crc,
# and the file is cut back there. Truncation rewrites nothing: the file is cut to the records kept.

LOG_SUFFIX = ".wb"
LOG_MAGIC = b"TKGWB\x00\x01\x00"
_RECORD = struct.Struct("<IIQ")


def create_log(path: Path, header: FileHeader) -> int:
    """A new write-back log with `header` and no block (atomically); returns the first record's offset."""
    raw = header.to_json()
    offset = payload_offset(len(raw))
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    with open(tmp, "wb") as f:
        f.write(LOG_MAGIC + struct.pack("<II", len(raw), zlib.crc32(raw)) + raw)
        f.write(b"\0" * (offset - 16 - len(raw)))
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)
    _fsync_dir(path.parent)
    return offset


def append_blocks(path: Path, first: int, blocks: np.ndarray) -> None:
    """Append blocks `first, first + 1, ...` (`blocks`: `[n, num_layers, 2, Hkv, block_len, d]`) and
    fsync. The caller knows the file ends with block `first - 1`."""
    with open(path, "ab") as f:
        for i, block in enumerate(blocks):
            data = memoryview(np.ascontiguousarray(block)).cast("B")
            f.write(_RECORD.pack(first + i, zlib.crc32(data), len(data)))
            f.write(data)
        f.flush()
        os.fsync(f.fileno())


def cut_log(path: Path, keep: int) -> None:
    """Keep the first `keep` records of the log (a truncation, persisted before it is acknowledged)."""
    with open(path, "r+b") as f:
        header = _log_header(f, path)
        block_bytes = int(np.prod(header.shape)) * np.dtype(header.dtype).itemsize
        f.truncate(_log_offset(f) + keep * (_RECORD.size + block_bytes))
        f.flush()
        os.fsync(f.fileno())


def read_log(path: Path) -> tuple[FileHeader, np.ndarray]:
    """The log's header and its whole records as `[n, num_layers, 2, Hkv, block_len, d]`; a torn or
    corrupted tail is cut off (in the file too) and the reason logged by the caller from the count."""
    with open(path, "r+b") as f:
        header = _log_header(f, path)
        dtype = np.dtype(header.dtype)
        block_bytes = int(np.prod(header.shape)) * dtype.itemsize
        start = _log_offset(f)
        f.seek(start)
        blocks: list[np.ndarray] = []
        while True:
            head = f.read(_RECORD.size)
            if len(head) < _RECORD.size:
                break
            index, crc, n = _RECORD.unpack(head)
            data = f.read(n)
            if index != len(blocks) or n != block_bytes or len(data) != n or zlib.crc32(data) != crc:
                break
            blocks.append(np.frombuffer(data, dtype).reshape(header.shape))
        good = start + len(blocks) * (_RECORD.size + block_bytes)
        if os.fstat(f.fileno()).st_size != good:  # the torn tail a kill left: cut back to the last good block
            f.truncate(good)
            f.flush()
            os.fsync(f.fileno())
    shape = (0, *header.shape)
    return header, np.stack(blocks) if blocks else np.empty(shape, dtype)


def _log_header(f: Any, path: Path) -> FileHeader:
    head = f.read(16)
    if len(head) < 16 or head[:8] != LOG_MAGIC:
        raise CorruptFile(f"{path.name}: not a tkg write-back log (bad magic)")
    n, crc = struct.unpack("<II", head[8:16])
    raw = f.read(n)
    if len(raw) != n or zlib.crc32(raw) != crc:
        raise CorruptFile(f"{path.name}: header checksum mismatch (torn or corrupted write)")
    try:
        return FileHeader.from_json(raw)
    except (ValueError, KeyError, TypeError) as exc:
        raise CorruptFile(f"{path.name}: unreadable header ({exc})") from None


def _log_offset(f: Any) -> int:
    f.seek(8)
    (n,) = struct.unpack("<I", f.read(4))
    return payload_offset(n)
