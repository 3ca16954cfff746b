"""Container health check: exit 0 when the server's `grpc.health.v1.Health` answers SERVING.

The slim images carry no `grpc_health_probe` binary, but they do carry grpcio and
grpcio-health-checking (the server's own dependencies), so the Docker HEALTHCHECK runs this file
with the image's Python. Kubernetes does not use it: its native gRPC probes call the same service.

    python healthcheck.py [--target 127.0.0.1:50051] [--service NAME] [--timeout 3]

Exit codes: 0 SERVING, 1 anything else (NOT_SERVING, UNKNOWN, unreachable, deadline exceeded),
2 bad arguments. Plaintext only: a server started with --tls-cert needs its own probe.
"""

from __future__ import annotations

import argparse
import os
import sys

import grpc
from grpc_health.v1 import health_pb2, health_pb2_grpc


def check(target: str, service: str, timeout_s: float) -> tuple[bool, str]:
    """Ask `target` for the health of `service` ("" = the whole server); (ok, one-line status)."""
    with grpc.insecure_channel(target) as channel:
        stub = health_pb2_grpc.HealthStub(channel)
        try:
            reply = stub.Check(health_pb2.HealthCheckRequest(service=service), timeout=timeout_s)
        except grpc.RpcError as err:
            return False, f"{target}: {err.code().name}: {err.details()}"
    status = health_pb2.HealthCheckResponse.ServingStatus.Name(reply.status)
    return reply.status == health_pb2.HealthCheckResponse.SERVING, f"{target}: {status}"


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--target", default=os.environ.get("TKG_HEALTH_TARGET", "127.0.0.1:50051"))
    parser.add_argument("--service", default="", help='health service name; "" asks for the whole server')
    parser.add_argument("--timeout", type=float, default=3.0, help="deadline in seconds")
    args = parser.parse_args(argv)
    if args.timeout <= 0:
        parser.error(f"--timeout must be > 0 seconds, got {args.timeout}")
    ok, line = check(args.target, args.service, args.timeout)
    print(line, file=sys.stdout if ok else sys.stderr)
    return 0 if ok else 1


if __name__ == "__main__":
    raise SystemExit(main())
