"""A bare Python gRPC echo: the floor under any Python gRPC service on this machine.

`tkg bench serve` runs it in its own process and sends it exactly the bytes of a real serialized
`DecodeRequest`; it answers with the bytes of a real serialized `DecodeResponse` registered
beforehand for that request length (else it echoes the request). Generic handlers with identity
serializers: no protobuf, no numpy, nothing but gRPC, so service time minus echo time is what the
service itself costs.

    python -m tkg.bench.echo [--host 127.0.0.1] [--port 0] [--stack aio|sync]
    -> prints "echo: listening on HOST:PORT stack=STACK" once ready; SIGTERM/SIGINT stops it.

Methods (service `tkg.bench.Echo`): `Register` (8-byte little-endian request length + response
bytes), `Unary`, `Stream` (bidi, one response per request, in order).
"""

from __future__ import annotations

import argparse
import asyncio
import signal
import struct
import sys
import threading
from collections.abc import AsyncIterator, Iterator
from concurrent import futures

import grpc

SERVICE = "tkg.bench.Echo"
UNARY = f"/{SERVICE}/Unary"
STREAM = f"/{SERVICE}/Stream"
REGISTER = f"/{SERVICE}/Register"
MAX_MESSAGE = 256 * 2**20
OPTIONS = [("grpc.max_receive_message_length", MAX_MESSAGE), ("grpc.max_send_message_length", MAX_MESSAGE)]


def register_payload(request_len: int, response: bytes) -> bytes:
    """The `Register` request: answer requests of `request_len` bytes with `response`."""
    return struct.pack("<Q", request_len) + response


class Replies:
    """Request length -> registered response bytes (dict reads are atomic; no lock needed)."""

    def __init__(self) -> None:
        self.by_len: dict[int, bytes] = {}

    def register(self, payload: bytes) -> bytes:
        if len(payload) < 8:
            raise ValueError("Register: expected 8-byte length + response")
        (n,) = struct.unpack_from("<Q", payload)
        self.by_len[n] = payload[8:]
        return b""

    def reply(self, request: bytes) -> bytes:
        return self.by_len.get(len(request), request)


def _handlers(replies: Replies, aio: bool) -> grpc.GenericRpcHandler:
    if aio:

        async def unary(req: bytes, ctx: object) -> bytes:
            return replies.reply(req)

        async def stream(it: AsyncIterator[bytes], ctx: object) -> AsyncIterator[bytes]:
            async for req in it:
                yield replies.reply(req)

        async def register(req: bytes, ctx: object) -> bytes:
            return replies.register(req)

    else:

        def unary(req: bytes, ctx: object) -> bytes:  # type: ignore[misc]
            return replies.reply(req)

        def stream(it: Iterator[bytes], ctx: object) -> Iterator[bytes]:  # type: ignore[misc]
            for req in it:
                yield replies.reply(req)

        def register(req: bytes, ctx: object) -> bytes:  # type: ignore[misc]
            return replies.register(req)

    # No (de)serializer: requests and responses stay the raw bytes on the wire.
    return grpc.method_handlers_generic_handler(
        SERVICE,
        {
            "Unary": grpc.unary_unary_rpc_method_handler(unary),
            "Stream": grpc.stream_stream_rpc_method_handler(stream),
            "Register": grpc.unary_unary_rpc_method_handler(register),
        },
    )


async def _serve_aio(host: str, port: int) -> int:
    server = grpc.aio.server(options=OPTIONS)
    server.add_generic_rpc_handlers((_handlers(Replies(), aio=True),))
    bound = server.add_insecure_port(f"{host}:{port}")
    if bound == 0:
        print(f"echo: error: cannot listen on {host}:{port}", file=sys.stderr)
        return 1
    await server.start()
    print(f"echo: listening on {host}:{bound} stack=aio", flush=True)
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, stop.set)
    await stop.wait()
    await server.stop(0)
    return 0


def _serve_sync(host: str, port: int) -> int:
    server = grpc.server(futures.ThreadPoolExecutor(max_workers=8), options=OPTIONS)
    server.add_generic_rpc_handlers((_handlers(Replies(), aio=False),))
    bound = server.add_insecure_port(f"{host}:{port}")
    if bound == 0:
        print(f"echo: error: cannot listen on {host}:{port}", file=sys.stderr)
        return 1
    server.start()
    print(f"echo: listening on {host}:{bound} stack=sync", flush=True)
    stop = threading.Event()
    for sig in (signal.SIGTERM, signal.SIGINT):
        signal.signal(sig, lambda *_: stop.set())
    stop.wait()
    server.stop(0)
    return 0


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m tkg.bench.echo", description="Bare gRPC echo (bench peer).")
    p.add_argument("--host", default="127.0.0.1")
    p.add_argument("--port", type=int, default=0, help="0 = any free port (printed)")
    p.add_argument("--stack", choices=["aio", "sync"], default="aio", help="grpc.aio (as the service) or sync")
    args = p.parse_args(argv)
    if args.stack == "aio":
        return asyncio.run(_serve_aio(args.host, args.port))
    return _serve_sync(args.host, args.port)


if __name__ == "__main__":
    raise SystemExit(main())
