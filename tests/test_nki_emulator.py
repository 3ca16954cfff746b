"""Self-tests of the NumPy NKI emulator (tkg.kernel.nki_emu).

Each emulated instruction is checked against NumPy, each enforced hardware / API rule has a test
that breaks it, the linter flags each forbidden construct, and LNC2 launches exchange data,
synchronise, and report deadlocks instead of hanging.
"""

from __future__ import annotations

import math
import time

import ml_dtypes
import numpy as np
import pytest
from hypothesis import given
from hypothesis import strategies as st

from tkg.kernel import nki_emu
from tkg.kernel.nki_emu import lint
from tkg.kernel.nki_emu.errors import (
    DeadlockError,
    DeadTensorError,
    LaunchError,
    NkiValidationError,
    OutOfBoundsError,
    PoisonError,
    RemovedApiError,
)

if not nki_emu.install():
    pytest.skip(
        "the real Neuron nki package is importable here; these tests target the emulator", allow_module_level=True
    )
import nki
import nki.isa as nisa
import nki.language as nl

BF16 = np.dtype(ml_dtypes.bfloat16)
RNG = np.random.default_rng(0)


def sb(values: np.ndarray, dtype=nl.float32, buffer=nl.sbuf, address=None):
    """A tile holding `values` (written directly: a test fixture, not an instruction)."""
    t = nl.ndarray(values.shape, dtype, buffer=buffer, address=address)
    t.write(np.asarray(values).astype(dtype.np))
    return t


def val(t) -> np.ndarray:
    return np.array(t.array())


@pytest.fixture
def s():
    with nki_emu.session() as prog:
        yield prog


# ---- install ---------------------------------------------------------------------------------
def test_install_registers_marked_modules_idempotently():
    assert nki_emu.install() and nki_emu.install()
    assert nki.__tkg_emulator__ and nl.__tkg_emulator__ and nisa.__tkg_emulator__
    assert nki.language is nl and nki.isa is nisa
    assert nl.float32 == "float32" and nl.bfloat16 != nl.float16


INSTALL_SCRIPT = """
import importlib, sys
from pathlib import Path
root = Path(sys.argv[1])
for name, body in (("placeholder", "raise ImportError('placeholder: install the Neuron SDK')"),
                   ("real", "REAL = True")):
    (root / name / "nki").mkdir(parents=True)
    (root / name / "nki" / "__init__.py").write_text(body)
from tkg.kernel import nki_emu
sys.path.insert(0, str(root / "placeholder"))
importlib.invalidate_caches()
assert nki_emu.install() is True
import nki
assert nki.__tkg_emulator__
nki_emu.uninstall()
assert "nki" not in sys.modules
sys.path[0] = str(root / "real")
importlib.invalidate_caches()
assert nki_emu.install() is False
import nki
assert getattr(nki, "REAL", False) and not getattr(nki, "__tkg_emulator__", False)
print("ok")
"""


def test_install_treats_placeholder_as_absent_and_leaves_a_real_nki_alone(tmp_path):
    import subprocess
    import sys

    proc = subprocess.run(
        [sys.executable, "-c", INSTALL_SCRIPT, str(tmp_path)], capture_output=True, text=True, timeout=120
    )
    assert proc.returncode == 0 and proc.stdout.strip() == "ok", proc.stderr


# ---- tensors and views -----------------------------------------------------------------------
def test_fresh_buffers_are_nan_or_garbage(s):
    assert np.isnan(val(nl.ndarray((4, 8), nl.float32))).all()
    assert np.isnan(val(nl.ndarray((4, 8), nl.bfloat16)).astype(np.float32)).all()
    assert (val(nl.ndarray((4, 8), nl.uint32)) == 0xA5A5A5A5).all()
    assert (val(nl.ndarray((2, 3), nl.uint8)) == 0xA5).all()


def test_indexing_and_views_follow_numpy(s):
    x = RNG.standard_normal((16, 6, 10)).astype(np.float32)
    t = sb(x)
    np.testing.assert_array_equal(val(t[2:9, 1, 3:10:2]), x[2:9, 1, 3:10:2])
    np.testing.assert_array_equal(val(t[:, 5::1, 0]), x[:, 5:, 0])
    assert t[3, 2, 4].shape == (1, 1)  # on chip: the partition dim stays, at least 2-D
    assert t[:, 0, 1].shape == (16, 1)
    np.testing.assert_array_equal(val(t[nl.ds(4, 3)]), x[4:7])
    flat = t.reshape((16, 60))
    np.testing.assert_array_equal(val(flat), x.reshape(16, 60))
    # .ap addresses the storage: (16, 10, 6) permutation, and a stride-0 broadcast of column 0.
    np.testing.assert_array_equal(val(t.ap([[60, 16], [1, 10], [10, 6]], offset=0)), x.transpose(0, 2, 1))
    np.testing.assert_array_equal(
        val(t.ap([[60, 16], [0, 3]], offset=7)), np.repeat(x.reshape(16, 60)[:, 7:8], 3, axis=1)
    )
    h = nl.ndarray((4, 5, 6), nl.float32, buffer=nl.shared_hbm)
    assert h[1].shape == (5, 6) and h[1, 2, 3].shape == (1,)
    assert h.reshape((20, 6)).shape == (20, 6)


@st.composite
def _indexed(draw):
    """A random on-chip shape and an index (ints / slices with steps / nl.ds) into it."""
    shape = tuple(draw(st.lists(st.integers(1, 6), min_size=2, max_size=4)))
    key = []
    for d, n in enumerate(shape):
        kind = draw(st.sampled_from(["int", "slice", "ds", "all"]))
        if kind == "int":
            key.append(draw(st.integers(-n, n - 1)))
        elif kind == "ds":
            a = draw(st.integers(0, n - 1))
            key.append(("ds", a, draw(st.integers(1, n - a))))
        elif kind == "slice":
            a = draw(st.integers(0, n - 1))
            b = draw(st.integers(a + 1, n))
            key.append(slice(a, b, 1 if d == 0 else draw(st.integers(1, 3))))
        else:
            key.append(slice(None))
    return shape, tuple(key)


@given(_indexed())
def test_views_match_numpy_indexing(case):
    shape, key = case
    x = np.arange(math.prod(shape), dtype=np.float32).reshape(shape)
    np_key = tuple(slice(k[1], k[1] + k[2]) if isinstance(k, tuple) else k for k in key)
    nki_key = tuple(nl.ds(k[1], k[2]) if isinstance(k, tuple) else k for k in key)
    with nki_emu.session():
        v = sb(x)[nki_key]
        got = val(v)
        assert got.shape == v.shape and len(v.shape) >= 2
        want = x[np_key]
        np.testing.assert_array_equal(got.reshape(-1), np.asarray(want).reshape(-1))
        # A DMA through HBM and back preserves row-major order whatever the shapes.
        h = nl.ndarray((got.size,), nl.float32, buffer=nl.shared_hbm)
        nisa.dma_copy(h, v)
        np.testing.assert_array_equal(val(h), got.reshape(-1))


