"""tkg: decode attention (`attention_tkg`) served over gRPC from a resident paged KV cache.

Subpackages: `tkg.kernel` (the kernel and its backends), `tkg.server` (the service),
`tkg.client` (the thin client and load-test tool), `tkg.bench` (the benchmarks),
`tkg.integrations` (transformers), `tkg.v1` (generated protobuf code). Shared by all of them, with
no torch import: `tkg.dtypes` (the dtype registry), `tkg.status` (gRPC status codes), `tkg.codec`
(numpy <-> wire tensors).
"""

__version__ = "0.1.0"
