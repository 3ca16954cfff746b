"""`tkg.kernel`: the `attention_tkg` decode-attention kernel and its backends.

- `AttnTKGConfig`, `attention_tkg`: the Neuron library's API (docs/design/kernel.md).
- `paged_decode`: the service's fast path over a paged, head-major KV pool.
- `decisions`: the NKI kernel's tiling and sharding rules (`nki_tkg.rules`) on the host, with checks.
- `kv_store`: the KV-store interface the server's cache uses (`create_kv_store(backend, geometry)`).
"""

from tkg.kernel.api import attention_tkg
from tkg.kernel.backends import BackendUnavailable, available, names
from tkg.kernel.config import AttnTKGConfig
from tkg.kernel.paged import paged_decode

__all__ = ["AttnTKGConfig", "BackendUnavailable", "attention_tkg", "available", "names", "paged_decode"]