def test_view_rules_raise(s):
    t = sb(np.zeros((8, 16), np.float32))
    with pytest.raises(NkiValidationError, match="partition pair"):
        t.ap([[8, 8], [1, 8]], offset=0)  # partition stride must be 16
    with pytest.raises(NkiValidationError, match="leaves the partition"):
        t.ap([[16, 4], [1, 17]], offset=0)
    with pytest.raises(NkiValidationError, match="step"):
        t[0:8:2, :]
    with pytest.raises(NkiValidationError, match="expected 0 <= start < stop"):
        t[:, 10:20]
    with pytest.raises(NkiValidationError, match="dim 0 must stay"):
        t.reshape((4, 32))
    with pytest.raises(NkiValidationError, match="not contiguous"):
        t[:, 0:16:2].reshape((8, 2, 4))


# ---- Tensor engine ---------------------------------------------------------------------------
def test_nc_matmul_and_accumulate_semantics(s):
    a = RNG.standard_normal((64, 32)).astype(BF16)
    b = RNG.standard_normal((64, 100)).astype(BF16)
    ref = a.astype(np.float32).T @ b.astype(np.float32)
    st, mv = sb(a, nl.bfloat16), sb(b, nl.bfloat16)
    ps = nl.ndarray((32, 100), nl.float32, buffer=nl.psum)
    with pytest.raises(NkiValidationError, match="no matmul has written"):
        nisa.nc_matmul(ps, st, mv, accumulate=True)
    nisa.nc_matmul(ps, st, mv)  # None: first write overwrites
    np.testing.assert_allclose(val(ps), ref, rtol=1e-5, atol=1e-4)
    nisa.nc_matmul(ps, st, mv)  # None: then accumulates
    np.testing.assert_allclose(val(ps), 2 * ref, rtol=1e-5, atol=1e-4)
    nisa.nc_matmul(ps, st, mv, accumulate=True)
    np.testing.assert_allclose(val(ps), 3 * ref, rtol=1e-5, atol=1e-4)
    nisa.nc_matmul(ps, st, mv, accumulate=False)
    np.testing.assert_allclose(val(ps), ref, rtol=1e-5, atol=1e-4)
    nisa.memset(ps, 0.0)  # a non-matmul write: accumulating onto it is undefined on trn2
    with pytest.raises(NkiValidationError, match="no matmul has written"):
        nisa.nc_matmul(ps, st, mv, accumulate=True)


def test_nc_matmul_limits(s):
    f32 = lambda shape, buf=nl.sbuf: sb(np.ones(shape, np.float32), buffer=buf)  # noqa: E731
    bf = lambda shape: sb(np.ones(shape, np.float32), nl.bfloat16)  # noqa: E731
    ps = lambda shape, dt=nl.float32: nl.ndarray(shape, dt, buffer=nl.psum)  # noqa: E731
    with pytest.raises(NkiValidationError, match="stationary free size 129 exceeds 128"):
        nisa.nc_matmul(ps((128, 4)), f32((16, 129)), f32((16, 4)))
    with pytest.raises(NkiValidationError, match="moving free size 513 exceeds 512"):
        nisa.nc_matmul(ps((4, 4)), f32((16, 4)), f32((16, 513)))
    with pytest.raises(NkiValidationError, match="contraction dim"):
        nisa.nc_matmul(ps((4, 8)), f32((16, 4)), f32((8, 8)))
    with pytest.raises(NkiValidationError, match=r"stationary: .* expected nl.sbuf"):
        nisa.nc_matmul(ps((4, 8)), ps((16, 4)), f32((16, 8)))  # PSUM cannot feed a matmul
    with pytest.raises(NkiValidationError, match=r"dst: .* expected nl.psum"):
        nisa.nc_matmul(f32((4, 8)), f32((16, 4)), f32((16, 8)))
    with pytest.raises(NkiValidationError, match="float32 in PSUM"):
        nisa.nc_matmul(ps((4, 8), nl.bfloat16), bf((16, 4)), bf((16, 8)))
    with pytest.raises(NkiValidationError, match="both must be"):
        nisa.nc_matmul(ps((4, 8)), f32((16, 4)), bf((16, 8)))
    with pytest.raises(NkiValidationError, match="expected 4 partitions"):
        nisa.nc_matmul(ps((8, 4)), f32((16, 4)), f32((16, 8)))
    two_banks = nl.ndarray((4, 1024), nl.float32, buffer=nl.psum, address=(0, 2048))
    with pytest.raises(NkiValidationError, match="cross PSUM banks"):
        nisa.nc_matmul(two_banks[:, 400:600], f32((16, 4)), f32((16, 200)))
    nisa.nc_matmul(two_banks[:, 512:712], f32((16, 4)), f32((16, 200)))  # inside the second bank: fine


def test_nc_transpose_tensor_and_vector_engines(s):
    x = RNG.standard_normal((96, 40)).astype(BF16)
    ps = nl.ndarray((40, 96), nl.bfloat16, buffer=nl.psum)
    nisa.nc_transpose(ps, sb(x, nl.bfloat16))
    np.testing.assert_array_equal(val(ps), x.T)
    y = RNG.standard_normal((32, 20)).astype(np.float32)
    dst = nl.ndarray((20, 32), nl.float32)
    nisa.nc_transpose(dst, sb(y))  # SBUF dst: Vector engine, <= 32x32
    np.testing.assert_array_equal(val(dst), y.T)
    with pytest.raises(NkiValidationError, match="at most 32 x 32"):
        nisa.nc_transpose(nl.ndarray((20, 64), nl.float32), sb(np.zeros((64, 20), np.float32)))
    with pytest.raises(NkiValidationError, match="must equal data dtype"):
        nisa.nc_transpose(nl.ndarray((40, 96), nl.float32, buffer=nl.psum), sb(x, nl.bfloat16))


# ---- Scalar engine ---------------------------------------------------------------------------
def test_activation_exp_bias_scale_and_reduce(s):
    x = RNG.standard_normal((8, 12)).astype(np.float32)
    bias = RNG.standard_normal((8, 1)).astype(np.float32)
    dst = nl.ndarray((8, 12), nl.float32)
    res = nl.ndarray((8, 1), nl.float32)
    nisa.activation(dst, op=nl.exp, data=sb(x), bias=sb(bias), scale=0.5, reduce_op=nl.add, reduce_res=res,
                    reduce_cmd=nisa.reduce_cmd.reset_reduce)  # fmt: skip
    want = np.exp(x * 0.5 + bias)
    np.testing.assert_allclose(val(dst), want, rtol=1e-6)
    np.testing.assert_allclose(val(res)[:, 0], want.sum(axis=1), rtol=1e-5)
    nisa.activation(dst, op=nl.exp, data=sb(x), reduce_op=nl.add, reduce_res=res, reduce_cmd=nisa.reduce_cmd.reduce)
    np.testing.assert_allclose(val(res)[:, 0], want.sum(axis=1) + np.exp(x).sum(axis=1), rtol=1e-5)
    col = nl.ndarray((8, 1), nl.float32)
    nisa.activation(col, op=nl.copy, data=sb(bias), scale=sb(np.full((8, 1), 2.0, np.float32)))
    np.testing.assert_array_equal(val(col), 2 * bias)
    nisa.activation(dst, op=nl.exp, data=sb(np.full((8, 12), -np.inf, np.float32)))
    assert (val(dst) == 0).all()


