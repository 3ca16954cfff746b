"""`tkg.server`: the decode-attention gRPC service (`tkg serve`)."""
