"""Who is calling, checked around every handler (`Guard`, applied when the handler is registered)
before any request body is parsed: a bearer token or a client certificate, looked up in the
credential table in force (`tkg.server.credentials`), becomes the call's `Identity`
(`tkg.server.identity`), then what that identity may call is checked here.

A `peer` identity may call ImportSequence into the tenant named by the call's `tkg-tenant`
metadata (a configured tenant; the drain sends it with each sequence), and GetServerInfo, health
and reflection; nothing else. Any other identity naming a tenant other than its own in
`tkg-tenant` is PERMISSION_DENIED, whether or not that tenant exists, so tenants still never cross.

Threading: the guard runs on the event loop (grpc.aio calls its handlers there) and checks a call
without awaiting in between, reading `Authenticator.table` each time; a reload swaps that
attribute whole, on the loop too (SIGHUP), so one call's check sees one table, never a mix.
"""

from __future__ import annotations

import inspect
from collections.abc import AsyncIterator, Callable, Sequence
from typing import Any

import grpc
from google.protobuf.message import DecodeError

from tkg import protowire
from tkg.server.aborts import aborted, unread
from tkg.server.credentials import AuthTable
from tkg.server.errors import Denied, PermissionDenied, Unauthenticated
from tkg.server.identity import CURRENT, Identity

TENANT_METADATA = "tkg-tenant"  # the tenant a peer's ImportSequence writes into
SERVICE_PREFIX = "/tkg.v1.DecodeAttention/"
# Methods of the DecodeAttention service a read-only identity may call. Health and reflection
# (other services) only read, so any authenticated identity may call them.
READ_ONLY_METHODS = frozenset({"GetServerInfo", "GetSequence", "PrefetchSequence"})
# Methods a `peer` identity (a replica pushing its sequences on drain) may call.
PEER_METHODS = frozenset({"GetServerInfo", "ImportSequence"})


class Authenticator:
    """The table in force (swapped whole on reload) and the check of one call."""

    def __init__(self, table: AuthTable) -> None:
        self.table = table

    def authenticate(self, method: str, metadata: Sequence[tuple[str, Any]], subjects: Sequence[str]) -> Identity:
        """The caller's identity for `method` (a full method name); raises `Denied`."""
        table = self.table
        if not table.enabled:
            return table.anonymous
        ident = table.by_subject(subjects) if subjects and table.subjects else None
        if ident is None:
            header = None
            for key, value in metadata or ():
                if key == "authorization":
                    header = value if isinstance(value, str) else bytes(value).decode("latin-1")
            if header is None:
                raise Unauthenticated(
                    "authorization: missing; expected metadata 'authorization: Bearer <token>'"
                    + (" or a configured client certificate" if table.subjects else "")
                )
            scheme, _, token = header.strip().partition(" ")
            if scheme.lower() != "bearer" or not token.strip():
                raise Unauthenticated("authorization: unknown scheme or empty token; expected 'Bearer <token>'")
            ident = table.by_token(token.strip())
            if ident is None:
                raise Unauthenticated("authorization: unknown token; expected a configured bearer token")
        named = next((v for k, v in metadata or () if k == TENANT_METADATA), None)
        if ident.peer:
            return self._as_peer(ident, method, named)
        if named is not None and named != ident.tenant.name:
            raise PermissionDenied(
                f"{TENANT_METADATA}: names a tenant other than this credential's; expected only "
                "a peer credential (role: peer) to name a tenant"
            )
        if ident.read_only and method.startswith(SERVICE_PREFIX):
            name = method[len(SERVICE_PREFIX) :]
            if name not in READ_ONLY_METHODS:
                raise PermissionDenied(
                    f"authorization: this token is read-only; {name} expected a full-access token "
                    f"(read-only tokens may call {', '.join(sorted(READ_ONLY_METHODS))})"
                )
        return ident


    def _as_peer(self, ident: Identity, method: str, named: Any) -> Identity:
        """A replica's call: only PEER_METHODS; ImportSequence runs as the tenant it names."""
        name = method[len(SERVICE_PREFIX) :] if method.startswith(SERVICE_PREFIX) else None
        if name is None or name == "GetServerInfo":
            return ident
        if name not in PEER_METHODS:
            raise PermissionDenied(
                f"authorization: a peer credential; {name} expected a tenant's token "
                f"(peers may call {', '.join(sorted(PEER_METHODS))})"
            )
        if named is None:
            raise PermissionDenied(f"{TENANT_METADATA}: missing on a peer's {name}; expected the tenant to import into")
        tenant = self.table.tenant(named if isinstance(named, str) else bytes(named).decode("latin-1"))
        if tenant is None:
            raise PermissionDenied(f"{TENANT_METADATA}: not a tenant of this replica; expected one its auth file names")
        return Identity(tenant, peer=True)


