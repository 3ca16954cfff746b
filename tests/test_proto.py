"""The committed generated protobuf code matches proto/ (stale code fails), and the fourth round's
context-parallel fields carry the numbers the contract fixes (docs/context-parallel.md)."""

from __future__ import annotations

from pathlib import Path

import pytest

from tkg import protogen
from tkg.v1 import decode_attention_pb2 as pb

pytest.importorskip("grpc_tools")


def test_committed_generated_code_is_not_stale(tmp_path: Path) -> None:
    for fresh in protogen.generate(tmp_path):
        committed = protogen.PROTO_DIR / "tkg" / "v1" / fresh.name
        assert committed.read_bytes() == fresh.read_bytes(), f"{committed} is stale: run `make proto`"


@pytest.mark.parametrize(
    ("message", "field", "number"),
    [
        (pb.DecodeRequest, "return_lse", 8),
        (pb.DecodeRequest, "attend_only", 9),
        (pb.DecodeResponse, "lse", 6),
        (pb.CreateSequenceRequest, "base_position", 2),
        (pb.SequenceInfo, "base_position", 5),
        (pb.SequenceHeader, "base_position", 9),
        (pb.SequenceInfo, "tier", 4),  # KV tiers
        (pb.PrefetchSequenceRequest, "sequence_id", 1),
    ],
)
def test_context_parallel_field_numbers(message: type, field: str, number: int) -> None:
    assert message.DESCRIPTOR.fields_by_name[field].number == number


def test_prefetch_sequence_is_an_rpc_of_the_service() -> None:
    method = pb.DESCRIPTOR.services_by_name["DecodeAttention"].methods_by_name["PrefetchSequence"]
    assert (method.input_type.name, method.output_type.name) == ("PrefetchSequenceRequest", "SequenceInfo")
