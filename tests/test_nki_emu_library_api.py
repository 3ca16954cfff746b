"""The NKI API nki-library's attention kernels use, as the emulator implements it: nc_stream_shuffle,
nl.bool / nl.dtype, the MX dtypes, 4-byte dma_transpose, and kernel arguments named like the
launch's own parameters. Each rule the emulator enforces here has a test that breaks it."""

from __future__ import annotations

import numpy as np
import pytest

from tkg.kernel import nki_emu
from tkg.kernel.nki_emu.errors import NkiValidationError

if not nki_emu.install():
    pytest.skip("the real Neuron nki package is importable here; these tests target the emulator",
                allow_module_level=True)  # fmt: skip
import nki
import nki.isa as nisa
import nki.language as nl


@pytest.fixture
def s():
    with nki_emu.session() as prog:
        yield prog


def tile(values: np.ndarray, dtype=nl.float32):
    t = nl.ndarray(values.shape, dtype)
    nisa.dma_copy(t, _hbm(values, dtype))
    return t


def _hbm(values: np.ndarray, dtype):
    h = nl.ndarray(values.shape, dtype, buffer=nl.shared_hbm)
    h.write(np.asarray(values).astype(dtype.np))
    return h


def val(t) -> np.ndarray:
    return np.array(t.array())


# ---- nc_stream_shuffle -----------------------------------------------------------------------
def test_stream_shuffle_broadcasts_one_partition(s):
    src = tile(np.arange(6, dtype=np.float32).reshape(1, 6))
    dst = nl.ndarray((32, 6), nl.float32)
    nisa.nc_stream_shuffle(src=src[0:1, :], dst=dst, shuffle_mask=[0] * 32)
    np.testing.assert_array_equal(val(dst), np.tile(np.arange(6, dtype=np.float32), (32, 1)))
    assert s.stats.by_instruction["nc_stream_shuffle"] == 1 and s.stats.instructions["vector"] >= 1


def test_stream_shuffle_applies_the_mask_per_quadrant_and_255_keeps(s):
    x = np.arange(64 * 2, dtype=np.float32).reshape(64, 2)
    src = tile(x)
    dst = tile(np.full((64, 2), -1.0, np.float32))
    mask = [31 - i for i in range(32)]
    mask[5] = 255
    nisa.nc_stream_shuffle(dst, src, mask)
    want = np.concatenate([x[31::-1], x[63:31:-1]])
    want[5] = want[37] = -1.0  # unmodified in both quadrants
    np.testing.assert_array_equal(val(dst), want)
    # In place: the source is read before the destination is written.
    nisa.nc_stream_shuffle(src, src, [(i + 1) % 32 for i in range(32)])
    np.testing.assert_array_equal(val(src)[0:32], np.roll(x[0:32], -1, axis=0))


@pytest.mark.parametrize(
    ("dst_shape", "dst_dtype", "mask", "match"),
    [
        ((32, 6), nl.bfloat16, [0] * 32, "dst dtype bfloat16 must equal src dtype float32"),
        ((32, 4), nl.float32, [0] * 32, "dst has 4 elements per partition, src 6"),
        ((32, 6), nl.float32, [0] * 31, "expected a list of 32 ints"),
        ((32, 6), nl.float32, [32] + [0] * 31, r"shuffle_mask\[0\]=32: expected a source partition 0..31"),
        ((32, 6), nl.float32, [1] * 32, "copies src partition 1 .* but src has 1 partitions"),
    ],
)
def test_stream_shuffle_rules(s, dst_shape, dst_dtype, mask, match):
    src = tile(np.ones((1, 6), np.float32))
    with pytest.raises(NkiValidationError, match=match):
        nisa.nc_stream_shuffle(nl.ndarray(dst_shape, dst_dtype), src, mask)


# ---- dtypes ----------------------------------------------------------------------------------
def test_bool_and_dtype_names():
    assert str(nl.bool) == "bool" and nl.bool.itemsize == 1 and nl.bool.is_int
    assert isinstance(nl.float32, nl.dtype) and isinstance(nl.bool, nl.dtype)
    with pytest.raises(AttributeError, match="no attribute 'float64'"):
        _ = nl.float64


def test_mx_dtypes_move_as_raw_bits_and_refuse_arithmetic(s):
    assert (nl.float8_e4m3fn_x4.itemsize, nl.float8_e5m2_x4.itemsize, nl.float4_e2m1fn_x4.itemsize) == (4, 4, 2)
    assert nl.float8_e8m0fnu.itemsize == 1 and not nl.float8_e4m3fn_x4.is_int
    bits = np.arange(8, dtype=np.uint32).reshape(2, 4) * 0x01010101
    h = _hbm(bits, nl.float8_e4m3fn_x4)
    t = nl.ndarray((2, 4), nl.float8_e4m3fn_x4)
    nisa.dma_copy(t, h)
    np.testing.assert_array_equal(val(t), bits)
    with pytest.raises(NkiValidationError, match="packed MX values are moved as raw bits"):
        nisa.tensor_copy(t, tile(np.ones((2, 4), np.float32)))


# ---- dma_transpose of 4-byte dtypes ------------------------------------------------------------
def test_dma_transpose_takes_fp32_only_when_the_compiler_picks_the_dge(s):
    x = np.arange(6 * 4, dtype=np.float32).reshape(6, 1, 1, 4)  # (keys, 1, 1, d) as the library loads K
    h = _hbm(x, nl.float32)
    dst = nl.ndarray((4, 1, 1, 6), nl.float32)
    nisa.dma_transpose(dst, h)
    np.testing.assert_array_equal(val(dst), x.transpose(3, 1, 2, 0))
    with pytest.raises(NkiValidationError, match=r"expected equal 2-byte .*dge_mode=unknown"):
        nisa.dma_transpose(nl.ndarray((4, 1, 1, 6), nl.float32), h, dge_mode=nisa.dge_mode.swdge)
    with pytest.raises(NkiValidationError, match="expected equal 2- or 4-byte dtypes"):
        nisa.dma_transpose(nl.ndarray((4, 1, 1, 6), nl.int8), _hbm(x.astype(np.int8), nl.int8))


# ---- launch ----------------------------------------------------------------------------------
@nki.jit
def _echo(x, lnc, kernel, grid_ndim=None):
    out = nl.ndarray(x.shape, x.dtype, buffer=nl.shared_hbm, name="out")
    t = nl.ndarray(x.shape, x.dtype)
    nisa.dma_copy(t, x)
    nisa.tensor_scalar(t, t, nl.add, float(lnc + kernel))
    nisa.dma_copy(out, t)
    return out


def test_kernel_arguments_may_be_named_like_the_launch_parameters():
    x = np.zeros((2, 2), np.float32)
    np.testing.assert_array_equal(_echo[2](x=x, lnc=2, kernel=1), x + 3)
    np.testing.assert_array_equal(_echo(x, 1, 0), x + 1)
