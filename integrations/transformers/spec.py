"""`server_spec(model)`: the tkg spec for a loaded transformers model's attention, sinks included.

The keys come from the model's config through the same translation as `tkg serve --hf-config`
(`tkg.server.hf_config.spec_keys`); the loaded model adds what only it knows: its dtype (the KV
dtype) and gpt-oss's learned sink logits (`sinks` parameters of the attention modules).
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch

from tkg import dtypes
from tkg.server.hf_config import spec_keys

# A model's parameter dtype -> the KV dtype name (fp8 is a storage dtype, never a model's).
KV_DTYPE_OF_MODEL: dict[torch.dtype, str] = {d.torch: d.name for d in dtypes.IO}


@dataclass
class ServerSpec:
    """Spec keys (as a `tkg serve --config` file holds them) and the sinks `[num_layers, num_q_heads]`."""

    keys: dict[str, Any]
    sinks: np.ndarray | None = None

    def write(self, path: str | Path) -> Path:
        """Write the JSON spec file (and `<stem>.sinks.npy` beside it); returns the spec's path."""
        path = Path(path)
        keys = dict(self.keys)
        if self.sinks is not None:
            npy = path.with_name(path.stem + ".sinks.npy")
            np.save(npy, self.sinks)
            keys["sinks"] = npy.name  # relative to the spec file
        path.write_text(json.dumps(keys, indent=2) + "\n")
        return path


def server_spec(model: torch.nn.Module, **overrides: Any) -> ServerSpec:
    """The spec for `model`'s attention: geometry, windows and RoPE from its config, KV dtype from
    its parameters, sinks from its attention modules, softmax scale when not 1/sqrt(head_dim).
    `overrides` set any other spec key (e.g. `kv_cache_bytes=2**30`, `max_context=4096`)."""
    from tkg.integrations.transformers.remote import attention_modules

    config = model.config.get_text_config(decoder=True)
    keys = spec_keys(config.to_dict())
    keys["kv_dtype"] = KV_DTYPE_OF_MODEL.get(model.dtype, keys.get("kv_dtype", "bfloat16"))
    mods = attention_modules(model)
    if len(mods) != keys["num_layers"]:
        raise ValueError(f"model: {len(mods)} attention modules; expected num_hidden_layers={keys['num_layers']}")
    scales = {float(m.scaling) for m in mods}
    if len(scales) != 1:
        raise ValueError(f"model: attention scalings {sorted(scales)}; expected one for all layers")
    (scale,) = scales
    if not np.isclose(scale, keys["head_dim"] ** -0.5, rtol=1e-7):
        keys["softmax_scale"] = scale
    sinks = None
    if all(isinstance(getattr(m, "sinks", None), torch.Tensor) for m in mods):
        sinks = np.stack([m.sinks.detach().float().cpu().numpy() for m in mods]).astype(np.float32)
    return ServerSpec({**keys, **overrides}, sinks)
