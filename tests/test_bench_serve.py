"""`tkg bench serve` with tiny counts (it works and its JSON has every field; no timing asserts),
and the bare echo peer it measures against."""

from __future__ import annotations

import json
import math
from concurrent import futures
from typing import Any

import grpc
import pytest

from tkg.bench import echo
from tkg.bench import serve as bench_serve
from tkg.v1 import decode_attention_pb2 as pb

TINY = ["--q-heads", "4", "--kv-heads", "2", "--head-dim", "32", "--context", "24", "--sequences", "3",
        "--latency-contexts", "24,5", "--load-callers", "2", "--kernel-reps", "3",
        "--steps", "6", "--batch-rounds", "2", "--warmup", "2", "--rounds", "1",
        "--outside-batches", "2,3"]  # fmt: skip


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


def _paths(tree: Any, prefix: str = "") -> dict[str, str]:
    """Every leaf of a JSON tree: dotted path -> kind ("number" incl. null: a figure that does not
    apply, e.g. thread_cap off the cpu backend; "bool", "str", "list")."""
    if isinstance(tree, dict):
        return {p: k for key, sub in tree.items() for p, k in _paths(sub, f"{prefix}{key}.").items()}
    kind = ("bool" if isinstance(tree, bool) else "number" if tree is None or isinstance(tree, (int, float))
            else type(tree).__name__)  # fmt: skip
    return {prefix.rstrip("."): kind}


KNOWN_SIZES = {"request_1": 10, "response_1": 20, "request_3": 30, "response_3": 40, "request_2": 25,
               "response_2": 35}  # fmt: skip
# Goal 2b's calls: wall seconds, the server's total_us, the echo's seconds (batches 2 and 3).
KNOWN_OUTSIDE = {
    2: {"wall": [1000e-6, 1400e-6, 1100e-6], "total_us": [700, 900, 700], "echo": [300e-6, 250e-6, 400e-6]},
    3: {"wall": [3000e-6, 3900e-6, 3100e-6], "total_us": [1200, 1900, 1000], "echo": [2000e-6, 1500e-6, 1800e-6]},
}


def _known_report() -> dict[str, Any]:
    """`report` on figures chosen by hand (seconds, except the server's us): the expected values in
    the test below were worked out on paper, not with the bench's formulas."""
    a = bench_serve.build_parser().parse_args(TINY)  # latency contexts 5 and 24, 3 sequences
    info = pb.ServerInfo(num_q_heads=4, num_kv_heads=2, head_dim=32, kv_dtype=pb.DTYPE_BFLOAT16, block_len=16)
    load = bench_serve.load_summary(
        seen=[(2, 2, 300, 200), (2, 2, 300, 200), (1, 1, 100, 80)],  # (batch, requests, kernel_us, attention_us)
        same={2: 150e-6, 1: 80e-6}, every={2: 100e-6, 1: 50e-6}, cap=1,
    )  # fmt: skip
    return bench_serve.report(
        a, info, backend="cpu", cores=2, load_callers=2,
        server_us={5: [(10, 100, 40, 150)] * 3, 24: [(5, 100, 80, 120)] * 3},
        echo_lat=[300e-6, 100e-6, 200e-6],
        lat={5: [400e-6, 500e-6, 600e-6], 24: [130e-6, 150e-6, 170e-6]},
        alone={5: [50e-6, 60e-6, 40e-6], 24: [100e-6]},
        load=load,
        rps={"service_unary": [1000, 1200, 800], "service_stream": [1500], "echo_unary": [2000],
             "echo_stream": [3000]},
        bat={"service_concurrent": [600, 800], "service_batched": [1000], "service_pipelined": [1200],
             "echo_concurrent": [900], "echo_batched": [1800], "echo_pipelined": [2000]},
        batch_means=[{"concurrent": 2.0, "batched": 3.0}, {"concurrent": 3.0, "batched": 3.0}],
        sizes=KNOWN_SIZES, outside=KNOWN_OUTSIDE,
    )  # fmt: skip


