"""`tkg bench kernel`: speed of the kernel backends, always as ratios against peers measured in the same run.

- `kernel`: the `cpu` backend against the machine's read bandwidth and torch peers (the CLI entry).
- `cases`: the inputs, one decode step over a paged pool and each peer's view of it.
- `membw`: the machine's read bandwidth, measured in the same process.
- `nki`: what the NKI kernel does at the reference shapes, counted by the emulator.
"""
