"""Who is calling: bearer tokens and client certificates mapped to tenants, checked around every
handler (`Guard`, applied when the handler is registered) before any request body is parsed.

Credentials come from `--auth-token` / `--auth-token-file` / `TKG_AUTH_TOKEN` / `--read-only-token`
(tenant `default`) and from `--auth-file` (YAML or JSON, hashes only, reloaded on SIGHUP):

    tenants:
      - name: team-a
        role: full                 # or read-only; several entries may share a name
        token_sha256: 9f86d0...    # hex SHA-256 of the bearer token
        quota: {max_sequences: 1000, max_blocks: 4096, max_pending: 64, max_streams: 16}
      - name: team-b
        client_subject: "CN=team-b"   # the verified client certificate's whole subject (mTLS), RFC 4514
      - name: replicas             # a replica identity, not a tenant: what a draining replica presents
        role: peer
        token_sha256: 5e884...

A `client_subject` matches a certificate whose whole subject is that distinguished name, compared
as parsed RDNs (`tkg.server.subjects`): `CN=team-b` matches only a certificate whose subject is
exactly `CN=team-b`, never one that merely has that common name. Text that could be read two ways,
or a subject given twice, is refused at load; so is a subject on a server without
`--tls-client-ca` (`build_table(mtls=False)`), where no certificate could ever present it.

A `peer` identity may call ImportSequence into the tenant named by the call's `tkg-tenant`
metadata (a configured tenant; the drain sends it with each sequence), and GetServerInfo, health
and reflection; nothing else. Any other identity naming a tenant other than its own in
`tkg-tenant` is PERMISSION_DENIED, whether or not that tenant exists, so tenants still never cross.

A presented token is hashed once and compared with every configured digest in constant time
(`hmac.compare_digest`, no early exit), so the time taken says nothing about which digest, if
any, came close. The identity of a call lives in the context variable `CURRENT` for the
servicer; without auth every call is the full-access `default` tenant, as before tenants existed.
"""

from __future__ import annotations

import contextvars
import functools
import hashlib
import hmac
import inspect
import os
import re
from collections.abc import AsyncIterator, Callable, Sequence
from dataclasses import dataclass, field, fields
from pathlib import Path
from typing import Any

import grpc
from google.protobuf.message import DecodeError

from tkg.server import subjects as dn
from tkg.server.aborts import aborted, unread
from tkg.server.config import ConfigError, read_file
from tkg.server.errors import Denied, PermissionDenied, Unauthenticated

MIN_TOKEN_LEN = 16
DEFAULT_TENANT = "default"
TENANT_NAME = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]{0,63}$")
ROLES = ("full", "read-only", "peer")
TENANT_METADATA = "tkg-tenant"  # the tenant a peer's ImportSequence writes into
SERVICE_PREFIX = "/tkg.v1.DecodeAttention/"
# Methods of the DecodeAttention service a read-only identity may call. Health and reflection
# (other services) only read, so any authenticated identity may call them.
READ_ONLY_METHODS = frozenset({"GetServerInfo", "GetSequence", "PrefetchSequence"})
# Methods a `peer` identity (a replica pushing its sequences on drain) may call.
PEER_METHODS = frozenset({"GetServerInfo", "ImportSequence"})


@dataclass(frozen=True)
class Quota:
    """Per-tenant limits; None = unlimited (then only the server-wide limits apply)."""

    max_sequences: int | None = None  # live sequences
    max_blocks: int | None = None  # KV blocks held (a block shared by forks counts once)
    max_pending: int | None = None  # decode requests queued or running
    max_streams: int | None = None  # concurrent DecodeStream / AppendKV / ExportSequence / ImportSequence calls

    def over(self, base: Quota) -> Quota:
        """This quota with unset keys taken from `base`."""
        return Quota(**{f.name: getattr(self, f.name) if getattr(self, f.name) is not None
                        else getattr(base, f.name) for f in fields(self)})  # fmt: skip


QUOTA_KEYS = tuple(f.name for f in fields(Quota))


def namespace_of(tenant: str) -> str:
    """The prefix of a tenant's sequence ids inside the KV cache. `default` keeps ids as they are
    (one tenant, as before); others get `name + "\\x1f"` (a name never holds that character)."""
    return "" if tenant == DEFAULT_TENANT else tenant + "\x1f"


@dataclass(frozen=True)
class Tenant:
    name: str
    quota: Quota = field(default_factory=Quota)

    @property
    def namespace(self) -> str:
        return namespace_of(self.name)


@dataclass(frozen=True)
class Identity:
    """An authenticated caller."""

    tenant: Tenant
    read_only: bool = False
    peer: bool = False  # a replica identity: imports into the tenant its call names (TENANT_METADATA)


ANONYMOUS = Identity(Tenant(DEFAULT_TENANT))
CURRENT: contextvars.ContextVar[Identity] = contextvars.ContextVar("tkg_identity", default=ANONYMOUS)


def current() -> Identity:
    """The identity of the call being served (ANONYMOUS when auth is off or outside a call)."""
    return CURRENT.get()