def test_activation_sin_range_and_bias_rules(s):
    dst = nl.ndarray((4, 3), nl.float32)
    nisa.activation(dst, op=nl.sin, data=sb(np.full((4, 3), 3.0, np.float32)))
    np.testing.assert_allclose(val(dst), np.sin(3.0), rtol=1e-6)
    with pytest.raises(NkiValidationError, match="outside its valid range"):
        nisa.activation(dst, op=nl.sin, data=sb(np.full((4, 3), 4.0, np.float32)))
    with pytest.raises(NkiValidationError, match="free size 1"):
        nisa.activation(dst, op=nl.exp, data=sb(np.zeros((4, 3), np.float32)), bias=sb(np.zeros((4, 3), np.float32)))
    with pytest.raises(NkiValidationError, match="not an activation function"):
        nisa.activation(dst, op=nl.add, data=sb(np.zeros((4, 3), np.float32)))
    with pytest.raises(NkiValidationError, match=r"nl.add only"):
        nisa.activation(dst, op=nl.exp, data=sb(np.zeros((4, 3), np.float32)), reduce_op=nl.maximum,
                        reduce_cmd=nisa.reduce_cmd.reset_reduce)  # fmt: skip


# ---- Vector / GpSimd engines -----------------------------------------------------------------
def test_tensor_reduce_trailing_axes_and_negate(s):
    x = RNG.standard_normal((16, 3, 4, 5)).astype(np.float32)
    t = sb(x)
    d = nl.ndarray((16, 12), nl.float32)
    nisa.tensor_reduce(d, op=nl.maximum, data=t, axis=3)
    np.testing.assert_array_equal(val(d), x.max(axis=3).reshape(16, 12))
    d1 = nl.ndarray((16, 1), nl.float32)
    nisa.tensor_reduce(d1, op=nl.add, data=t, axis=(1, 2, 3), negate=True)
    np.testing.assert_allclose(val(d1)[:, 0], -x.sum(axis=(1, 2, 3)), rtol=1e-5)
    perm = t.ap([[60, 16], [20, 3], [1, 5], [5, 4]], offset=0)  # (16, 3, 5, 4): x's axis 2 moved last
    d15 = nl.ndarray((16, 15), nl.float32)
    nisa.tensor_reduce(d15, op=nl.minimum, data=perm, axis=3)
    np.testing.assert_array_equal(val(d15), x.min(axis=2).reshape(16, 15))
    with pytest.raises(NkiValidationError, match="partition axis 0 cannot"):
        nisa.tensor_reduce(d1, op=nl.add, data=t, axis=0)
    with pytest.raises(NkiValidationError, match="trailing free axes"):
        nisa.tensor_reduce(nl.ndarray((16, 20), nl.float32), op=nl.add, data=t, axis=1)
    with pytest.raises(NkiValidationError, match="not a reduction operator"):
        nisa.tensor_reduce(d, op=nl.less, data=t, axis=3)


def test_tensor_tensor_ops_broadcast_views_and_psum_rule(s):
    a = RNG.standard_normal((8, 6)).astype(np.float32)
    b = RNG.standard_normal((8, 6)).astype(np.float32)
    ta, tb = sb(a), sb(b)
    for op, fn in ((nl.add, np.add), (nl.subtract, np.subtract), (nl.multiply, np.multiply), (nl.maximum, np.maximum)):
        d = nl.ndarray((8, 6), nl.float32)
        nisa.tensor_tensor(d, ta, tb, op=op)
        np.testing.assert_array_equal(val(d), fn(a, b))
    d = nl.ndarray((8, 6), nl.float32)
    nisa.tensor_tensor(d, ta, tb.ap([[6, 8], [0, 6]], offset=2), op=nl.subtract)  # column 2 broadcast
    np.testing.assert_array_equal(val(d), a - b[:, 2:3])
    cmp = nl.ndarray((8, 6), nl.uint8)
    nisa.tensor_tensor(cmp, ta, tb, op=nl.greater)
    np.testing.assert_array_equal(val(cmp), (a > b).astype(np.uint8))
    u = sb(np.arange(48, dtype=np.uint32).reshape(8, 6), nl.uint32)
    du = nl.ndarray((8, 6), nl.uint32)
    nisa.tensor_tensor(du, u, sb(np.full((8, 6), 0x100, np.uint32), nl.uint32), op=nl.bitwise_or)
    np.testing.assert_array_equal(val(du), np.arange(48, dtype=np.uint32).reshape(8, 6) | 0x100)
    p1, p2 = sb(a, buffer=nl.psum), sb(b, buffer=nl.psum)
    with pytest.raises(NkiValidationError, match="both in PSUM"):
        nisa.tensor_tensor(d, p1, p2, op=nl.add)
    nisa.tensor_tensor(d, p1, tb, op=nl.add)  # one PSUM input is fine
    with pytest.raises(NkiValidationError, match="elements per partition"):
        nisa.tensor_tensor(d, ta, sb(np.zeros((8, 5), np.float32)), op=nl.add)
    with pytest.raises(NkiValidationError, match="compute engines never touch HBM"):
        nisa.tensor_tensor(d, ta, nl.ndarray((8, 6), nl.float32, buffer=nl.shared_hbm), op=nl.add)


def test_tensor_scalar_and_scalar_tensor_tensor(s):
    x = RNG.standard_normal((8, 5)).astype(np.float32)
    col = RNG.standard_normal((8, 1)).astype(np.float32)
    d = nl.ndarray((8, 5), nl.float32)
    nisa.tensor_scalar(d, sb(x), op0=nl.multiply, operand0=sb(col), op1=nl.add, operand1=2.0)
    np.testing.assert_allclose(val(d), x * col + 2.0, rtol=1e-6)
    nisa.tensor_scalar(d, sb(x), op0=nl.subtract, operand0=1.0, reverse0=True)
    np.testing.assert_allclose(val(d), 1.0 - x, rtol=1e-6)
    m = nl.ndarray((8, 5), nl.uint8)
    nisa.tensor_scalar(m, sb(x), op0=nl.less, operand0=sb(col))
    np.testing.assert_array_equal(val(m), (x < col).astype(np.uint8))
    u = nl.ndarray((8, 5), nl.uint32)
    nisa.tensor_scalar(u, sb(np.arange(40, dtype=np.uint32).reshape(8, 5), nl.uint32), op0=nl.left_shift, operand0=3)
    np.testing.assert_array_equal(val(u), np.arange(40, dtype=np.uint32).reshape(8, 5) << 3)
    y = RNG.standard_normal((8, 5)).astype(np.float32)
    nisa.scalar_tensor_tensor(d, data=sb(x), op0=nl.multiply, operand0=-3.0, op1=nl.add, operand1=sb(y))
    np.testing.assert_allclose(val(d), x * -3.0 + y, rtol=1e-6)
    with pytest.raises(NkiValidationError, match="must be float32"):
        nisa.tensor_scalar(d, sb(x), op0=nl.add, operand0=sb(col, nl.bfloat16))
    with pytest.raises(NkiValidationError, match=r"expected a \(8, 1\) tile"):
        nisa.tensor_scalar(d, sb(x), op0=nl.add, operand0=sb(x))
    with pytest.raises(NkiValidationError, match="both be arithmetic or both bit-vector"):
        nisa.tensor_scalar(u, u, op0=nl.left_shift, operand0=1, op1=nl.add, operand1=1.0)