def peer_subjects(context: Any) -> list[str]:
    """The verified client certificate's subject as gRPC reports it (RFC 4514, escaped; empty
    without mTLS). Never the common name alone: `"CN=" + common name` is how a certificate whose
    CN is the text `team-a,O=Org` passed for the subject `CN=team-a,O=Org`."""
    try:
        auth = context.auth_context() or {}
    except Exception:  # no transport security information on this call
        return []
    return [v.decode("utf-8", "replace") for v in auth.get("x509_subject", ())]


# Decode's requests are read as views of their bytes, q/k/v not copied, and its answers may be their
# wire bytes already (`tkg.protowire`): ~0.1 ms less per batch-64 step of the llama-3-8b geometry.
VIEWED_METHODS = frozenset({"/tkg.v1.DecodeAttention/Decode", "/tkg.v1.DecodeAttention/DecodeStream"})


class Guard:
    """Wraps every handler, once, when it is registered (`GuardedServer`), so that credentials are
    checked first, with the request still raw bytes; only then is it parsed (a parse failure is
    INVALID_ARGUMENT) and the servicer called with `CURRENT` set. An unauthenticated caller learns
    nothing but UNAUTHENTICATED: not the method's existence, not whether the server is draining
    or warming up.

    Not a `grpc.aio.ServerInterceptor`: grpc.aio runs an interceptor chain (coroutines, a handler
    lookup through it) on every call, which cost a lone Decode ~40-60 us on the 2-core build
    machine; a wrapped handler costs one coroutine frame. Without credentials configured (the
    table in force is read per call: a reload may turn auth on) a call only sets `CURRENT` to
    the table's anonymous identity (tenant `default` with its quota defaults). A call ended by
    `context.abort` (a refusal here, or a handler's error) is returned from with its abort error
    stripped and its request stream closed (`tkg.server.aborts`), so it keeps no payload alive."""

    def __init__(self, authenticator: Authenticator, on_denied: Callable[[str, str], None] | None = None) -> None:
        self.auth = authenticator
        self.on_denied = on_denied or (lambda method, code: None)
        # method -> (its handler, the wrapped handler): generic handlers are asked per call, the
        # wrapper is built once per method (closures and a handler tuple), not per call.
        self._wrapped: dict[str, tuple[grpc.RpcMethodHandler, grpc.RpcMethodHandler]] = {}

    def wrapped(self, method: str, handler: grpc.RpcMethodHandler) -> grpc.RpcMethodHandler:
        """`handler` of full method name `method` behind the guard (built once, then cached)."""
        cached = self._wrapped.get(method)
        if cached is None or cached[0] is not handler:
            cached = self._wrapped[method] = (handler, self._wrap(method, handler))
        return cached[1]

    def _identify(self, method: str, context: Any) -> Identity | Denied:
        """The caller's identity (or why not): the metadata and, with mTLS subjects configured,
        the peer certificate. No credentials configured: the table's anonymous identity."""
        table = self.auth.table
        if not table.enabled:
            return table.anonymous
        subjects = peer_subjects(context) if table.subjects else ()
        try:
            return self.auth.authenticate(method, context.invocation_metadata() or (), subjects)
        except Denied as exc:
            # Kept as a value, not raised on: its traceback (this frame, the context) is not needed.
            return exc.with_traceback(None)

    async def _deny(self, method: str, context: Any, denied: Denied) -> None:
        self.on_denied(method, denied.code.name)
        await context.abort(denied.code, denied.message)

    def _wrap(self, method: str, handler: grpc.RpcMethodHandler) -> grpc.RpcMethodHandler:
        deserialize = handler.request_deserializer or (lambda raw: raw)
        serialize = handler.response_serializer
        if method in VIEWED_METHODS:
            deserialize, serialize = protowire.parse_decode_request, protowire.serialize
        identify, deny, current = self._identify, self._deny, CURRENT

        def admit(context: Any) -> Denied | None:
            """Set `CURRENT` to the caller's identity; or why the call is denied."""
            ident = identify(method, context)
            if type(ident) is not Identity:
                return ident
            current.set(ident)
            return None

        async def invalid(context: Any) -> None:
            await context.abort(
                grpc.StatusCode.INVALID_ARGUMENT, f"request: not a valid message for {method}; expected one"
            )

        async def parse(raw: bytes, context: Any) -> Any:
            """The request message of `raw`, or the call aborted INVALID_ARGUMENT."""
            try:
                return deserialize(raw)
            except (DecodeError, ValueError, TypeError):
                await invalid(context)

        async def stream_of(raws: AsyncIterator[bytes], context: Any) -> AsyncIterator[Any]:
            async for raw in raws:
                yield await parse(raw, context)

        if handler.unary_unary is not None:
            inner = handler.unary_unary

            async def uu(raw: bytes, context: Any) -> Any:
                try:
                    if (denied := admit(context)) is not None:
                        await deny(method, context, denied)
                    return await inner(await parse(raw, context), context)
                except grpc.aio.AbortError as exc:
                    return aborted(exc)

            return grpc.unary_unary_rpc_method_handler(uu, None, serialize)
        if handler.stream_unary is not None:
            inner_su = handler.stream_unary

            async def su(raws: AsyncIterator[bytes], context: Any) -> Any:
                try:
                    if (denied := admit(context)) is not None:
                        await deny(method, context, denied)
                    return await inner_su(stream_of(raws, context), context)
                except grpc.aio.AbortError as exc:
                    await unread(raws)
                    return aborted(exc)

            return grpc.stream_unary_rpc_method_handler(su, None, serialize)
        if handler.unary_stream is not None:
            inner_us = handler.unary_stream

            async def us(raw: bytes, context: Any) -> AsyncIterator[Any]:
                try:
                    if (denied := admit(context)) is not None:
                        await deny(method, context, denied)
                    async for item in _responses(inner_us(await parse(raw, context), context)):
                        yield item
                except grpc.aio.AbortError as exc:
                    aborted(exc)

            return grpc.unary_stream_rpc_method_handler(us, None, serialize)
        inner_ss = handler.stream_stream

        async def ss(raws: AsyncIterator[bytes], context: Any) -> AsyncIterator[Any]:
            try:
                if (denied := admit(context)) is not None:
                    await deny(method, context, denied)
                result = inner_ss(stream_of(raws, context), context)
                async for item in result if inspect.isasyncgen(result) else _responses(result):
                    yield item
            except grpc.aio.AbortError as exc:
                await unread(raws)
                aborted(exc)

        return grpc.stream_stream_rpc_method_handler(ss, None, serialize)