def test_load_summary_on_known_launches() -> None:
    # Two 2-request launches (each response weighs 1/2) and one lone launch: 2 launches in all.
    got = bench_serve.load_summary([(2, 2, 300, 200), (2, 2, 300, 200), (1, 1, 100, 80)],
                                   {2: 150e-6, 1: 80e-6}, {2: 100e-6, 1: 50e-6}, cap=1)  # fmt: skip
    want = {"launches": 2.0, "mean_batch": 1.5, "server_kernel_us": 200.0, "server_attention_us": 140.0,
            "alone_us": 115.0, "alone_all_cores_us": 75.0, "thread_cap": 1, "ratio": 400 / 230,
            "ratio_all_cores": 400 / 150, "attention_ratio": 280 / 230}  # fmt: skip
    assert got == pytest.approx(want)


def test_report_arithmetic_and_verdicts_on_known_figures() -> None:
    r = _known_report()
    L = r["latency"]
    assert L["echo"] == pytest.approx({"n": 3, "p50_us": 200, "p99_us": 300, "mean_us": 200, "rps": 5000})
    c5, c24 = L["contexts"]["5"], L["contexts"]["24"]
    assert c5["service"] == pytest.approx({"n": 3, "p50_us": 500, "p99_us": 600, "mean_us": 500, "rps": 2000})
    assert (c5["ratio_p50"], c5["ratio_p99"]) == pytest.approx((2.5, 2.0))
    assert (c5["overhead_p50_us"], c5["overhead_ratio"]) == pytest.approx((400, 2.0))  # latency - kernel: 300..500
    assert c5["server_split_us"] == pytest.approx({"queue": 10, "kernel": 100, "attention": 40, "total": 150,
                                                   "rest": 350})  # fmt: skip
    assert c5["kernel"] == pytest.approx({"server_kernel_p50_us": 100, "server_attention_p50_us": 40,
                                          "alone_p50_us": 50, "ratio": 2.0, "attention_ratio": 0.8})  # fmt: skip
    assert (c24["overhead_p50_us"], c24["overhead_ratio"]) == pytest.approx((50, 0.25))
    assert (c24["kernel"]["ratio"], c24["server_split_us"]["rest"]) == pytest.approx((1.0, 30))
    assert r["kernel_load"]["ratio"] == pytest.approx(400 / 230) and r["kernel_load"]["goal_ratio_max"] == 1.5
    B, S = r["batching"], r["streaming"]
    assert (B["service_concurrent_tokens_s"], B["ratio"]) == pytest.approx((700, 0.7))
    assert (B["mean_batch_size_concurrent"], B["mean_batch_size_batched"]) == pytest.approx((2.5, 3.0))
    assert (S["service_unary_rps"], S["ratio"], S["echo_ratio"], S["context"]) == pytest.approx((1000, 1.5, 1.5, 24))
    # Goal 2b: wall - total_us per call (paired): batch 2: 300, 500, 400 us -> p50 400 against the echo's
    # 300 us (1.33x: missed); batch 3: 1800, 2000, 2100 -> 2000 against 1800 (1.11x: met).
    O2, O3 = r["outside"]["2"], r["outside"]["3"]
    assert (O2["outside_p50_us"], O2["echo_p50_us"], O2["ratio"]) == pytest.approx((400, 300, 4 / 3))
    assert (O3["outside_p50_us"], O3["echo_p50_us"], O3["ratio"]) == pytest.approx((2000, 1800, 2000 / 1800))
    assert (O3["outside_p99_us"], O3["wall_p50_us"], O3["server_total_p50_us"]) == pytest.approx((2100, 3100, 1200))
    # Upper goals (overhead, kernel, outside) met at or below 1.3 / 1.5; lower goals (batching, streaming) at or above.
    assert r["goals_met"] == {"overhead_ctx5": False, "kernel_lone_ctx5": False, "overhead_ctx24": True,
                              "kernel_lone_ctx24": True, "kernel_load": False, "batching": True,
                              "streaming": True, "outside_b2": False, "outside_b3": True}  # fmt: skip
    assert r["config"]["bytes"] == KNOWN_SIZES and r["config"]["backend"] == "cpu"