def test_tensor_copy_casts_and_predicated_copy(s):
    x = np.array([[2.5, 3.5, -2.5, 1e10, -1e10, np.nan, 0.49, 7.0]], np.float32)
    i = nl.ndarray((1, 8), nl.int32)
    nisa.tensor_copy(i, sb(x))  # round to nearest even, saturate, NaN -> 0
    np.testing.assert_array_equal(val(i), [[2, 4, -2, 2**31 - 1, -(2**31), 0, 0, 7]])
    back = nl.ndarray((1, 8), nl.float32)
    nisa.tensor_copy(back, i)
    assert val(back)[0, 0] == 2.0
    b = nl.ndarray((1, 8), nl.bfloat16)
    nisa.tensor_copy(b, sb(np.array([[1 + 2**-8, 1 + 3 * 2**-8, 0, 0, 0, 0, 0, 0]], np.float32)))
    np.testing.assert_array_equal(val(b).astype(np.float32)[0, :2], [1.0, 1 + 2**-6])  # RNE at bf16 precision
    src = RNG.standard_normal((4, 6)).astype(np.float32)
    pred = (RNG.random((4, 6)) > 0.5).astype(np.uint8)
    dst = sb(np.full((4, 6), -np.inf, np.float32))
    nisa.tensor_copy_predicated(dst, sb(src, buffer=nl.psum), sb(pred, nl.uint8))
    np.testing.assert_array_equal(val(dst), np.where(pred != 0, src, -np.inf))
    nisa.tensor_copy_predicated(dst, 5.0, sb(pred, nl.uint8), reverse_pred=True)
    np.testing.assert_array_equal(val(dst), np.where(pred != 0, src, 5.0))
    with pytest.raises(NkiValidationError, match="predicate dtype"):
        nisa.tensor_copy_predicated(dst, sb(src), sb(pred, nl.int32))
    with pytest.raises(NkiValidationError, match="both in PSUM"):
        nisa.tensor_copy_predicated(dst, sb(src, buffer=nl.psum), sb(pred, nl.uint8, buffer=nl.psum))


def test_memset_iota_reciprocal(s):
    f = nl.ndarray((4, 3), nl.float32)
    nisa.memset(f, float("-inf"))
    assert (val(f) == -np.inf).all()
    u = nl.ndarray((4, 3), nl.uint8)
    nisa.memset(u, 1)
    assert (val(u) == 1).all()
    with pytest.raises(NkiValidationError, match="integer literal"):
        nisa.memset(u, 1.0)
    ident = nl.ndarray((8, 8), nl.int32)
    nisa.iota(ident, pattern=[[-1, 8]], offset=0, channel_multiplier=1)  # p - f
    np.testing.assert_array_equal(val(ident), np.arange(8)[:, None] - np.arange(8)[None, :])
    two = nl.ndarray((4, 6), nl.uint32)
    nisa.iota(two, pattern=[[100, 2], [1, 3]], offset=5, channel_multiplier=10)
    want = 5 + 10 * np.arange(4)[:, None, None] + 100 * np.arange(2)[None, :, None] + np.arange(3)[None, None, :]
    np.testing.assert_array_equal(val(two), want.reshape(4, 6))
    with pytest.raises(NkiValidationError, match="covers 5 elements"):
        nisa.iota(two, pattern=[[1, 5]])
    with pytest.raises(NkiValidationError, match=r"expected nl.sbuf"):
        nisa.iota(nl.ndarray((4, 6), nl.int32, buffer=nl.psum), pattern=[[1, 6]])
    r = nl.ndarray((4, 3), nl.float32)
    x = RNG.uniform(0.5, 2.0, (4, 3)).astype(np.float32)
    nisa.reciprocal(r, sb(x))
    np.testing.assert_allclose(val(r), 1 / x, rtol=1e-6)


def test_selection_and_vector_accumulator_instructions(s):
    x = RNG.standard_normal((8, 16)).astype(np.float32)
    d = nl.ndarray((8, 16), nl.float32)
    nisa.affine_select(d, pattern=[[-1, 16]], channel_multiplier=1, on_true_tile=sb(x), on_false_value=-1e30,
                       cmp_op=nl.greater_equal)  # fmt: skip
    causal = np.arange(8)[:, None] - np.arange(16)[None, :] >= 0
    np.testing.assert_array_equal(val(d), np.where(causal, x, np.float32(-1e30)))
    lo = np.array([[2], [0], [5], [1], [0], [3], [7], [4]], np.float32)
    hi = lo + 6
    red = nl.ndarray((8, 1), nl.float32)
    nisa.range_select(d, sb(x), nl.greater_equal, nl.less, sb(lo), sb(hi), reduce_res=red)
    j = np.arange(16)[None, :]
    keep = (j >= lo) & (j < hi)
    fmin = np.finfo(np.float32).min
    np.testing.assert_array_equal(val(d), np.where(keep, x, fmin))
    np.testing.assert_array_equal(val(red)[:, 0], np.where(keep, x, fmin).max(axis=1))
    with pytest.raises(NkiValidationError, match="must be FP32_MIN"):
        nisa.range_select(d, sb(x), nl.greater_equal, nl.less, sb(lo), sb(hi), on_false_value=-1.0)
    pred = (RNG.random((8, 16)) > 0.3).astype(np.uint8)
    nisa.select_reduce(d, sb(pred, nl.uint8), sb(x), -5.0, reduce_res=red, reduce_cmd=nisa.reduce_cmd.reset_reduce)
    np.testing.assert_array_equal(val(d), np.where(pred != 0, x, -5.0))
    np.testing.assert_array_equal(val(red)[:, 0], np.where(pred != 0, x, -5.0).max(axis=1))
    nisa.tensor_scalar_reduce(d, sb(x), op0=nl.multiply, operand0=2.0, reduce_op=nl.add, reduce_res=red,
                              reduce_res_negate=True)  # fmt: skip
    np.testing.assert_allclose(val(red)[:, 0], -(2 * x).sum(axis=1), rtol=1e-5)
    nisa.tensor_scalar_reduce(d, sb(x), op0=nl.add, operand0=0.0, reduce_op=nl.maximum, reduce_res=red,
                              reduce_cmd=nisa.reduce_cmd.load_reduce, reduce_init=1.5)  # fmt: skip
    np.testing.assert_array_equal(val(red)[:, 0], np.maximum(1.5, x.max(axis=1)))
    top = nl.ndarray((8, 8), nl.float32)
    nisa.max8(top, sb(x))
    np.testing.assert_array_equal(val(top), -np.sort(-x, axis=1)[:, :8])
    data = np.tile(np.array([3, 1, 3, 2, 5, 3, 0, 9, 4, 4], np.float32), (2, 1))
    want = np.array([3, 3, 3, 3, 9, 4, 4, 0], np.float32)
    idx = nl.ndarray((2, 8), nl.uint32)
    nisa.nc_find_index8(idx, sb(data), sb(np.tile(want, (2, 1))))
    m = 0xFFFFFFFF
    np.testing.assert_array_equal(val(idx)[0], [0, 2, 5, m, 7, 8, 9, 6])


