"""The dtype registry (`tkg.dtypes`): each row agrees with the proto, numpy and torch, and every
other table of dtypes (codec, config, kernel checks, transformers spec) is derived from it."""

from __future__ import annotations

import subprocess
import sys

import ml_dtypes
import numpy as np
import pytest
import torch

from tkg import codec, dtypes
from tkg.v1 import decode_attention_pb2 as pb


def test_every_wire_dtype_has_one_row_and_its_names_agree() -> None:
    wire = {v.number for v in pb.DType.DESCRIPTOR.values if v.number != pb.DTYPE_UNSPECIFIED}
    assert sorted(d.code for d in dtypes.ALL) == sorted(wire)  # a new proto dtype needs a row here
    for d in dtypes.ALL:
        assert pb.DType.Name(d.code) == "DTYPE_" + d.name.upper()
        assert d.numpy.name == d.name and d.itemsize == d.numpy.itemsize
        assert dtypes.BY_NAME[d.name] is dtypes.BY_CODE[d.code] is dtypes.BY_NUMPY[d.numpy] is dtypes.BY_SHORT[d.short]


def test_rows_hold_the_expected_facts() -> None:
    got = {d.name: (d.short, d.itemsize, d.io, d.torch) for d in dtypes.ALL}
    assert got == {
        "float32": ("fp32", 4, True, torch.float32),
        "float16": ("fp16", 2, True, torch.float16),
        "bfloat16": ("bf16", 2, True, torch.bfloat16),
        "float8_e4m3": ("fp8", 1, False, torch.uint8),  # torch carries Trainium's e4m3 as its bits
    }
    bf16, fp8 = dtypes.BF16, dtypes.FP8
    assert bf16 == np.dtype(ml_dtypes.bfloat16) and fp8 == np.dtype(ml_dtypes.float8_e4m3)
    io_numpy, kv_numpy = dtypes.IO_NUMPY, dtypes.KV_NUMPY
    assert io_numpy == (np.dtype(np.float32), np.dtype(np.float16), bf16) and kv_numpy == (*io_numpy, fp8)
    assert dtypes.names() == "float32, float16, bfloat16, float8_e4m3"


def test_each_exponent_is_the_bits_of_infinity_and_the_codec_finds_nan_and_inf_by_it() -> None:
    for d in dtypes.ALL:
        assert int(np.array(np.inf, np.float32).astype(d.numpy).view(d.uint)) == d.exponent, d.name
        finite = np.array([0.0, -1.5, float(ml_dtypes.finfo(d.numpy).max)], np.float32).astype(d.numpy)
        assert codec.all_finite(finite)
        for bad in (np.nan, -np.inf):
            a = np.append(finite, np.array([bad], np.float32).astype(d.numpy))
            assert not codec.all_finite(a), (d.name, bad)


def test_kv_dtype_takes_a_name_or_a_numpy_dtype() -> None:
    assert dtypes.kv_dtype("float8_e4m3") == dtypes.FP8 and dtypes.kv_dtype(np.float16) == np.dtype(np.float16)
    assert dtypes.kv_dtype(np.dtype(">f4")) == np.dtype("<f4")  # by name: byte order is the codec's business
    with pytest.raises(ValueError, match=r"kv_dtype: expected one of \['bfloat16', .*got 'float8'"):
        dtypes.kv_dtype("float8")
    with pytest.raises(ValueError, match=r"got <class .numpy\.float64.>"):
        dtypes.kv_dtype(np.float64)


def test_the_codec_carries_every_dtype_of_the_registry() -> None:
    for d in dtypes.ALL:
        a = np.arange(6, dtype=np.float32).reshape(2, 3).astype(d.numpy)
        t = codec.encode(a)
        assert t.dtype == d.code
        np.testing.assert_array_equal(codec.decode(t).astype(np.float32), a.astype(np.float32))
    with pytest.raises(codec.TensorError, match="float64; expected one of float32, float16, bfloat16, float8_e4m3"):
        codec.encode(np.zeros(2))


def test_an_output_array_encodes_without_a_copy_and_as_tobytes_would(monkeypatch: pytest.MonkeyPatch) -> None:
    """`codec.output_array`: the answer's memory is a bytes object, which `encode` of all of it hands
    to the message unchanged (no `tobytes`); the message is what `tobytes` gives. A view of part of
    it, or of all of it out of order, and small arrays take `tobytes`."""
    monkeypatch.setattr(codec, "OUTPUT_MIN_BYTES", 64)
    for d in dtypes.ALL:
        a = codec.output_array((3, 4, 1, 8), d.numpy)
        assert a.dtype == d.numpy and a.flags.writeable and a.flags.c_contiguous
        a[...] = np.arange(a.size, dtype=np.float32).reshape(a.shape).astype(d.numpy)
        for view in (a, a[0:3], a.reshape(12, 8)):
            t = codec.encode(view)
            assert t.data == a.tobytes() and tuple(t.shape) == view.shape and t.dtype == d.code
            whole = codec._whole_bytes(view)  # the holder's own bytes object, which encode hands on
            assert whole is not None and whole is codec._whole_bytes(a)
        for part in (a[1:], a[:, :2], a[::-1]):  # not all of it, or not in order: copied
            assert codec._whole_bytes(part) is None
            np.testing.assert_array_equal(codec.decode(codec.encode(part)).view(np.uint8), part.view(np.uint8))
    small = codec.output_array((2, 3), np.float32)  # 24 bytes < 64: a plain array
    assert small.base is None and codec._whole_bytes(small) is None
    # encode sends the holder's bytes object itself: its contents, not a copy taken earlier
    a = codec.output_array((16,), np.float32)
    a[...] = 1.0
    monkeypatch.setattr(codec, "_whole_bytes", lambda x: b"\x07" * x.nbytes)
    assert codec.encode(a).data == b"\x07" * 64


def test_config_and_hf_tables_come_from_the_registry() -> None:
    from tkg.server import hf_config
    from tkg.server.config import ConfigError, build_spec

    assert hf_config.DTYPES == {"float32": "float32", "float16": "float16", "bfloat16": "bfloat16"}
    base = {"num_layers": 1, "num_q_heads": 2, "num_kv_heads": 1, "head_dim": 8, "block_len": 4, "num_blocks": 4}
    for d in dtypes.ALL:
        spec = build_spec({**base, "kv_dtype": d.name})
        assert spec.kv_numpy_dtype == d.numpy
        assert spec.io_numpy_dtype == (d.numpy if d.io else dtypes.BF16)  # fp8 travels as bf16 by default
    with pytest.raises(ConfigError, match=r"io_dtype: 'float8_e4m3'; expected one of \['bfloat16', 'float16'"):
        build_spec({**base, "kv_dtype": "float8_e4m3", "io_dtype": "float8_e4m3"})


def test_the_registry_and_the_codec_do_not_import_torch() -> None:
    code = "import sys, tkg.dtypes, tkg.codec; sys.exit('torch' in sys.modules)"
    assert subprocess.run([sys.executable, "-c", code], timeout=60).returncode == 0
