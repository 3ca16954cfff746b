"""Generated protobuf and gRPC code for `tkg.v1` (regenerate with `make proto`; do not edit)."""