def test_bench_runs_and_reports_every_field(tmp_path, capsys: pytest.CaptureFixture) -> None:
    out_path = tmp_path / "bench.json"
    assert bench_serve.main([*TINY, "--json", str(out_path)]) == 0
    table = capsys.readouterr().out
    r = json.loads(out_path.read_text())
    # The schema: exactly the fields, and kinds, of the report on known figures (whose arithmetic the
    # test above checks), so a real run cannot drop, rename or retype a figure.
    assert _paths(r) == _paths(_known_report())
    assert r["config"]["model_geometry"] == {
        "num_q_heads": 4, "num_kv_heads": 2, "head_dim": 32, "kv_dtype": "bfloat16", "block_len": 16,
    }  # fmt: skip
    # The echo carried the service's real bytes: a 1-sequence request is q+k+v plus a little framing.
    b = r["config"]["bytes"]
    assert b["request_1"] > 2 * (4 + 2 + 2) * 32 and b["response_1"] > 2 * 4 * 32
    assert b["request_3"] > 3 * (b["request_1"] - 100)
    L = r["latency"]
    assert L["echo"]["n"] == 6 and 0 < L["echo"]["p50_us"] <= L["echo"]["p99_us"]
    for ctx in L["contexts"].values():
        assert ctx["service"]["n"] == 6 and 0 < ctx["service"]["p50_us"] <= ctx["service"]["p99_us"]
        split = ctx["server_split_us"]
        # What the server reported nests: attention within the kernel step within its total, within the call.
        assert 0 < split["attention"] <= split["kernel"] <= split["total"] < ctx["service"]["mean_us"]
        k = ctx["kernel"]
        assert 0 < k["server_attention_p50_us"] <= k["server_kernel_p50_us"] and k["alone_p50_us"] > 0
    K = r["kernel_load"]
    assert r["config"]["load_callers"] == 2 and 1 <= K["mean_batch"] <= 2 and K["launches"] > 0
    assert 0 < K["server_attention_us"] <= K["server_kernel_us"]
    numbers = [v for path, v in _leaves(r) if path.startswith(("kernel_load.", "batching.", "streaming."))
               and path != "kernel_load.thread_cap"]  # fmt: skip
    assert numbers and all(math.isfinite(x) and x > 0 for x in numbers)
    # One caller sending all 3 sequences runs them in one kernel launch.
    assert r["batching"]["mean_batch_size_batched"] == 3
    assert 1 <= r["batching"]["mean_batch_size_concurrent"] <= 3
    for row in ("1. overhead p50 (Decode - kernel_us), ctx 5",
                "2. kernel inside (kernel_us) / alone, lone caller, ctx 24",
                "2. kernel inside (kernel_us) / alone, 2 callers", "of it the attention call (attention_us)",
                "3. batching: 3 callers / 1 x 3", "4. streaming",
                "latency p50 / p99, ctx 24", "1 caller, 3 seqs pipelined on 1 stream",
                "2b. outside the server p50, batch 2", "2b. outside the server p50, batch 3"):  # fmt: skip
        assert row in table
    # Goal 2b: every call measured, its server share inside its wall time, the echo carried a batch's bytes.
    assert b["request_3"] > b["request_2"] > b["request_1"] and b["response_3"] > b["response_2"]
    for o in r["outside"].values():
        assert o["n"] == o["echo_n"] == 6 and 0 < o["server_total_p50_us"] < o["wall_p50_us"]
        assert o["outside_p50_us"] > 0 and o["ratio"] == pytest.approx(o["outside_p50_us"] / o["echo_p50_us"])


