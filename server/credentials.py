"""The credentials a server accepts (`AuthTable`) and where they come from: `--auth-token` /
`--auth-token-file` / `TKG_AUTH_TOKEN` / `--read-only-token` (tenant `default`) and `--auth-file`
(YAML or JSON, hashes only):

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

A presented token is hashed once and compared with every configured digest in constant time
(`hmac.compare_digest`, no early exit), so the time taken says nothing about which digest, if
any, came close. What a matched identity may call is `tkg.server.auth`'s.

Threading: a table is built whole, at start (`tkg serve`'s flags) or on SIGHUP (`cli.reload_auth`,
a signal handler on the event loop; a file that fails to load leaves the table in force), then
swapped whole into the `Authenticator` on the loop. A table is frozen; only its lookup caches
(`anonymous`, the subject map) fill on first use, by the guard on the loop, so no lock is needed.
"""

from __future__ import annotations

import functools
import hashlib
import hmac
import os
import re
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from tkg.server import subjects as dn
from tkg.server.config import ConfigError, read_file
from tkg.server.identity import ANONYMOUS, DEFAULT_TENANT, QUOTA_KEYS, Identity, Quota, Tenant

MIN_TOKEN_LEN = 16
TENANT_NAME = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]{0,63}$")
ROLES = ("full", "read-only", "peer")


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


NO_DEFAULTS = Quota()  # a frozen default argument, built once: every key unset (unlimited)


def build_table(
    full_tokens: Sequence[str] = (),
    read_only_tokens: Sequence[str] = (),
    entries: Sequence[dict[str, Any]] = (),
    defaults: Quota = NO_DEFAULTS,
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
