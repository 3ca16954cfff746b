"""`tkg bench ...`: benchmarks that print ratios against peers measured in the same run.

Tools, not the product: nothing in `tkg.client`, `tkg.server` or `tkg.kernel` imports this package.
- `kernel` (`tkg bench kernel`): the `cpu` backend against the machine's read bandwidth and torch peers.
- `cases`: the inputs, one decode step over a paged pool and each peer's view of it.
- `membw`: the machine's read bandwidth, measured in the same process.
- `nki`, `nki_peer`: what the NKI kernel (and nki-library's) does at the reference shapes, counted by the emulator.
- `serve` (`tkg bench serve`): the service against `echo`, a bare gRPC server carrying the same bytes.
- `tiers` (`tkg bench tiers`): KV tier restores against memcpy and the disk's O_DIRECT read; a lone
  caller's Decode while another client forces spills.
"""
