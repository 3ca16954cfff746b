"""A bare Python gRPC echo: the floor under any Python gRPC service on this machine.

`tkg bench serve` runs it in its own process and sends it exactly the bytes of a real serialized
`DecodeRequest`; it answers with the bytes of a real serialized `DecodeResponse` registered
beforehand for that request length (else it echoes the request). Generic handlers with identity
serializers: no protobuf, no numpy, nothing but gRPC, so service time minus echo time is what the
service itself costs.

    python -m tkg.bench.echo [--host 127.0.0.1] [--port 0] [--stack aio|sync] [--ready-file PATH]
    -> prints "echo: listening on HOST:PORT stack=STACK" once ready and, with --ready-file, writes
       PATH atomically: {"pid", "port", "address", "stack"} (as `tkg serve --ready-file` does; removed
       on exit); SIGTERM/SIGINT stops it.

Methods (service `tkg.bench.Echo`): `Register` (8-byte little-endian request length + response
bytes), `Unary`, `Stream` (bidi, one response per request, in order).
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import os
import signal
import struct
import sys
import threading
from collections.abc import AsyncIterator, Iterator
from concurrent import futures
from pathlib import Path

import grpc

SERVICE = "tkg.bench.Echo"
UNARY = f"/{SERVICE}/Unary"
STREAM = f"/{SERVICE}/Stream"
REGISTER = f"/{SERVICE}/Register"
MAX_MESSAGE = 256 * 2**20
OPTIONS = [("grpc.max_receive_message_length", MAX_MESSAGE), ("grpc.max_send_message_length", MAX_MESSAGE)]


def _write_ready(path: Path | None, host: str, port: int, stack: str) -> None:
    """The ready file, written whole by a rename (a reader never sees half of it). Not shared with
    `tkg.server.cli`: this process imports nothing but gRPC."""
    if path is None:
        return
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    tmp.write_text(json.dumps({"pid": os.getpid(), "port": port, "address": f"{host}:{port}", "stack": stack}) + "\n")
    os.replace(tmp, path)


def _remove_ready(path: Path | None) -> None:
    if path is not None:
        with contextlib.suppress(FileNotFoundError):
            path.unlink()


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


async def _serve_aio(host: str, port: int, ready: Path | None) -> int:
    server = grpc.aio.server(options=OPTIONS)
    server.add_generic_rpc_handlers((_handlers(Replies(), aio=True),))
    bound = server.add_insecure_port(f"{host}:{port}")
    if bound == 0:
        print(f"echo: error: cannot listen on {host}:{port}", file=sys.stderr)
        return 1
    await server.start()
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, stop.set)
    print(f"echo: listening on {host}:{bound} stack=aio", flush=True)
    try:
        _write_ready(ready, host, bound, "aio")
        await stop.wait()
    finally:
        _remove_ready(ready)
    await server.stop(0)
    return 0


def _serve_sync(host: str, port: int, ready: Path | None) -> int:
    server = grpc.server(futures.ThreadPoolExecutor(max_workers=8), options=OPTIONS)
    server.add_generic_rpc_handlers((_handlers(Replies(), aio=False),))
    bound = server.add_insecure_port(f"{host}:{port}")
    if bound == 0:
        print(f"echo: error: cannot listen on {host}:{port}", file=sys.stderr)
        return 1
    server.start()
    stop = threading.Event()
    for sig in (signal.SIGTERM, signal.SIGINT):
        signal.signal(sig, lambda *_: stop.set())
    print(f"echo: listening on {host}:{bound} stack=sync", flush=True)
    try:
        _write_ready(ready, host, bound, "sync")
        stop.wait()
    finally:
        _remove_ready(ready)
    server.stop(0)
    return 0


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m tkg.bench.echo", description="Bare gRPC echo (bench peer).")
    p.add_argument("--host", default="127.0.0.1")
    p.add_argument("--port", type=int, default=0, help="0 = any free port (printed)")
    p.add_argument("--stack", choices=["aio", "sync"], default="aio", help="grpc.aio (as the service) or sync")
    p.add_argument("--ready-file", metavar="PATH", help='once serving, write PATH atomically: JSON {"pid", "port", '
                   '"address", "stack"}; removed on exit')
    args = p.parse_args(argv)
    ready = Path(args.ready_file) if args.ready_file else None
    if args.stack == "aio":
        return asyncio.run(_serve_aio(args.host, args.port, ready))
    return _serve_sync(args.host, args.port, ready)


if __name__ == "__main__":
    raise SystemExit(main())