class _GuardedGeneric(grpc.GenericRpcHandler):
    """A generic handler whose handlers come back behind the guard."""

    def __init__(self, inner: grpc.GenericRpcHandler, guard: Guard) -> None:
        self.inner, self.guard = inner, guard

    def service(self, details: grpc.HandlerCallDetails) -> grpc.RpcMethodHandler | None:
        handler = self.inner.service(details)
        return None if handler is None else self.guard.wrapped(details.method, handler)


class GuardedServer:
    """Stands in for a `grpc.aio.Server` where generated `add_*Servicer_to_server` functions
    register handlers: every handler they register reaches the real server behind `guard`."""

    def __init__(self, server: grpc.aio.Server, guard: Guard) -> None:
        self.server, self.guard = server, guard

    def add_generic_rpc_handlers(self, handlers: Sequence[grpc.GenericRpcHandler]) -> None:
        self.server.add_generic_rpc_handlers(tuple(_GuardedGeneric(h, self.guard) for h in handlers))

    def add_registered_method_handlers(self, service: str, handlers: dict[str, grpc.RpcMethodHandler]) -> None:
        self.server.add_registered_method_handlers(
            service, {name: self.guard.wrapped(f"/{service}/{name}", h) for name, h in handlers.items()}
        )


async def _responses(result: Any) -> AsyncIterator[Any]:
    """Items of a streaming handler's result: an async generator's items, or none when the
    handler is a coroutine writing with `context.write` (grpc_health's Watch)."""
    if inspect.isasyncgen(result):
        async for item in result:
            yield item
    elif inspect.isawaitable(result):
        await result
    else:
        for item in result:
            yield item
