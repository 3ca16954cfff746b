"""Finite values whose attention would overflow (q = k = 3e38: score inf, output NaN) are refused
on every path they arrive by (Decode q/k/v, DecodeStream, AppendKV, ImportSequence) with
INVALID_ARGUMENT naming the field and the bound; values just inside the bound give finite outputs
(fused RoPE or not), so the bound is the policy: refuse, never compute NaN."""

from __future__ import annotations

import asyncio
from typing import Any

import grpc
import numpy as np
import pytest
from support.fakes import replied
from support.mirror import append_request, decode_request
from support.service import Aborted, FakeContext, make_service

from tkg import codec, dtypes, protowire
from tkg.v1 import decode_attention_pb2 as pb

HQ, HKV, D = 4, 2, 128  # head_dim at its maximum (config.MAX_HEAD_DIM): the largest scores
BOUNDED = [d for d in dtypes.ALL if d.numpy in codec.MAGNITUDE_LOG2]


def spec(dtype: str, fuse_rope: bool = False) -> dict[str, Any]:
    return {"num_layers": 2, "num_q_heads": HQ, "num_kv_heads": HKV, "head_dim": D, "block_len": 16,
            "num_blocks": 64, "max_context": 256, "kv_dtype": dtype, "fuse_rope": fuse_rope}  # fmt: skip


async def _aiter(items: list) -> Any:
    for x in items:
        yield x


def signs(shape: tuple[int, ...], value: float, dtype: np.dtype, seed: int = 0) -> np.ndarray:
    """`value` with random signs (the largest scores come from q and k agreeing in sign)."""
    s = np.sign(np.random.default_rng(seed).standard_normal(shape))
    return (s * value).astype(dtype)


def just_below(d: dtypes.DType) -> float:
    """The largest value of `d` inside its bound (the bound is a power of two: its bits less one)."""
    bound = np.array([2.0 ** codec.MAGNITUDE_LOG2[d.numpy]], dtype=d.numpy)
    return float((bound.view(d.uint) - 1).view(d.numpy)[0])


@pytest.mark.parametrize("d", BOUNDED, ids=lambda d: d.name)
def test_bounded_bytes_is_exact_at_the_bound(d: dtypes.DType) -> None:
    """Every bit pattern's verdict equals `finite and |x| < 2**n` (all 2**16 patterns for the
    16-bit dtypes, the patterns around the bound and the limits for float32)."""
    n = codec.MAGNITUDE_LOG2[d.numpy]
    if d.itemsize == 2:
        bits = np.arange(2**16, dtype=np.uint16)
    else:
        edge = np.array([2.0**n, np.finfo(np.float32).max, 3e38, 1.0], np.float32).view(np.uint32)
        bits = np.unique(np.concatenate([(edge[:, None] + np.arange(-300, 300)).reshape(-1), [0x7F800000, 0x7FC00000]]))
        bits = np.concatenate([bits, bits | 0x80000000]).astype(np.uint32)
    values = bits.view(d.numpy)
    with np.errstate(invalid="ignore"):  # NaN patterns of bfloat16
        wide = values.astype(np.float64)
    want = np.isfinite(wide) & (np.abs(wide) < 2.0**n)
    got = np.array([codec.bounded_bytes(v.tobytes(), d.numpy) for v in values])
    assert (got == want).all(), values[got != want][:5]
    assert codec.bounded_bytes(values[want].tobytes(), d.numpy) and codec.bounded_bytes(b"", d.numpy)
    assert not codec.bounded_bytes(values.tobytes(), d.numpy)


def test_fp8_kv_is_bounded_by_being_finite() -> None:
    fp8 = dtypes.FLOAT8_E4M3
    values = np.arange(256, dtype=np.uint8).view(fp8.numpy)
    want = np.isfinite(values.astype(np.float32))
    got = np.array([codec.bounded_bytes(v.tobytes(), fp8.numpy) for v in values])
    assert (got == want).all()


async def _decode(svc: Any, q: np.ndarray, k: np.ndarray, v: np.ndarray, pos: int) -> np.ndarray:
    # As the RPC reads it: q/k/v as views of the request's bytes (the bound check reads those).
    raw = decode_request(0, ["s"], [pos], q, k, v).SerializeToString()
    r = pb.DecodeResponse.FromString(await svc.Decode(protowire.parse_decode_request(raw), FakeContext()))
    return codec.decode(r.out).astype(np.float32)