def test_on_chip_memory_is_private_and_shared_hbm_pairs_by_name():
    held = {}

    @nki.jit
    def leak(x):
        pid = nl.program_id(0)
        t = nl.ndarray((4, 4), nl.float32)
        nisa.memset(t, float(pid))
        held[pid] = t
        nisa.core_barrier(x, (0, 1))
        if pid == 1:
            nisa.tensor_copy(t, held[0])
        return x

    @nki.jit
    def mismatched(x):
        pid = nl.program_id(0)
        out = nl.ndarray((4, 4 + pid), nl.float32, buffer=nl.shared_hbm, name="out")
        return out

    x = np.zeros((4, 4), np.float32)
    with pytest.raises(NkiValidationError, match="belongs to program 0, this is program 1"):
        leak[2](x)
    with pytest.raises(NkiValidationError, match="allocate their shared_hbm tensors identically"):
        mismatched[2](x)


# ---- DMA ---------------------------------------------------------------------------------
@nki.jit
def _gather_kernel(pool, ids, oob):
    """out[p, :] = pool[ids[p], :, :] flattened (indirect DMA), via SBUF."""
    bl = pool.shape[1]
    d = pool.shape[2]
    P = ids.shape[0]
    idx = nl.ndarray((P, 1), nl.uint32)
    nisa.dma_copy(idx, ids)
    rows = nl.ndarray((P, bl * d), pool.dtype)
    nisa.memset(rows, -1.0)
    src = pool.ap([[bl * d, P], [1, bl * d]], offset=0, vector_offset=idx, indirect_dim=0)
    mode = nisa.oob_mode.skip if oob else nisa.oob_mode.error
    nisa.dma_copy(rows, src, oob_mode=mode, dge_mode=nisa.dge_mode.swdge)
    out = nl.ndarray((P, bl, d), pool.dtype, buffer=nl.shared_hbm, name="out")
    nisa.dma_copy(out, rows)
    return out


def test_indirect_gather_bounds_and_skip():
    pool = RNG.standard_normal((10, 4, 3)).astype(np.float32)
    ids = np.array([[3], [0], [9], [3], [7]], dtype=np.uint32)
    out = _gather_kernel(pool, ids, False)
    np.testing.assert_array_equal(out, pool[ids[:, 0]])
    st = nki_emu.last_run_stats()
    p = st.programs[0]
    assert p.hbm_read_bytes == ids.nbytes + pool[ids[:, 0]].nbytes
    assert p.hbm_write_bytes == out.nbytes
    assert p.dma_queues == {"unknown": 2, "swdge": 1} and p.instructions["dma"] == 3
    bad = ids.copy()
    bad[2, 0] = 10
    with pytest.raises(OutOfBoundsError, match=r"index 10 at partition 2 .* size 10"):
        _gather_kernel(pool, bad, False)
    skipped = _gather_kernel(pool, bad, True)
    np.testing.assert_array_equal(skipped[[0, 1, 3, 4]], pool[bad[[0, 1, 3, 4], 0]])
    assert (skipped[2] == -1.0).all()  # the skipped row keeps dst's old contents


def test_dma_copy_shapes_casts_and_rules(s):
    h = nl.ndarray((2, 3, 4), nl.float32, buffer=nl.shared_hbm)
    x = RNG.standard_normal((2, 3, 4)).astype(np.float32)
    h.write(x)
    t = nl.ndarray((6, 4), nl.bfloat16)
    nisa.dma_copy(t, h)  # shape-flexible (same element count), cast through fp32
    np.testing.assert_array_equal(val(t), x.reshape(6, 4).astype(BF16))
    bc = nl.ndarray((5, 4), nl.float32)
    nisa.dma_copy(bc, h.ap([[0, 5], [1, 4]], offset=4))  # stride-0 broadcast read of row (0, 1)
    np.testing.assert_array_equal(val(bc), np.repeat(x[0, 1:2], 5, axis=0))
    with pytest.raises(NkiValidationError, match="expected equal counts"):
        nisa.dma_copy(nl.ndarray((5, 5), nl.float32), h)
    ps = sb(np.zeros((6, 4), np.float32), buffer=nl.psum)
    with pytest.raises(NkiValidationError, match="DMA cannot read PSUM"):
        nisa.dma_copy(h, ps)
    with pytest.raises(NkiValidationError, match="hwdge needs equal dtypes"):
        nisa.dma_copy(t, h, dge_mode=nisa.dge_mode.hwdge)
    with pytest.raises(NkiValidationError, match="expected an enum member"):
        nisa.dma_copy(t, h, dge_mode=3)
    idx = sb(np.zeros((2, 1), np.uint32), nl.uint32)
    with pytest.raises(NkiValidationError, match="dge_mode=none"):
        nisa.dma_copy(nl.ndarray((2, 12), nl.float32), h.ap([[12, 2], [1, 12]], offset=0, vector_offset=idx),
                      dge_mode=nisa.dge_mode.none)  # fmt: skip


def test_indirect_scatter_scalar_offset_and_transpose_mode(s):
    h = nl.ndarray((6, 4), nl.float32, buffer=nl.shared_hbm)
    h.write(np.zeros((6, 4), np.float32))
    idx = sb(np.array([[5], [0], [2]], np.uint32), nl.uint32)
    src = sb(np.arange(12, dtype=np.float32).reshape(3, 4))
    nisa.dma_copy(h.ap([[4, 3], [1, 4]], offset=0, vector_offset=idx, indirect_dim=0), src)  # scatter rows
    want = np.zeros((6, 4), np.float32)
    want[[5, 0, 2]] = np.arange(12, dtype=np.float32).reshape(3, 4)
    np.testing.assert_array_equal(val(h), want)
    so = sb(np.array([[2]], np.int32), nl.int32)
    dst = nl.ndarray((2, 4), nl.float32)
    nisa.dma_copy(dst, h.ap([[4, 2], [1, 4]], offset=0, scalar_offset=so, indirect_dim=0))  # rows 2..3
    np.testing.assert_array_equal(val(dst), want[2:4])
    x = np.arange(128).reshape(16, 8).astype(BF16)
    ps = nl.ndarray((8, 16), nl.bfloat16, buffer=nl.psum)
    nisa.nc_matmul(ps, sb(x, nl.bfloat16), sb(np.eye(16, dtype=np.float32), nl.bfloat16), is_transpose=True)
    np.testing.assert_array_equal(val(ps), x.T)
    with pytest.raises(NkiValidationError, match="identity"):
        nisa.nc_matmul(ps, sb(x, nl.bfloat16), sb(np.ones((16, 16), np.float32), nl.bfloat16), is_transpose=True)


