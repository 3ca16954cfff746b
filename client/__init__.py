"""`tkg.client`: the thin client (numpy in, numpy out) and the load-test tool.

Imports neither torch nor `tkg.server` nor `tkg.bench`: this is what orchestrators embed.

    core.py       every decision, no I/O: routing, requests, verdicts on errors, decode split/merge
    client.py     `Client`: the grpc (blocking) shell that makes the calls the core asks for
    aio.py        `AsyncClient`: the same shell over grpc.aio
    routing.py    rendezvous routing, `Router` (where moved sequences are), the search for them
    instances.py  instance ids seen, to tell a restarted replica (`ServerRestarted`) from expiry
    messages.py   numpy <-> proto: request builders, `DecodeInput`, `DecodeResult`, channels
    errors.py     one exception class per gRPC status code
    loadtest.py, stats.py   the load-test tool and its statistics

    from tkg.client import Client, io_numpy_dtype
    with Client("localhost:50051") as c:
        info = c.server_info()
        dt = io_numpy_dtype(info)                      # what q/k/v/out travel in, e.g. ml_dtypes.bfloat16
        seq = c.create_sequence().sequence_id
        res = c.decode(layer, [seq], [pos], q, k, v)   # res.out: [B, Hq, S, d]
"""

import numpy as np

from tkg import codec
from tkg.client import errors
from tkg.client.aio import AsyncClient
from tkg.client.client import Client
from tkg.client.errors import TkgError
from tkg.client.messages import DecodeInput, DecodeResult, Timing
from tkg.codec import dtype_to_numpy
from tkg.v1 import decode_attention_pb2 as _pb


def io_numpy_dtype(info: _pb.ServerInfo) -> np.dtype:
    """The numpy dtype q, k, v and out travel in for the server that sent `info` (`ServerInfo.io_dtype`;
    a server older than that field: its `kv_dtype`). bf16 is `ml_dtypes.bfloat16`."""
    return codec.dtype_to_numpy(codec.io_dtype_code(info), "ServerInfo.io_dtype")


__all__ = [
    "AsyncClient", "Client", "DecodeInput", "DecodeResult", "Timing", "TkgError", "dtype_to_numpy", "errors",
    "io_numpy_dtype",
]  # fmt: skip