def token_digest(token: str) -> bytes:
    return hashlib.sha256(token.encode()).digest()


def check_token(token: str, source: str) -> str:
    """`token` if it is long enough; ConfigError naming `source` otherwise (never the token)."""
    if len(token) < MIN_TOKEN_LEN:
        what = "empty" if not token else f"{len(token)} characters"
        raise ConfigError(f"{source}: token is {what}; expected at least {MIN_TOKEN_LEN} characters")
    return token


@dataclass(frozen=True)
class AuthTable:
    """Every credential the server accepts. Empty (`enabled` False): no auth."""

    tokens: tuple[tuple[bytes, Identity], ...] = ()  # (SHA-256 digest, identity)
    subjects: tuple[tuple[dn.Name, Identity], ...] = ()  # (certificate subject, parsed; identity)
    tenants: tuple[Tenant, ...] = (Tenant(DEFAULT_TENANT),)

    @property
    def enabled(self) -> bool:
        return bool(self.tokens or self.subjects)

    def tenant(self, name: str) -> Tenant | None:
        return next((t for t in self.tenants if t.name == name), None)

    @functools.cached_property
    def anonymous(self) -> Identity:
        """Every caller when no credentials are configured: tenant `default`, its quota."""
        return Identity(self.tenant(DEFAULT_TENANT) or ANONYMOUS.tenant)

    def by_token(self, token: str) -> Identity | None:
        """Constant time in which entry matches: every digest is compared, none skipped."""
        digest = token_digest(token)
        found = None
        for want, ident in self.tokens:
            if hmac.compare_digest(digest, want) and found is None:
                found = ident
        return found

    @functools.cached_property
    def _by_name(self) -> dict[dn.Name, Identity]:
        return dict(self.subjects)

    def by_subject(self, subjects: Sequence[str]) -> Identity | None:
        """The identity whose configured subject is, RDN for RDN, one of `subjects` (RFC 4514
        strings as gRPC reports them); an unparseable report matches nothing."""
        for text in subjects:
            name = dn.reported(text)
            ident = None if name is None else self._by_name.get(name)
            if ident is not None:
                return ident
        return None


def build_table(
    full_tokens: Sequence[str] = (),
    read_only_tokens: Sequence[str] = (),
    entries: Sequence[dict[str, Any]] = (),
    defaults: Quota = Quota(),
    mtls: bool | None = None,
) -> AuthTable:
    """The table for the flags' tokens (tenant `default`) plus auth-file `entries` (checked,
    ConfigError naming `tenants[i].key`). Quotas: file keys over `defaults`. `mtls`: whether the
    server verifies client certificates (False: a `client_subject` entry is an error, it could
    never match; None: not known here, not checked)."""
    quotas: dict[str, Quota] = {DEFAULT_TENANT: Quota()}
    parsed = []
    names: dict[dn.Name, int] = {}  # each subject once: two entries would make the identity a lookup-order accident
    peers: list[tuple[str, str | None, Any]] = []  # role peer: (replica name, digest, parsed subject)
    for i, raw in enumerate(entries):
        where = f"tenants[{i}]"
        if not isinstance(raw, dict):
            raise ConfigError(f"{where}: {raw!r}; expected a mapping: name, role, token_sha256 or client_subject")
        unknown = sorted(set(raw) - {"name", "role", "token_sha256", "client_subject", "quota"})
        if unknown:
            raise ConfigError(f"{where}: unknown key(s) {unknown}; expected name, role, token_sha256, "
                              "client_subject, quota")  # fmt: skip
        name = raw.get("name")
        if not isinstance(name, str) or not TENANT_NAME.match(name):
            raise ConfigError(f"{where}.name: {name!r}; expected 1-64 characters of A-Z a-z 0-9 . _ - "
                              "(starting with a letter or digit)")  # fmt: skip
        role = raw.get("role", "full")
        if role not in ROLES:
            raise ConfigError(f"{where}.role: {role!r}; expected one of {', '.join(ROLES)}")
        digest, subject = raw.get("token_sha256"), raw.get("client_subject")
        if (digest is None) == (subject is None):
            raise ConfigError(f"{where}: expected exactly one of token_sha256 and client_subject")
        if digest is not None and (not isinstance(digest, str) or not re.fullmatch(r"[0-9a-fA-F]{64}", digest)):
            raise ConfigError(f"{where}.token_sha256: expected 64 hex digits (sha256sum of the token)")
        if subject is not None:
            subject = _subject(subject, f"{where}.client_subject", mtls)
            if subject in names:
                raise ConfigError(f"{where}.client_subject: the same subject as tenants[{names[subject]}]'s; "
                                  "expected each certificate subject in one entry")  # fmt: skip
            names[subject] = i
        quota = _quota(raw.get("quota"), f"{where}.quota")
        if role == "peer":
            if quota is not None:
                raise ConfigError(f"{where}.quota: set on a peer entry; expected none (imports count "
                                  "against the quota of the tenant they go to)")  # fmt: skip
            peers.append((name, digest, subject))
            continue
        if quota is not None:
            old = quotas.get(name)
            if old is not None and old != Quota() and old != quota:
                raise ConfigError(f"{where}.quota: differs from an earlier entry of tenant {name!r}; "
                                  "expected the same quota (or none) on every entry of a tenant")  # fmt: skip
            quotas[name] = quota
        quotas.setdefault(name, Quota())
        parsed.append((name, role == "read-only", digest, subject))
    tenants = {name: Tenant(name, q.over(defaults)) for name, q in quotas.items()}
    tokens = [(token_digest(t), Identity(tenants[DEFAULT_TENANT])) for t in full_tokens]
    tokens += [(token_digest(t), Identity(tenants[DEFAULT_TENANT], read_only=True)) for t in read_only_tokens]
    subjects = []
    for name, ro, digest, subject in parsed:
        ident = Identity(tenants[name], read_only=ro)
        if digest is not None:
            tokens.append((bytes.fromhex(digest), ident))
        else:
            subjects.append((subject, ident))
    for name, _, _ in peers:
        if name in quotas:  # `default` is always a tenant
            raise ConfigError(f"tenants: {name!r} names both a peer and a tenant; expected a replica name "
                              "distinct from every tenant's")  # fmt: skip
    used = {i.tenant.name for _, i in tokens} | {i.tenant.name for _, i in subjects}
    for name, digest, subject in peers:  # after `used`: a replica identity is not a tenant
        ident = Identity(Tenant(name), peer=True)
        if digest is not None:
            tokens.append((bytes.fromhex(digest), ident))
        else:
            subjects.append((subject, ident))
    listed = tuple(t for n, t in tenants.items() if n in used or (n == DEFAULT_TENANT and not used))
    return AuthTable(tuple(tokens), tuple(subjects), listed)