def test_nl_wrappers(s):
    t = sb(np.full((4, 4), 2.0, np.float32))
    np.testing.assert_allclose(val(nl.exp(t)), np.exp(2.0), rtol=1e-6)
    assert val(nl.add(t, 1.0))[0, 0] == 3.0 and nl.sum(t, axis=1).shape == (4, 1)
    assert val(nl.copy(t))[0, 0] == 2.0
    h = nl.ndarray((4, 4), nl.float32, buffer=nl.shared_hbm)
    h.write(np.ones((4, 4), np.float32))
    nl.store(h, nl.multiply(nl.load(h), t))
    np.testing.assert_array_equal(val(h), 2.0)
    np.testing.assert_array_equal(val(nl.matmul(t, t, transpose_x=True)), 16.0)
    np.testing.assert_array_equal(val(nl.full((2, 2), 3.0, nl.int32)), 3)
    with pytest.raises(NkiValidationError, match="no broadcasting"):
        nl.add(t, sb(np.ones((4, 2), np.float32)))


def test_dma_runs_follow_contiguity():
    with nki_emu.session() as prog:
        h = nl.ndarray((16, 64), nl.float32, buffer=nl.shared_hbm)
        h.write(np.zeros((16, 64), np.float32))
        t = nl.ndarray((16, 32), nl.float32)
        nisa.dma_copy(t, h.ap([[64, 16], [2, 32]], offset=0))  # every other element: 4-byte runs
        assert (prog.stats.dma_runs, prog.stats.dma_charged_bytes) == (16 * 32, 16 * 32 * 256)
        nisa.dma_copy(t, h[:, 0:32])  # one 128-byte run per partition
        assert prog.stats.dma_runs == 16 * 32 + 16 and prog.stats.dma_small_run_bytes == 2 * 16 * 32 * 4
        nisa.dma_copy(nl.ndarray((1, 1024), nl.float32), h)  # a single 4 KiB run on both sides
        assert prog.stats.dma_runs == 16 * 32 + 16 + 1
        assert prog.stats.dma_charged_bytes == 16 * 32 * 256 + 16 * 256 + 4096


def test_dma_transpose(s):
    h = nl.ndarray((16, 24), nl.bfloat16, buffer=nl.shared_hbm)
    x = RNG.standard_normal((16, 24)).astype(BF16)
    h.write(x)
    dst = nl.ndarray((24, 16), nl.bfloat16)
    nisa.dma_transpose(dst, h)
    np.testing.assert_array_equal(val(dst), x.T)
    with pytest.raises(NkiValidationError, match="permuted src shape"):
        nisa.dma_transpose(nl.ndarray((16, 24), nl.bfloat16), h)


def test_reading_unwritten_memory_is_poison_and_error_mode_refuses(s, monkeypatch: pytest.MonkeyPatch):
    from tkg.kernel.nki_emu import tensor

    t = nl.ndarray((4, 8), nl.float32, name="half")
    nisa.memset(t[:, 0:4], 1.0)
    d = nl.ndarray((4, 8), nl.float32)
    assert s.poison_reads == 0
    nisa.tensor_copy(d, t)  # legal: the unwritten half reads as poison (NaN), and the read is noted
    np.testing.assert_array_equal(val(d)[:, 0:4], 1.0)
    assert np.isnan(val(d)[:, 4:]).all()
    assert s.poison_reads == 1
    assert "nisa.tensor_copy: src: reads 16 element(s) of 'half'" in s.first_poison_read
    assert "first at view index (0, 4)" in s.first_poison_read
    monkeypatch.setattr(tensor, "UNINIT_MODE", "error")
    with pytest.raises(NkiValidationError, match=r"src: reads 16 element\(s\) of 'half'.*first at view index \(0, 4\)"):
        nisa.tensor_copy(nl.ndarray((4, 8), nl.float32), t)
    ps = nl.ndarray((4, 8), nl.float32, buffer=nl.psum)
    with pytest.raises(NkiValidationError, match="data1: reads 32"):
        nisa.tensor_tensor(nl.ndarray((4, 8), nl.float32), ps, t, op=nl.add)


@nki.jit
def _stale_lanes_kernel(x, leak):
    """Computes on a tile whose last 2 partitions were never written; outputs those lanes iff `leak`."""
    out = nl.ndarray((4, 4), nl.float32, buffer=nl.shared_hbm, name="out")
    t = nl.ndarray((4, 4), nl.float32, name="partly")
    nisa.dma_copy(t[0:2, :], x[0:2, :])
    y = nl.ndarray((4, 4), nl.float32, name="y")
    nisa.tensor_scalar(y, t, nl.multiply, 2.0)  # reads the stale lanes too, as hardware would
    z = nl.ndarray((4, 4), nl.float32, name="z")
    nisa.memset(z, 0.0)
    nisa.tensor_copy(z[0:4 if leak else 2, :], y[0:4 if leak else 2, :])
    nisa.dma_copy(out, z)
    return out


def test_poison_that_never_reaches_an_output_passes():
    x = np.arange(16, dtype=np.float32).reshape(4, 4)
    out = _stale_lanes_kernel(x, False)
    np.testing.assert_array_equal(out[0:2], 2 * x[0:2])
    np.testing.assert_array_equal(out[2:4], 0.0)


def test_poison_reaching_an_output_fails_naming_the_first_reader():
    x = np.arange(16, dtype=np.float32).reshape(4, 4)
    with pytest.raises(PoisonError, match=r"returned tensor 'out': 8 of 16 element\(s\) are NaN computed from "
                                          r"never-written memory .*the first: program 0: nisa.tensor_scalar: data: "
                                          r"reads 8 element\(s\) of 'partly'"):  # fmt: skip
        _stale_lanes_kernel(x, True)


@nki.jit
def _partial_output_kernel(x):
    out = nl.ndarray((4, 4), nl.float32, buffer=nl.shared_hbm, name="out")
    t = nl.ndarray((2, 4), nl.float32)
    nisa.dma_copy(t, x[0:2, :])
    nisa.dma_copy(out[0:2, :], t)
    return out


def test_partially_written_output_raises():
    with pytest.raises(NkiValidationError, match="returned tensor 'out': reads 8 element"):
        _partial_output_kernel(np.zeros((4, 4), np.float32))


