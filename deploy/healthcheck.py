"""Container health check: exit 0 when the server's `grpc.health.v1.Health` answers SERVING.

The slim images carry no `grpc_health_probe` binary, but they do carry grpcio and
grpcio-health-checking (the server's own dependencies), so the Docker HEALTHCHECK and the
Kubernetes exec probes run this file with the image's Python. With auth on, the health service
answers only authenticated callers (anyone else gets UNAUTHENTICATED, so a probe without
credentials fails): give a token (a read-only one is enough) and, for a TLS server, the CA.

    python healthcheck.py [--target 127.0.0.1:50051] [--service NAME] [--timeout 3]
        [--token-file FILE] [--tls-ca PEM [--server-name NAME] [--tls-cert PEM --tls-key PEM]]

Every option also reads an environment variable (the Docker HEALTHCHECK takes no arguments at
run time): TKG_HEALTH_TARGET, TKG_HEALTH_TOKEN_FILE, TKG_HEALTH_TLS_CA, TKG_HEALTH_SERVER_NAME,
TKG_HEALTH_TLS_CERT, TKG_HEALTH_TLS_KEY.

Exit codes: 0 SERVING, 1 anything else (NOT_SERVING, UNKNOWN, UNAUTHENTICATED, unreachable,
deadline exceeded), 2 bad arguments or unreadable files.
"""

from __future__ import annotations

import argparse
import os
import sys

import grpc
from grpc_health.v1 import health_pb2, health_pb2_grpc


def check(
    target: str, service: str, timeout_s: float, token: str | None = None, tls_ca: bytes | None = None,
    server_name: str | None = None, cert: bytes | None = None, key: bytes | None = None,
) -> tuple[bool, str]:
    """Ask `target` for the health of `service` ("" = the whole server); (ok, one-line status)."""
    if tls_ca is not None:
        creds = grpc.ssl_channel_credentials(tls_ca, key, cert)
        options = [("grpc.ssl_target_name_override", server_name)] if server_name else []
        channel = grpc.secure_channel(target, creds, options=options)
    else:
        channel = grpc.insecure_channel(target)
    metadata = [("authorization", f"Bearer {token}")] if token else []
    with channel:
        stub = health_pb2_grpc.HealthStub(channel)
        try:
            reply = stub.Check(health_pb2.HealthCheckRequest(service=service), timeout=timeout_s, metadata=metadata)
        except grpc.RpcError as err:
            return False, f"{target}: {err.code().name}: {err.details()}"
    status = health_pb2.HealthCheckResponse.ServingStatus.Name(reply.status)
    return reply.status == health_pb2.HealthCheckResponse.SERVING, f"{target}: {status}"


def _read(parser: argparse.ArgumentParser, flag: str, path: str | None) -> bytes | None:
    if not path:
        return None
    try:
        with open(path, "rb") as f:
            return f.read()
    except OSError as exc:
        parser.error(f"{flag}: cannot read {path!r} ({exc.strerror})")
    return None


def main(argv: list[str] | None = None) -> int:
    env = os.environ.get
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--target", default=env("TKG_HEALTH_TARGET", "127.0.0.1:50051"))
    parser.add_argument("--service", default="", help='health service name; "" asks for the whole server')
    parser.add_argument("--timeout", type=float, default=3.0, help="deadline in seconds")
    parser.add_argument("--token-file", default=env("TKG_HEALTH_TOKEN_FILE"), help="bearer token (first line)")
    parser.add_argument("--tls-ca", default=env("TKG_HEALTH_TLS_CA"), help="PEM roots: talk TLS, trust these")
    parser.add_argument("--server-name", default=env("TKG_HEALTH_SERVER_NAME"),
                        help="name the server certificate must carry (default: the target's host)")
    parser.add_argument("--tls-cert", default=env("TKG_HEALTH_TLS_CERT"), help="PEM client certificate (mTLS)")
    parser.add_argument("--tls-key", default=env("TKG_HEALTH_TLS_KEY"), help="PEM client key (mTLS)")
    args = parser.parse_args(argv)
    if args.timeout <= 0:
        parser.error(f"--timeout must be > 0 seconds, got {args.timeout}")
    if bool(args.tls_cert) != bool(args.tls_key) or (args.tls_cert and not args.tls_ca):
        parser.error("--tls-cert/--tls-key: expected both, with --tls-ca")
    raw = _read(parser, "--token-file", args.token_file)
    token = raw.decode().strip().splitlines()[0].strip() if raw and raw.strip() else None
    ok, line = check(
        args.target, args.service, args.timeout, token, _read(parser, "--tls-ca", args.tls_ca), args.server_name,
        _read(parser, "--tls-cert", args.tls_cert), _read(parser, "--tls-key", args.tls_key),
    )  # fmt: skip
    print(line, file=sys.stdout if ok else sys.stderr)
    return 0 if ok else 1


if __name__ == "__main__":
    raise SystemExit(main())
