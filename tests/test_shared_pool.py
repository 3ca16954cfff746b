"""What a tenant learns of the shared KV pool when quotas overcommit it: its own quota left, and
only whether the pool is full; never how many blocks the other tenants hold (GetServerInfo and
the RESOURCE_EXHAUSTED messages alike). On a real loopback server with an auth file."""

from __future__ import annotations

import hashlib
import re

import numpy as np
import pytest
from support.inproc import TINY, InProcServer, settings

from tkg.client import Client, errors
from tkg.server import credentials, identity
from tkg.server.tenants import visible_free

TA, TB = "team-a-token-0123456789", "team-b-token-0123456789"
BLOCKS, BL, SEQ_BLOCKS = TINY["num_blocks"], TINY["block_len"], TINY["max_context"] // TINY["block_len"]


def kv(T: int) -> tuple[np.ndarray, np.ndarray]:
    x = np.ones((T, TINY["num_kv_heads"], TINY["head_dim"]), np.float32)
    return x, x


def test_visible_free_is_the_quota_left_or_zero_when_the_pool_is_full() -> None:
    quota = identity.Tenant("t", identity.Quota(max_blocks=40))
    assert [visible_free(quota, 10, 64, free) for free in (64, 30, 1, 0)] == [30, 30, 30, 0]
    assert visible_free(quota, 45, 64, 5) == 0  # past its quota (a shrunk quota after a reload)
    unlimited = identity.Tenant("u")
    assert [visible_free(unlimited, 10, 64, free) for free in (54, 20, 0)] == [54, 54, 0]


def test_another_tenants_allocations_do_not_move_my_free_blocks() -> None:
    # Quotas 48 + 40 over a pool of 64: overcommitted, as in the probe.
    entries = [{"name": "team-a", "token_sha256": hashlib.sha256(TA.encode()).hexdigest(),
                "quota": {"max_blocks": 48}},
               {"name": "team-b", "token_sha256": hashlib.sha256(TB.encode()).hexdigest(),
                "quota": {"max_blocks": 40}}]  # fmt: skip
    s = InProcServer(settings(auth=credentials.build_table([], [], entries), auth_file="auth.json"))
    try:
        with Client(s.target, token=TA, timeout=20) as a, Client(s.target, token=TB, timeout=20) as b:
            assert b.server_info().free_blocks == 40 and a.server_info().free_blocks == 48
            for i in range(3):  # team-a takes 48 of the 64 blocks
                a.create_sequence(f"a{i}")
                a.append_kv(f"a{i}", 0, *kv(SEQ_BLOCKS * BL))
            assert s.app.service.cache.free_blocks == BLOCKS - 48
            info = b.server_info()
            assert info.free_blocks == 40 and info.num_blocks == BLOCKS, info.free_blocks  # not min(16, 40)
            assert info.active_sequences == 0
            b.create_sequence("b0")
            b.append_kv("b0", 0, *kv(SEQ_BLOCKS * BL))  # the last 16 free blocks: the pool is full
            assert b.server_info().free_blocks == 0 and a.server_info().free_blocks == 0
            a.release("a0")  # 16 blocks back: each sees its own quota left, not the pool
            assert b.server_info().free_blocks == 40 - 16 and a.server_info().free_blocks == 48 - 32
            b.create_sequence("b1")
            b.append_kv("b1", 0, *kv(2 * BL))  # the pool has 14 free now; team-b's quota 22 left
            assert b.server_info().free_blocks == 22
            b.create_sequence("b2")
            with pytest.raises(errors.ResourceExhausted) as err:
                b.append_kv("b2", 0, *kv(SEQ_BLOCKS * BL))
            msg = err.value.details
            assert "16 more blocks needed" in msg and "more than the shared pool has free now" in msg, msg
            assert set(re.findall(r"\d+", msg)) <= {"16", "0"}, msg  # (16 new, 0 copy-on-write); never 14 or 64
            for sid in ("a1", "a2"):
                a.release(sid)
            b.append_kv("b2", 0, *kv(SEQ_BLOCKS * BL))
            assert b.server_info().free_blocks == 40 - 34
            b.create_sequence("b3")
            with pytest.raises(errors.ResourceExhausted) as err:  # its own quota: its own numbers
                b.append_kv("b3", 0, *kv(7 * BL))
            assert "quota max_blocks of tenant 'team-b': 34 KV blocks in use, 7 more requested" in err.value.details
    finally:
        s.stop()