def _leaves(tree: Any, prefix: str = "") -> list[tuple[str, Any]]:
    if isinstance(tree, dict):
        return [leaf for key, sub in tree.items() for leaf in _leaves(sub, f"{prefix}{key}.")]
    return [(prefix.rstrip("."), tree)]


def test_bad_flags_exit_2(capsys: pytest.CaptureFixture) -> None:
    assert bench_serve.main(["--q-heads", "6", "--kv-heads", "4"]) == 2
    assert "--q-heads: 6; expected a multiple of --kv-heads (4)" in capsys.readouterr().err
    assert bench_serve.main(["--steps", "0"]) == 2
    assert bench_serve.main(["--sequences", "16", "--outside-batches", "8,64"]) == 2  # given: checked
    assert "--outside-batches: 64; expected at most --sequences (16)" in capsys.readouterr().err
    with pytest.raises(SystemExit):
        bench_serve.main(["--latency-contexts", "256,x"])
    assert "argument --latency-contexts: '256,x'; expected comma-separated integers" in capsys.readouterr().err


def test_server_that_cannot_start_is_a_clear_error(capsys: pytest.CaptureFixture) -> None:
    assert bench_serve.main([*TINY, "--backend", "no-such-backend"]) == 1
    err = capsys.readouterr().err
    assert err.startswith("tkg bench serve: error: tkg serve did not start") and "no-such-backend" in err


def test_outside_summary_pairs_each_call_with_its_own_total_us() -> None:
    # Paired: 100, 1900, 500 us -> p50 500, p99 1900 (the p50 of the differences, not the difference of
    # the p50s: 1500 - 900 = 600); the echo's p50 200 us.
    o = bench_serve.outside_summary([1000e-6, 2000e-6, 1500e-6], [900, 100, 1000], [200e-6, 100e-6, 300e-6])
    assert (o["outside_p50_us"], o["outside_p99_us"], o["echo_p50_us"]) == pytest.approx((500, 1900, 200))
    assert (o["ratio"], o["n"], o["goal_ratio_max"]) == pytest.approx((2.5, 3, 1.3))
    with pytest.raises(ValueError, match="total_us: 2 figures; expected one per call"):
        bench_serve.outside_summary([1e-3, 2e-3, 3e-3], [1, 2], [1e-3])


def test_transport_summary_on_known_calls() -> None:
    t = bench_serve.transport_summary([100e-6, 300e-6, 200e-6], [50e-6, 150e-6, 100e-6], 24)
    assert (t["context"], t["tcp"]["p50_us"], t["uds"]["p50_us"]) == (24, pytest.approx(200.0), pytest.approx(100.0))
    assert t["ratio_p50"] == pytest.approx(0.5) and t["tcp"]["n"] == t["uds"]["n"] == 3


def test_transport_uds_reports_the_lone_caller_over_a_unix_socket_against_tcp(
    tmp_path, capsys: pytest.CaptureFixture
) -> None:
    out_path = tmp_path / "bench.json"
    assert bench_serve.main([*TINY, "--transport", "uds", "--json", str(out_path)]) == 0
    r = json.loads(out_path.read_text())
    T, first = r["transport"], r["config"]["latency_contexts"][0]
    assert T["context"] == first and T["tcp"]["n"] == T["uds"]["n"] == 6
    assert T["ratio_p50"] == pytest.approx(T["uds"]["p50_us"] / T["tcp"]["p50_us"])
    assert f"lone Decode p50 over a Unix socket / TCP, ctx {first}" in capsys.readouterr().out


def test_outside_batches_default_to_8_and_64_capped_at_the_sequences() -> None:
    from tkg.bench.serve import outside_batches

    assert outside_batches(None, 64) == (8, 64)
    assert outside_batches(None, 3) == (3,)  # a small run (docs/loadtest.md's) needs no flag for it
    assert outside_batches(None, 20) == (8, 20)
    assert outside_batches((2, 3), 3) == (2, 3)  # given: kept, and checked against --sequences
