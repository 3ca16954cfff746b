"""PSUM banks at explicit addresses, rotated per purpose.

PSUM holds 8 banks of 2 KiB per partition; a matmul result must fit one bank. The kernel gives
each stage its own pair of banks and alternates within the pair, so a stage can fill one bank
while the previous result is still being evacuated from the other:

    banks 0-1  MM1 groups (K^T Q scores)      banks 4-5  MM2 (P V) accumulation
    banks 2-3  K transposes on the PE          banks 6-7  softmax statistics, RoPE transposes
"""

import nki.language as nl

from tkg.kernel.nki_tkg.sbuf import dtype_bytes, free_elems

PSUM_BANK_BYTES = 2048
MM1_BANKS = (0, 2)  # (first bank, count)
KT_BANKS = (2, 2)
MM2_BANKS = (4, 2)
STAT_BANKS = (6, 2)


class PsumRing(nl.NKIObject):
    """Hands out one-bank PSUM tiles from `count` banks starting at `first`, round robin."""

    def __init__(self, banks: tuple, name: str):
        self.first = banks[0]
        self.count = banks[1]
        self.name = name
        self.i = 0

    def next(self, shape, dtype, name: str = "ps"):
        nbytes = free_elems(shape) * dtype_bytes(dtype)
        assert nbytes <= PSUM_BANK_BYTES, f"PSUM tile {name} {shape}: {nbytes} B exceeds one 2 KiB bank"
        bank = self.first + self.i % self.count
        self.i = self.i + 1
        return nl.ndarray(
            tuple(shape), dtype=dtype, buffer=nl.psum, name=f"{self.name}.{name}.{self.i}",
            address=(0, bank * PSUM_BANK_BYTES),
        )  # fmt: skip
