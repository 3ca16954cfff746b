"""`tkg.client`: the thin client (numpy in, numpy out) and the load-test tool.

Imports neither torch nor `tkg.server`: this is what orchestrators embed.

    from tkg.client import Client
    with Client("localhost:50051") as c:
        info = c.server_info()
        seq = c.create_sequence().sequence_id
        res = c.decode(layer, [seq], [pos], q, k, v)   # res.out: [B, Hq, S, d]
"""

from tkg.client import errors
from tkg.client.aio import AsyncClient
from tkg.client.client import Client
from tkg.client.errors import TkgError
from tkg.client.messages import DecodeInput, DecodeResult, Timing

__all__ = ["AsyncClient", "Client", "DecodeInput", "DecodeResult", "Timing", "TkgError", "errors"]