@pytest.mark.parametrize("fuse_rope", [False, True], ids=["plain", "fused_rope"])
@pytest.mark.parametrize("d", BOUNDED, ids=lambda d: d.name)
def test_values_just_inside_the_bound_give_finite_outputs(d: dtypes.DType, fuse_rope: bool) -> None:
    """The bound is safe: q, k, v all at the largest allowed magnitude (signs agreeing or not),
    head_dim 128, 200 cached tokens: every output finite (the reference and the native cpu kernel)."""
    x = just_below(d)
    for backend in ("reference", "cpu"):

        async def main(backend: str = backend) -> np.ndarray:
            svc = make_service(spec(d.name, fuse_rope), backend=backend)
            svc.start()
            try:
                await svc.CreateSequence(pb.CreateSequenceRequest(sequence_id="s"), FakeContext())
                k = signs((200, HKV, D), x, d.numpy, 1)
                await svc.AppendKV(_aiter([append_request("s", 0, 0, k, k)]), FakeContext())
                q = np.full((1, HQ, 1, D), x).astype(d.numpy)
                kk = np.full((1, HKV, 1, D), x).astype(d.numpy)
                return await _decode(svc, q, kk, kk, 200)
            finally:
                await svc.close()

        out = asyncio.run(main())
        assert np.isfinite(out).all() and np.abs(out).max() > x / 2, (backend, out)


@pytest.mark.parametrize("d", BOUNDED, ids=lambda d: d.name)
def test_every_path_refuses_values_past_the_bound_naming_the_field(d: dtypes.DType) -> None:
    """3e38 (float32; bfloat16's nearest) or 65504 (float16) in each of Decode's q, k, v, a
    DecodeStream message, AppendKV's k and v, and an imported sequence's k and v: INVALID_ARGUMENT
    naming the field and the bound; nothing appended, the sequence as before."""
    big = 65504.0 if d.numpy == np.float16 else 3e38
    bound = f"expected |x| < 2**{codec.MAGNITUDE_LOG2[d.numpy]}"
    ok = np.ones((1, HKV, D), d.numpy)

    async def main() -> None:
        svc = make_service(spec(d.name), backend="reference")
        svc.start()
        ctx = FakeContext()
        try:
            await svc.CreateSequence(pb.CreateSequenceRequest(sequence_id="s"), ctx)
            await svc.AppendKV(_aiter([append_request("s", 0, 0, ok, ok)]), ctx)
            q, kv = np.ones((1, HQ, 1, D), d.numpy), np.ones((1, HKV, 1, D), d.numpy)
            pos = 1  # layer 0's length: each refused message leaves it, each good one adds a token
            for name in ("q", "k", "v"):
                args = {"q": q.copy(), "k": kv.copy(), "v": kv.copy()}
                args[name][0, 0, 0, 5] = big
                with pytest.raises(Aborted) as err:
                    await _decode(svc, args["q"], args["k"], args["v"], pos)
                assert err.value.code == grpc.StatusCode.INVALID_ARGUMENT
                assert err.value.details.startswith(f"{name}: value ") and "at flat index 5" in err.value.details
                assert bound in err.value.details, err.value.details
                # The stream answers that message with the same error and goes on.
                reqs = [decode_request(0, ["s"], [pos], args["q"], args["k"], args["v"], rid="bad"),
                        decode_request(0, ["s"], [pos], q, kv, kv, rid="good")]  # fmt: skip
                replies = [replied(r) async for r in svc.DecodeStream(_aiter(reqs), ctx)]
                assert replies[0].error.code == grpc.StatusCode.INVALID_ARGUMENT.value[0]
                assert bound in replies[0].error.message and replies[1].HasField("out")
                pos += 1
            for name in ("k", "v"):
                kk, vv = ok.copy(), ok.copy()
                (kk if name == "k" else vv)[0, 1, 3] = -big
                with pytest.raises(Aborted) as err:
                    await svc.AppendKV(_aiter([append_request("s", 1, 0, kk, vv)]), ctx)
                assert err.value.code == grpc.StatusCode.INVALID_ARGUMENT
                assert err.value.details.startswith(f"{name}: value ") and bound in err.value.details
            assert svc.cache.get("s").lengths == (4, 0)  # only the three good messages appended
            chunks = [m async for m in svc.ExportSequence(pb.ExportSequenceRequest(sequence_id="s"), ctx)]
            await svc.ReleaseSequence(pb.ReleaseSequenceRequest(sequence_id="s"), ctx)
            free = svc.cache.free_blocks
            for name in ("k", "v"):
                msgs = [pb.SequenceChunk() for _ in chunks]
                for m, c in zip(msgs, chunks, strict=True):
                    m.CopyFrom(c)
                t = getattr(msgs[1], name)
                a = codec.decode(t).copy()
                a.reshape(-1)[2] = big
                codec.encode(a, t)
                with pytest.raises(Aborted) as err:
                    await svc.ImportSequence(_aiter(msgs), ctx)
                assert err.value.code == grpc.StatusCode.INVALID_ARGUMENT
                assert err.value.details.startswith(f"{name}: value ") and bound in err.value.details
                assert "s" not in svc.cache and svc.cache.free_blocks == free
            assert (await svc.ImportSequence(_aiter(chunks), ctx)).lengths == [4, 0]  # the real one imports
        finally:
            await svc.close()

    asyncio.run(main())