def _subject(raw: Any, where: str, mtls: bool | None) -> dn.Name:
    """A configured `client_subject`, parsed; ConfigError naming `where` when it is not one
    unambiguous RFC 4514 subject, or when the server checks no client certificates."""
    example = ("expected an RFC 4514 subject such as 'CN=team-a' or 'CN=team-a,O=Org' "
               "(openssl x509 -noout -subject -nameopt RFC2253)")
    if not isinstance(raw, str):
        raise ConfigError(f"{where}: {raw!r}; {example}")
    try:
        name = dn.parse(raw)
    except dn.SubjectError as exc:
        raise ConfigError(f"{where}: {raw!r}: {exc}") from None
    if mtls is False:
        raise ConfigError(f"{where}: {raw!r} on a server without --tls-client-ca; expected --tls-client-ca "
                          "(with --tls-cert/--tls-key) so that client certificates are checked, "
                          "or no client_subject")  # fmt: skip
    return name


def _quota(raw: Any, where: str) -> Quota | None:
    if raw is None:
        return None
    if not isinstance(raw, dict) or set(raw) - set(QUOTA_KEYS):
        raise ConfigError(f"{where}: {raw!r}; expected a mapping with some of {', '.join(QUOTA_KEYS)}")
    for key, value in raw.items():
        if isinstance(value, bool) or not isinstance(value, int) or value < 1:
            raise ConfigError(f"{where}.{key}: {value!r}; expected an integer >= 1")
    return Quota(**raw)


def read_auth_file(path: str | Path) -> list[dict[str, Any]]:
    """The `tenants` entries of an auth file (YAML by extension .yaml/.yml, else JSON)."""
    data = read_file(path, "--auth-file")
    if not isinstance(data.get("tenants"), list) or set(data) - {"tenants"}:
        raise ConfigError(f"--auth-file: {str(path)!r}; expected a mapping with one key, tenants: a list of entries")
    return data["tenants"]


def tokens_from(
    flag_tokens: Sequence[str], token_file: str | None, env: dict[str, str] | None = None,
    source: str = "--auth-token-file",
) -> list[str]:  # fmt: skip
    """Full-access tokens from `--auth-token`, `--auth-token-file` (one per line) and
    `TKG_AUTH_TOKEN`; each checked with `check_token`. A set but empty variable is refused too
    (an unset shell variable expanding to "" must not mean "no token needed")."""
    env = os.environ if env is None else env
    tokens = [check_token(t, "--auth-token") for t in flag_tokens]
    if token_file is not None:
        try:
            lines = Path(token_file).read_text().splitlines()
        except OSError as exc:
            raise ConfigError(f"{source}: cannot read {token_file!r} ({exc.strerror})") from None
        lines = [line.strip() for line in lines if line.strip()]
        if not lines:
            raise ConfigError(f"{source}: {token_file!r} is empty; expected one token per line")
        tokens += [check_token(t, source) for t in lines]
    if "TKG_AUTH_TOKEN" in env:
        tokens.append(check_token(env["TKG_AUTH_TOKEN"].strip(), "TKG_AUTH_TOKEN"))
    return tokens


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


Behavior = Callable[..., Any]


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

        serialize = handler.response_serializer
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