# ---- memory: address= placement, capacity, dead tensors --------------------------------------
def test_explicit_addresses_capacity_and_reuse(s):
    usable = nl.tile_size.total_available_sbuf_size
    nl.ndarray((128, usable // 4), nl.float32, address=(0, 0))  # exactly fills the usable bytes
    with pytest.raises(NkiValidationError, match=r"overflow the .* usable bytes"):
        nl.ndarray((128, 16), nl.float32, address=(0, usable - 32))
    with pytest.raises(NkiValidationError, match="exceeds 128"):
        nl.ndarray((64, 4), nl.float32, address=(96, 0))
    with pytest.raises(NkiValidationError, match="expected <= 128"):
        nl.ndarray((129, 4), nl.float32)
    with pytest.raises(NkiValidationError, match="bank boundary"):
        nl.ndarray((128, 4), nl.float32, buffer=nl.psum, address=(0, 1024))
    with pytest.raises(NkiValidationError, match="overflow the 16384 bytes"):
        nl.ndarray((128, 1024), nl.float32, buffer=nl.psum, address=(0, 7 * 2048))
    with pytest.raises(NkiValidationError, match="exceed the 16384 bytes of PSUM"):
        nl.ndarray((128, 4097), nl.float32, buffer=nl.psum)
    a = nl.ndarray((128, 64), nl.float32, address=(0, 1024), name="a")
    b = nl.ndarray((128, 64), nl.float32, address=(0, 1024 + 256), name="b")  # disjoint
    c = nl.ndarray((64, 16), nl.bfloat16, address=(64, 1024 + 200), name="c")  # overlaps a's tail only
    nisa.memset(b, 1.0)
    nisa.memset(c, 2.0)
    with pytest.raises(DeadTensorError, match=r"'a' .* re-allocated to 'c'"):
        nisa.memset(a, 0.0)
    with pytest.raises(DeadTensorError):
        nisa.tensor_copy(b, a[0:128, 0:4].reshape((128, 4)).ap([[64, 128], [1, 64]], offset=0))


def test_start_partition_rule_on_trn1(monkeypatch):
    monkeypatch.setenv("NEURON_PLATFORM_TARGET_OVERRIDE", "trn1")
    with nki_emu.session():
        assert nisa.get_nc_version() == nisa.nc_version.gen2 and nisa.get_nc_version() < 3
        t = nl.ndarray((128, 4), nl.float32)
        nisa.memset(t[64:128, :], 0.0)
        nisa.memset(t[96:128, :], 0.0)
        with pytest.raises(NkiValidationError, match="starting at partition 16"):
            nisa.memset(t[16:48, :], 0.0)
        nisa.memset(t, 0.0)
        with pytest.raises(NkiValidationError, match="scalar bias needs trn2"):
            nisa.activation(t, op=nl.exp, data=t, bias=1.0)


# ---- legacy / removed APIs -------------------------------------------------------------------
def test_removed_apis_raise_clear_errors(s):
    t = nl.ndarray((4, 4), nl.float32)
    with pytest.raises(RemovedApiError, match="masking was removed"):
        nisa.memset(t, 0.0, mask=None)
    with pytest.raises(RemovedApiError, match="dst tensor's dtype decides"):
        nisa.tensor_copy(t, t, dtype=nl.float32)
    with pytest.raises(RemovedApiError, match=r"nl.arange was removed"):
        nl.arange(4)
    with pytest.raises(RemovedApiError, match=r"removed in NKI 0.4"):
        nisa.tensor_copy_dynamic_src(t, t)
    with pytest.raises(RemovedApiError, match=r"use nki\.simulate"):
        nki.simulate_kernel(None)
    with pytest.raises(RemovedApiError, match="platform_target"):
        nki.jit(platform_target="trn2")(lambda: None)
    with pytest.raises(NkiValidationError, match="string buffer names"):
        nl.ndarray((4, 4), nl.float32, buffer="sbuf")
    with pytest.raises(NkiValidationError, match="not an NKI dtype"):
        nl.ndarray((4, 4), np.float32)


# ---- LNC2 ------------------------------------------------------------------------------------
@nki.jit
def _swap_kernel(x):
    """Each program loads its half of x, swaps it with the partner, writes the result to its half."""
    pid = nl.program_id(0)
    n = nl.num_programs(0)
    F = x.shape[1]
    P = x.shape[0]
    h = F // n
    mine = nl.ndarray((P, h), x.dtype, name="mine")
    nisa.dma_copy(mine, x[:, pid * h : (pid + 1) * h])
    got = nl.ndarray((P, h), x.dtype, name="got")
    if n > 1:
        nisa.sendrecv(src=mine, dst=got, send_to_rank=1 - pid, recv_from_rank=1 - pid, pipe_id=0)
    else:
        nisa.tensor_copy(got, mine)
    out = nl.ndarray((P, F), x.dtype, buffer=nl.shared_hbm, name="out")
    nisa.dma_copy(out[:, pid * h : (pid + 1) * h], got)
    if n > 1:
        nisa.core_barrier(out, (0, 1))
    return out


def test_lnc2_sendrecv_and_barrier_exchange_halves():
    x = RNG.standard_normal((16, 8)).astype(np.float32)
    out = _swap_kernel[2](x)
    np.testing.assert_array_equal(out, np.concatenate([x[:, 4:], x[:, :4]], axis=1))
    st = nki_emu.last_run_stats()
    assert st.lnc == 2 and len(st.programs) == 2
    for p in st.programs:
        assert p.sendrecv_bytes == 16 * 4 * 4 and p.by_instruction["sendrecv"] == 1
        assert p.hbm_read_bytes == 16 * 4 * 4 and p.hbm_write_bytes == 16 * 4 * 4
    np.testing.assert_array_equal(_swap_kernel(x), x)  # one program: no exchange


@nki.jit
def _deadlock_kernel(x, mode):
    pid = nl.program_id(0)
    t = nl.ndarray((4, 4), nl.float32)
    nisa.memset(t, 1.0)
    if mode == "early" and pid == 1:
        return x
    pipe = pid if mode == "pipes" else 0
    nisa.sendrecv(t, t, send_to_rank=1 - pid, recv_from_rank=1 - pid, pipe_id=pipe)
    if mode == "fail" and pid == 0:
        raise ValueError("boom in program 0")
    nisa.core_barrier(x, (0, 1))
    return x


@pytest.mark.parametrize(
    ("mode", "exc", "msg"),
    [
        ("early", DeadlockError, "partner program 1 finished without the matching call"),
        ("pipes", DeadlockError, "every program waits for a message nobody sends"),
        ("fail", ValueError, "boom in program 0"),
    ],
)
def test_lnc2_deadlock_detected_not_hung(mode, exc, msg):
    x = np.zeros((4, 4), np.float32)
    t0 = time.monotonic()
    with pytest.raises(exc, match=msg):
        _deadlock_kernel[2](x, mode)
    assert time.monotonic() - t0 < 5.0, "deadlock detection should not wait for the timeout"


def test_lnc_rules():
    x = np.zeros((4, 4), np.float32)
    with pytest.raises(NkiValidationError, match="needs an LNC=2 launch"):
        _deadlock_kernel(x, "x")
    with pytest.raises(LaunchError, match="expected 1 or 2"):
        _swap_kernel[4](x)
    with pytest.raises(LaunchError, match="pass a tuple"):
        _swap_kernel([1, 2])


@nki.jit
def _sendrecv_rules_kernel(x, mode):
    pid = nl.program_id(0)
    big = nl.ndarray((4, 300), nl.float32)  # 1200 bytes per partition
    nisa.memset(big, 0.0)
    if mode == "gpsimd":
        nisa.sendrecv(big, big, send_to_rank=1 - pid, recv_from_rank=1 - pid, pipe_id=0,
                      dma_engine=nisa.dma_engine.gpsimd_dma)  # fmt: skip
    elif mode == "shape":
        nisa.sendrecv(big[:, 0 : 4 + pid], big[:, 8 : 12 + pid], send_to_rank=1 - pid, recv_from_rank=1 - pid,
                      pipe_id=0)  # fmt: skip
    elif mode == "self":
        nisa.sendrecv(big, big, send_to_rank=pid, recv_from_rank=1 - pid, pipe_id=0)
    return x


@pytest.mark.parametrize(
    ("mode", "msg"),
    [
        ("gpsimd", "gpsimd_dma moves at most 1024 bytes per partition"),
        ("shape", r"program 1 sent \[4, 5\] float32 .* this program's dst is \[4, 4\]"),
        ("self", "is this program itself"),
    ],
)
def test_sendrecv_rules(mode, msg):
    with pytest.raises(NkiValidationError, match=msg):
        _sendrecv_rules_kernel[2](np.zeros((2, 2), np.float32), mode)


def test_broadcast_dst_and_lnc2_on_trn1_rejected(monkeypatch):
    with nki_emu.session():
        t = sb(np.zeros((4, 1), np.float32))
        with pytest.raises(NkiValidationError, match="stride-0"):
            nisa.memset(t.ap([[1, 4], [0, 3]], offset=0), 1.0)
    monkeypatch.setenv("NEURON_PLATFORM_TARGET_OVERRIDE", "trn1")
    with pytest.raises(LaunchError, match="LNC=2 needs trn2"):
        _swap_kernel[2](np.zeros((4, 4), np.float32))


def test_launch_outputs_must_be_shared_hbm_and_subkernels_plain():
    @nki.jit
    def returns_sbuf(x):
        return nl.ndarray((4, 4), nl.float32)

    @nki.jit
    def calls_jitted(x):
        return _swap_kernel(x)

    x = np.zeros((4, 4), np.float32)
    with pytest.raises(LaunchError, match=r"buffer=nl.shared_hbm"):
        returns_sbuf(x)
    with pytest.raises(LaunchError, match="sub-kernels must be plain functions"):
        calls_jitted(x)


# ---- counters and the estimate ---------------------------------------------------------------
@nki.jit
def _tiny_kernel(a, b):
    sa = nl.ndarray(a.shape, a.dtype)
    sbt = nl.ndarray(b.shape, b.dtype)
    nisa.dma_copy(sa, a)
    nisa.dma_copy(sbt, b)
    ps = nl.ndarray((a.shape[1], b.shape[1]), nl.float32, buffer=nl.psum)
    nisa.nc_matmul(ps, sa, sbt, accumulate=False)
    res = nl.ndarray(ps.shape, nl.float32)
    nisa.tensor_copy(res, ps)
    nisa.activation(res, op=nl.exp, data=res)
    out = nl.ndarray(ps.shape, nl.float32, buffer=nl.shared_hbm)
    nisa.dma_copy(out, res)
    return out


def test_counters_and_estimate():
    a = RNG.standard_normal((128, 64)).astype(BF16)
    b = RNG.standard_normal((128, 256)).astype(BF16)
    with nki_emu.collect_stats() as runs:
        out = _tiny_kernel(a, b)
        _tiny_kernel(a, b)
    np.testing.assert_allclose(out, np.exp(a.astype(np.float32).T @ b.astype(np.float32)), rtol=1e-4)
    assert len(runs) == 2
    p = nki_emu.last_run_stats().programs[0]
    assert p.instructions == {"tensor": 1, "vector": 1, "scalar": 1, "gpsimd": 0, "dma": 3}
    assert p.hbm_read_bytes == a.nbytes + b.nbytes and p.hbm_write_bytes == out.nbytes
    assert p.engine_cycles["tensor"] == 256  # max(N=256, 64) cycles for bf16
    assert p.psum_banks_used == 1
    # Runs per partition: a 64 bf16 = 128 B (overhead-bound, charged as 256 B), b 512 B, out 1 KiB.
    assert p.dma_runs == 128 + 128 + 64 and p.dma_small_run_bytes == a.nbytes
    assert p.dma_charged_bytes == 128 * 256 + b.nbytes + out.nbytes
    e = nki_emu.estimate(nki_emu.last_run_stats())
    assert "ESTIMATE" in e.label and e.target == "trn2"
    hbm = a.nbytes + b.nbytes + out.nbytes
    assert e.hbm_bytes == hbm and math.isclose(e.hbm_floor_s, hbm / (2.9e12 / 8))
    assert e.estimate_s >= e.hbm_floor_s and e.serial_s >= e.estimate_s
    assert e.programs[0].busiest == "dma"  # 3 transfers' fixed cost dominate this tiny kernel
    assert "ESTIMATE" in nki_emu.format_estimate(e)
    assert "tensor=1 vector=1 scalar=1 gpsimd=0 dma=3" in nki_emu.format_stats(nki_emu.last_run_stats())
    e1 = nki_emu.estimate(nki_emu.last_run_stats(), target="trn1", floor_bytes=1 << 20)
    assert e1.floor_bytes == 1 << 20 and math.isclose(e1.hbm_floor_s, (1 << 20) / 410e9)


# ---- lint ------------------------------------------------------------------------------------
BAD_SOURCES = {
    "NKI001": "def f(x):\n    return x is None\n",
    "NKI002": "import nki\n@nki.jit\ndef k(a, *, b):\n    return a\n",
    "NKI003": "import nki\n@nki.jit\ndef k(a):\n    return a\nk[2]([1, 2])\n",
    "NKI004": "import neuronxcc.nki.language as nl\n",
    "NKI005": "import nki.language as nl\ndef f():\n    return nl.arange(128)\n",
    "NKI006": "import nki.isa as nisa\ndef f(d, s):\n    nisa.tensor_copy(d, s, dtype=None)\n",
    "NKI007": "def f():\n    return {1: 2}\n",
    "NKI008": "import nki\n@nki.jit\ndef sub(a):\n    return a\ndef f(a):\n    return sub(a)\n",
    "NKI009": "class Config(dict):\n    pass\n",
    "NKI010": "import nki.language as nl\ndef f():\n    return nl.ndarray((1, 1), nl.float32, buffer='sbuf')\n",
    "NKI011": "import numpy as np\n",
}


@pytest.mark.parametrize("code", sorted(BAD_SOURCES))
def test_lint_flags_each_forbidden_construct(code):
    issues = lint.check_source(BAD_SOURCES[code], "bad.py")
    assert any(f" {code} " in i for i in issues), issues
    assert all(i.startswith("bad.py:") for i in issues)


def test_lint_accepts_kernel_style_and_the_kernel_package():
    ok = (
        "import nki\nimport nki.language as nl\nimport nki.isa as nisa\n"
        "class Cfg(nl.NKIObject):\n    pass\n"
        "@nki.jit\ndef k(a, b=None):\n    if b != None:\n        return a\n    d = {'x': 1}\n    return a\n"
    )
    assert lint.check_source(ok) == []
    from pathlib import Path

    pkg = Path(__file__).resolve().parents[1] / "kernel" / "nki_tkg"
    assert lint.check_paths([pkg]) == []
