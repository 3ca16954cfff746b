"""tkg: decode attention (`attention_tkg`) served over gRPC from a resident paged KV cache.

Subpackages: `tkg.kernel` (the kernel and its backends), `tkg.server` (the service),
`tkg.client` (the thin client and load-test tool), `tkg.v1` (generated protobuf code).
"""

__version__ = "0.1.0"
