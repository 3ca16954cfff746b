"""Hugging Face transformers on tkg (`pip install 'tkg-attention[transformers]'`).

- `server_spec(model)`: the spec a server needs for `model`'s attention (sinks included);
  `.write(path)` makes a `tkg serve --config` file.
- `remote_attention(model, client)`: a context manager; inside it `model.generate(...)` runs the
  model's decode attention on the server (`tkg.integrations.transformers.remote`).
- `python -m tkg.integrations.transformers.demo --target host:port`: a runnable example.

Imports are lazy so that `import tkg.integrations.transformers` does not load torch.
"""

from __future__ import annotations

from typing import Any

__all__ = ["RemoteCache", "RemoteSession", "ServerSpec", "remote_attention", "server_spec"]

_WHERE = {"RemoteCache": "remote", "RemoteSession": "remote", "remote_attention": "remote",
          "ServerSpec": "spec", "server_spec": "spec"}  # fmt: skip


def __getattr__(name: str) -> Any:
    if name not in _WHERE:
        raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
    import importlib

    return getattr(importlib.import_module(f"{__name__}.{_WHERE[name]}"), name)
