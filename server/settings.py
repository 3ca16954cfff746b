"""`ServeSettings`: everything about one server instance that is not the model spec.

One object, read where it is used (the service's queue and message limits, the batcher's delay and
inline bounds, the app's ports and security), never copied field by field into another options type.
"""

from __future__ import annotations

from dataclasses import dataclass, field

from tkg.server.batcher import INLINE_KERNEL_BYTES, INLINE_WRITE_BYTES, LONE_INLINE_BYTES
from tkg.server.credentials import AuthTable
from tkg.server.identity import Quota

DEFAULT_MAX_MESSAGE = 64 * 2**20


@dataclass(frozen=True)
class ServeSettings:
    """Everything about one instance that is not the model spec (ports, limits, security)."""

    backend: str  # a resolved backend name
    host: str = "0.0.0.0"
    port: int = 50051  # 0: any free port
    # `--listen` addresses (host:port or unix:PATH); when given they replace host:port.
    listen: tuple[str, ...] = ()
    metrics_host: str = "0.0.0.0"
    metrics_port: int | None = 9400  # None: no metrics endpoint; 0: any free port
    max_message_bytes: int = DEFAULT_MAX_MESSAGE
    batch_delay_us: int = 100
    max_pending: int = 1024
    auth: AuthTable = field(default_factory=AuthTable)  # tokens, subjects, tenants, quotas
    auth_file: str | None = None  # re-read on SIGHUP (`App.reload_auth`)
    quota_defaults: Quota = field(default_factory=Quota)  # for tenants the file gives none
    # Sent when pushing to --peers: a `peer` credential (--peer-token-file; every tenant's sequences
    # move), else the first full-access token of tenant `default` (only its sequences can move).
    peer_token: str | None = None
    tls_cert: bytes | None = None  # PEM chain; with tls_key: serve TLS
    tls_key: bytes | None = None
    tls_client_ca: bytes | None = None  # PEM roots: require and verify client certificates (mTLS)
    max_sequences: int | None = None  # live sequences server-wide
    max_concurrent_streams: int | None = None  # per connection (gRPC's own limit)
    gateway_metrics: bool = False
    inline_kernel_bytes: int = INLINE_KERNEL_BYTES  # smaller launches run on the event loop thread
    lone_inline_bytes: int = LONE_INLINE_BYTES  # a lone caller's launches up to this much K+V, too
    inline_write_bytes: int = INLINE_WRITE_BYTES  # larger AppendKV chunks / import messages: written off the loop
    kernel_cores: int = 0  # cores the cpu kernel may use; 0: the CPUs this process may run on
    expiry_period_s: float | None = None  # idle-expiry sweep period; None: idle_ttl_s / 4, in [0.05, 30]
    peers: tuple[str, ...] = ()  # the other replicas, named as clients name them (the routing hash covers the name)
    # Compiled shape buckets of device backends (nki, nki-emu); None: powers of two up to the spec's limits.
    context_buckets: tuple[int, ...] | None = None
    batch_buckets: tuple[int, ...] | None = None
    # Device backends: the LNC degree of every launch and of the store's bucket alignment (`tkg serve`
    # reads NEURON_LOGICAL_NC_CONFIG, `tkg.kernel.backends.neuron_env.lnc_config`). 2: trn2's default.
    lnc: int = 2
    backend_note: str = ""  # for the start line: why `auto` passed over a preferred backend
    # KV tiers (`tkg.server.tiers`): host-memory bytes (0: none), the disk tier's directory (None:
    # none; it also persists sequences across restarts) and its bound (None: free space less a margin).
    host_cache_bytes: int = 0
    spill_dir: str | None = None
    spill_bytes: int | None = None
    persist: str = "on-drain"
