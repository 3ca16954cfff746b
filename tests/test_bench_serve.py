"""`tkg bench serve` with tiny counts (it works and its JSON has every field; no timing asserts),
and the bare echo peer it measures against."""

from __future__ import annotations

import json
import math
from concurrent import futures

import grpc
import pytest

from tkg.client import bench_serve, echo
from tkg.v1 import decode_attention_pb2 as pb

TINY = ["--q-heads", "4", "--kv-heads", "2", "--head-dim", "32", "--context", "24", "--sequences", "3",
        "--steps", "6", "--batch-rounds", "2", "--warmup", "2", "--rounds", "1"]  # fmt: skip


def test_echo_answers_registered_bytes_unary_and_stream() -> None:
    server = grpc.server(futures.ThreadPoolExecutor(max_workers=2))
    server.add_generic_rpc_handlers((echo._handlers(echo.Replies(), aio=False),))
    port = server.add_insecure_port("127.0.0.1:0")
    server.start()
    try:
        with grpc.insecure_channel(f"127.0.0.1:{port}") as ch:
            req = pb.DecodeRequest(request_id="r", sequence_ids=["a"], positions=[3]).SerializeToString()
            resp = pb.DecodeResponse(request_id="r", layer=1).SerializeToString()
            assert ch.unary_unary(echo.UNARY)(req) == req  # nothing registered: plain echo
            ch.unary_unary(echo.REGISTER)(echo.register_payload(len(req), resp))
            assert ch.unary_unary(echo.UNARY)(req) == resp
            assert list(ch.stream_stream(echo.STREAM)(iter([req, b"xy", req]))) == [resp, b"xy", resp]
            with pytest.raises(grpc.RpcError):
                ch.unary_unary(echo.REGISTER)(b"short")
    finally:
        server.stop(0)


def test_bench_runs_and_reports_every_field(tmp_path, capsys: pytest.CaptureFixture) -> None:
    out_path = tmp_path / "bench.json"
    assert bench_serve.main([*TINY, "--json", str(out_path)]) == 0
    table = capsys.readouterr().out
    r = json.loads(out_path.read_text())
    assert r["config"]["model_geometry"] == {
        "num_q_heads": 4, "num_kv_heads": 2, "head_dim": 32, "kv_dtype": "bfloat16", "block_len": 16,
    }  # fmt: skip
    # The echo carried the service's real bytes: a 1-sequence request is q+k+v plus a little framing.
    b = r["config"]["bytes"]
    assert b["request_1"] > 2 * (4 + 2 + 2) * 32 and b["response_1"] > 2 * 4 * 32
    assert b["request_3"] > 3 * (b["request_1"] - 100)
    for peer in ("service", "echo"):
        lat = r["latency"][peer]
        assert lat["n"] == 6 and 0 < lat["p50_us"] <= lat["p99_us"]
    numbers = [
        r["latency"]["ratio_p50"], r["latency"]["ratio_p99"],
        *(r["batching"][k] for k in ("service_concurrent_tokens_s", "service_batched_tokens_s",
                                     "service_stream_pipelined_tokens_s", "echo_concurrent_tokens_s",
                                     "echo_batched_tokens_s", "echo_stream_pipelined_tokens_s", "ratio")),
        *(r["streaming"][k] for k in ("service_stream_rps", "service_unary_rps", "echo_stream_rps",
                                      "echo_unary_rps", "ratio", "echo_ratio")),
    ]  # fmt: skip
    assert all(math.isfinite(x) and x > 0 for x in numbers)
    # One caller sending all 3 sequences runs them in one kernel launch.
    assert r["batching"]["mean_batch_size_batched"] == 3
    assert 1 <= r["batching"]["mean_batch_size_concurrent"] <= 3
    split = r["latency"]["server_split_us"]
    assert 0 < split["kernel"] <= split["total"] < r["latency"]["service"]["mean_us"]
    assert split["rest"] == pytest.approx(r["latency"]["service"]["mean_us"] - split["total"])
    assert set(r["goals_met"]) == {"latency_p50", "batching", "streaming"}
    for row in ("latency p50", "3 callers x 1 seq", "1 caller x 3 seqs", "3 seqs pipelined on 1 stream",
                "streaming: stream / unary"):
        assert row in table


def test_bad_flags_exit_2(capsys: pytest.CaptureFixture) -> None:
    assert bench_serve.main(["--q-heads", "6", "--kv-heads", "4"]) == 2
    assert "--q-heads: 6; expected a multiple of --kv-heads (4)" in capsys.readouterr().err
    assert bench_serve.main(["--steps", "0"]) == 2


def test_server_that_cannot_start_is_a_clear_error(capsys: pytest.CaptureFixture) -> None:
    assert bench_serve.main([*TINY, "--backend", "no-such-backend"]) == 1
    err = capsys.readouterr().err
    assert err.startswith("tkg bench serve: error: tkg serve did not start") and "no-such-backend" in err
