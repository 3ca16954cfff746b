"""`tkg bench serve` with tiny counts (it works and its JSON has every field; no timing asserts),
and the bare echo peer it measures against."""

from __future__ import annotations

import json
import math
from concurrent import futures

import grpc
import pytest

from tkg.bench import echo
from tkg.bench import serve as bench_serve
from tkg.v1 import decode_attention_pb2 as pb

TINY = ["--q-heads", "4", "--kv-heads", "2", "--head-dim", "32", "--context", "24", "--sequences", "3",
        "--latency-contexts", "24,5", "--load-callers", "2", "--kernel-reps", "3",
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
    L = r["latency"]
    assert L["echo"]["n"] == 6 and 0 < L["echo"]["p50_us"] <= L["echo"]["p99_us"]
    assert set(L["contexts"]) == {"5", "24"}
    for ctx in L["contexts"].values():
        assert ctx["service"]["n"] == 6 and 0 < ctx["service"]["p50_us"] <= ctx["service"]["p99_us"]
        split = ctx["server_split_us"]
        assert 0 < split["attention"] <= split["kernel"] <= split["total"] < ctx["service"]["mean_us"]
        assert split["rest"] == pytest.approx(ctx["service"]["mean_us"] - split["total"])
        k = ctx["kernel"]
        assert 0 < k["server_attention_p50_us"] <= k["server_kernel_p50_us"] and k["alone_p50_us"] > 0
        # Goal 2 is the server's kernel_us (append included) against the call alone.
        assert k["ratio"] == pytest.approx(k["server_kernel_p50_us"] / k["alone_p50_us"])
        assert k["attention_ratio"] == pytest.approx(k["server_attention_p50_us"] / k["alone_p50_us"])
        assert ctx["overhead_ratio"] == pytest.approx(ctx["overhead_p50_us"] / L["echo"]["p50_us"])
    K = r["kernel_load"]
    assert r["config"]["load_callers"] == 2 and 1 <= K["mean_batch"] <= 2 and K["launches"] > 0
    assert 0 < K["server_attention_us"] <= K["server_kernel_us"]
    assert K["ratio"] == pytest.approx(K["server_kernel_us"] / K["alone_us"])
    numbers = [
        *(K[k] for k in ("server_kernel_us", "server_attention_us", "alone_us", "alone_all_cores_us", "ratio",
                         "ratio_all_cores", "attention_ratio")),
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
    assert set(r["goals_met"]) == {"overhead_ctx5", "overhead_ctx24", "kernel_lone_ctx5", "kernel_lone_ctx24",
                                   "kernel_load", "batching", "streaming"}  # fmt: skip
    for row in ("1. overhead p50 (Decode - kernel_us), ctx 5",
                "2. kernel inside (kernel_us) / alone, lone caller, ctx 24",
                "2. kernel inside (kernel_us) / alone, 2 callers", "of it the attention call (attention_us)",
                "3. batching: 3 callers / 1 x 3", "4. streaming",
                "latency p50 / p99, ctx 24", "1 caller, 3 seqs pipelined on 1 stream"):  # fmt: skip
        assert row in table


def test_bad_flags_exit_2(capsys: pytest.CaptureFixture) -> None:
    assert bench_serve.main(["--q-heads", "6", "--kv-heads", "4"]) == 2
    assert "--q-heads: 6; expected a multiple of --kv-heads (4)" in capsys.readouterr().err
    assert bench_serve.main(["--steps", "0"]) == 2
    with pytest.raises(SystemExit):
        bench_serve.main(["--latency-contexts", "256,x"])
    assert "argument --latency-contexts: '256,x'; expected comma-separated integers" in capsys.readouterr().err


def test_server_that_cannot_start_is_a_clear_error(capsys: pytest.CaptureFixture) -> None:
    assert bench_serve.main([*TINY, "--backend", "no-such-backend"]) == 1
    err = capsys.readouterr().err
    assert err.startswith("tkg bench serve: error: tkg serve did not start") and "no-such-backend" in err
