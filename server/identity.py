"""Who a call runs as: the identity types (`Quota`, `Tenant`, `Identity`), tenant namespaces, and
the identity of the call being served (`CURRENT`, `current()`).

The types are frozen dataclasses: a credential table of them (`tkg.server.credentials`) is built
whole and swapped whole on reload, never changed in place, so a call admitted before a reload
keeps its `Tenant` and `Quota` as they were, without a lock. `CURRENT` is a context variable the
guard (`tkg.server.auth.Guard`) sets on the event loop at the start of every call; grpc.aio runs
each call in its own task, hence its own context, so a handler's `current()` is its own caller.
Without credentials configured every call is the full-access `default` tenant (the table's
`anonymous`, with the quota defaults); outside a call `current()` is `ANONYMOUS`.
"""

from __future__ import annotations

import contextvars
from dataclasses import dataclass, field, fields

DEFAULT_TENANT = "default"


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
