"""Where the gRPC server listens: TCP `host:port` and Unix-socket `unix:` addresses (`tkg serve --listen`).

A co-located caller (an engine on the same host) skips the TCP stack over a Unix socket. gRPC takes
`unix:PATH` (relative or absolute) and `unix:///ABS/PATH`; this module checks the forms, removes a
socket file left by a process that is gone (never one something still answers on), binds each
address and removes the socket files again at shutdown.
"""

from __future__ import annotations

import contextlib
import os
import socket
import stat
from collections.abc import Callable

UNIX = "unix:"


def check_address(text: str, flag: str = "--listen") -> str:
    """`text` if it is `host:port` (port 0..65535; `[v6]:port`) or `unix:PATH`; ValueError naming `flag`."""
    t = text.strip()
    if t.startswith(UNIX):
        path = socket_path(t)
        if not path or path.endswith("/"):
            raise ValueError(f"{flag}: {text!r}; expected unix:PATH or unix:///ABSOLUTE/PATH")
        return t
    host, sep, port = t.rpartition(":")
    if not sep or not host or not port.isdigit() or not 0 <= int(port) <= 65535:
        raise ValueError(f"{flag}: {text!r}; expected host:port (port 0..65535) or unix:///path/to.sock")
    return t


def socket_path(address: str) -> str:
    """The file of a `unix:` address ("" for any other address)."""
    if not address.startswith(UNIX):
        return ""
    rest = address[len(UNIX) :]
    return rest[2:] if rest.startswith("///") else rest  # unix:///abs -> /abs; unix:rel -> rel


def clear_stale_socket(path: str) -> None:
    """Remove a socket file no process listens on any more (a crash leaves it; binding then fails).
    OSError when the path is another kind of file or a live server answers on it."""
    try:
        mode = os.stat(path).st_mode
    except FileNotFoundError:
        return
    if not stat.S_ISSOCK(mode):
        raise OSError(f"cannot listen on unix:{path}: the path exists and is not a socket")
    probe = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    try:
        probe.connect(path)
    except ConnectionRefusedError:  # nobody listens: a leftover
        os.unlink(path)
        return
    finally:
        probe.close()
    raise OSError(f"cannot listen on unix:{path}: another server answers on it")


def bind(addresses: list[str], add_port: Callable[[str], int]) -> list[str]:
    """Bind each address with `add_port` (the grpc server's add_insecure_port / add_secure_port
    with its credentials); returns the bound addresses, a TCP port 0 replaced by the port chosen.
    OSError naming the address that cannot be bound."""
    bound = []
    for address in addresses:
        path = socket_path(address)
        if path:
            clear_stale_socket(path)
        try:
            port = add_port(address)
        except RuntimeError as exc:  # grpc raises RuntimeError when it cannot bind
            raise OSError(f"cannot listen on {address}: {exc}") from None
        if port == 0:
            raise OSError(f"cannot listen on {address} (in use or not allowed)")
        bound.append(address if path else f"{address.rpartition(':')[0]}:{port}")
    return bound


def tcp_port(addresses: list[str]) -> int:
    """The port of the first TCP address (0 when the server listens on Unix sockets only)."""
    for a in addresses:
        if not a.startswith(UNIX):
            return int(a.rpartition(":")[2])
    return 0


def remove_sockets(addresses: list[str]) -> None:
    """Remove the socket files of the `unix:` addresses (at shutdown, after the server stopped)."""
    for a in addresses:
        path = socket_path(a)
        if path:
            with contextlib.suppress(FileNotFoundError):
                os.unlink(path)
