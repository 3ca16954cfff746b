"""`SbufManager` (kernel/nki_tkg/sbuf.py): stack addresses, scopes, multi-buffer sections, limits."""

from __future__ import annotations

import pytest

from tkg.kernel.backends import unavailable_reason

REASON = unavailable_reason("nki-emu")  # installs the emulator as `nki` when it is usable
pytestmark = pytest.mark.skipif(REASON is not None, reason=f"nki-emu unavailable: {REASON}")


@pytest.fixture()
def sbuf():  # the module imports `nki`: only after the emulator is installed
    from tkg.kernel.nki_tkg import sbuf

    return sbuf


def test_stack_addresses_are_aligned_and_increasing(sbuf) -> None:
    sbm = sbuf.SbufManager(0, 4096, align=64)
    assert sbm.reserve(10, "a") == 0
    assert sbm.reserve(64, "b") == 64
    assert sbm.reserve(65, "c") == 128
    assert sbm.get_free_space() == 4096 - 256


def test_tile_bytes_follow_dtype_and_free_dims(sbuf) -> None:
    import nki.language as nl

    from tkg.kernel import nki_emu

    sbm = sbuf.SbufManager(1024, 1024 + 8192, align=32)
    with nki_emu.session():  # nl.ndarray is a kernel-time construct: run as program 0 of a launch
        t = sbm.alloc((128, 4, 8), nl.float32, "x")
        assert tuple(t.shape) == (128, 4, 8)
        assert sbm.top == 1024 + 4 * 8 * 4
        sbm.alloc((64, 16), nl.bfloat16, "y")
        assert sbm.top == 1024 + 128 + 32
        sbm.alloc((7, 3), nl.uint8, "z")  # 3 bytes, rounded to the alignment
        assert sbm.top == 1024 + 160 + 32
    assert sbuf.dtype_bytes(nl.uint32) == 4 and sbuf.dtype_bytes(nl.float16) == 2


def test_close_scope_frees_in_lifo_order(sbuf) -> None:
    sbm = sbuf.SbufManager(0, 4096, align=64)
    sbm.reserve(64, "keep")
    sbm.open_scope()
    first = sbm.reserve(128, "tmp")
    sbm.open_scope()
    sbm.reserve(512, "inner")
    sbm.close_scope()
    assert sbm.reserve(64, "after-inner") == first + 128
    sbm.close_scope()
    assert sbm.reserve(64, "after-outer") == first
    assert sbm.high_water == first + 128 + 512


def test_sections_rotate_and_reuse(sbuf) -> None:
    sbm = sbuf.SbufManager(0, 1 << 16, align=64)
    sbm.open_scope(interleave_degree=2)
    addrs = []
    for _ in range(4):
        addrs.append(sbm.reserve(256, "row"))
        sbm.increment_section()
    sbm.close_scope()
    assert addrs == [0, 256, 0, 256]
    assert sbm.top == 0


def test_three_sections(sbuf) -> None:
    sbm = sbuf.SbufManager(0, 1 << 16, align=64)
    sbm.open_scope(interleave_degree=3)
    seen = []
    for _ in range(6):
        seen.append(sbm.section())
        a = sbm.reserve(100, "a")
        b = sbm.reserve(100, "b")
        assert b == a + 128
        sbm.increment_section()
    sbm.close_scope()
    assert seen == [0, 1, 2, 0, 1, 2]


def test_section_overflow_is_an_error(sbuf) -> None:
    sbm = sbuf.SbufManager(0, 1 << 16, align=64)
    sbm.open_scope(interleave_degree=2)
    sbm.reserve(1024, "row")
    sbm.increment_section()
    sbm.reserve(1024, "row")
    sbm.increment_section()
    with pytest.raises(AssertionError, match="section 0 has only 1024 B left before section 1"):
        sbm.reserve(2048, "bigger-row")


def test_nested_scope_counts_towards_its_section(sbuf) -> None:
    sbm = sbuf.SbufManager(0, 1 << 16, align=64)
    sbm.open_scope(interleave_degree=2)
    sbm.reserve(128, "row")
    sbm.open_scope()
    sbm.reserve(512, "temp")
    sbm.close_scope()
    sbm.increment_section()
    # Section 1 starts after section 0's temporaries, not just after its surviving tile.
    assert sbm.reserve(64, "row") == 640
    sbm.increment_section()
    sbm.reserve(128, "row")
    sbm.open_scope()
    with pytest.raises(AssertionError, match="section 0"):
        sbm.reserve(1024, "temp-too-big")


def test_budget_overflow_names_the_tile(sbuf) -> None:
    import nki.language as nl

    sbm = sbuf.SbufManager(0, 2048, align=64)
    sbm.reserve(1024, "a")
    with pytest.raises(AssertionError, match=r"SBUF budget exceeded allocating scores: needs 4096 B/partition"):
        sbm.alloc((128, 1024), nl.float32, "scores")
    with pytest.raises(AssertionError, match="129 partitions exceed 128"):
        sbm.alloc((129, 1), nl.float32, "tall")


def test_unbalanced_scopes_are_errors(sbuf) -> None:
    sbm = sbuf.SbufManager(0, 2048)
    with pytest.raises(AssertionError, match="close_scope without open_scope"):
        sbm.close_scope()
    with pytest.raises(AssertionError, match="increment_section outside a scope"):
        sbm.increment_section()
    with pytest.raises(AssertionError, match="bad range"):
        sbuf.SbufManager(100, 100)
