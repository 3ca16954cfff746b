"""`tkg.kernel`: the `attention_tkg` decode-attention kernel and its backends.

- `AttnTKGConfig`, `attention_tkg`: the Neuron library's API (design/kernel.md).
- `paged_decode`: the service's fast path over a paged, head-major KV pool.
- `decisions`: host-side tiling and sharding choices the NKI kernel makes, as pure functions.
"""

from tkg.kernel.api import attention_tkg
from tkg.kernel.backends import BackendUnavailable, available, names
from tkg.kernel.config import AttnTKGConfig
from tkg.kernel.paged import paged_decode

__all__ = ["AttnTKGConfig", "BackendUnavailable", "attention_tkg", "available", "names", "paged_decode"]
