"""Demo: a tiny transformers model generates with its decode attention on a running tkg server.

    python -m tkg.integrations.transformers.demo --write-spec demo.json    # the server's spec for the demo model
    tkg serve --config demo.json --port 50051 &
    python -m tkg.integrations.transformers.demo --target localhost:50051

The model is random (seeded, no download; `tiny.py`), so its "text" is its token ids shown as ASCII
(the vocabulary has 128 entries). It generates once with its own attention and once on the server,
and prints both texts, whether the ids agree, tokens/s of each (after a 2-token warm-up run), and
where the Decode time went (the server's `Timing`: queue, kernel, server total, and the rest:
network and client).
"""

from __future__ import annotations

import argparse
import sys
import time

import torch

from tkg import dtypes
from tkg.client import Client, errors
from tkg.integrations.transformers.remote import remote_attention
from tkg.integrations.transformers.spec import server_spec
from tkg.integrations.transformers.tiny import FAMILIES, VOCAB, tiny_model

DTYPES = {name: dtypes.BY_NAME[name].torch for name in ("float32", "bfloat16")}  # the demo's --dtype choices


def as_text(ids: list[int]) -> str:
    return "".join(chr(i) if 32 <= i < 127 else "." for i in ids)


def prompts(batch: int, length: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Left-padded random prompts of lengths `length`, `length - 1`, ... (at least 1)."""
    g = torch.Generator().manual_seed(1)
    ids = torch.randint(3, VOCAB, (batch, length), generator=g)
    mask = torch.zeros_like(ids)
    for row in range(batch):
        mask[row, min(row, length - 1) :] = 1
    return ids.masked_fill(mask == 0, 0), mask


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m tkg.integrations.transformers.demo", description=__doc__.split("\n")[0])
    p.add_argument("--target", help="host:port of a tkg server serving the demo model's spec (see --write-spec)")
    p.add_argument("--write-spec", metavar="PATH", help="write the server spec (JSON) for the demo model and exit")
    p.add_argument("--family", choices=FAMILIES, default="llama3", help="model family (default llama3)")
    p.add_argument("--dtype", choices=sorted(DTYPES), default="float32", help="model and KV dtype (default float32)")
    p.add_argument("--batch", type=int, default=4, help="prompts in the batch (default 4)")
    p.add_argument("--prompt-len", type=int, default=24, help="longest prompt, tokens (default 24)")
    p.add_argument("--new-tokens", type=int, default=64, help="tokens to generate per prompt (default 64)")
    p.add_argument("--threads", type=int, default=1, help="torch threads (default 1: the model is tiny)")
    args = p.parse_args(argv)
    torch.set_num_threads(args.threads)
    model = tiny_model(args.family, DTYPES[args.dtype])
    if args.write_spec:
        path = server_spec(model, num_blocks=1024).write(args.write_spec)
        print(f"wrote {path}; now: tkg serve --config {path} --port 50051")
        return 0
    if not args.target:
        p.error("--target is required (or --write-spec)")
    if not 1 <= args.batch <= 64 or not 1 <= args.prompt_len <= 256 or not 1 <= args.new_tokens <= 256:
        p.error("--batch in [1, 64], --prompt-len and --new-tokens in [1, 256] expected")
    ids, mask = prompts(args.batch, args.prompt_len)
    kw = dict(input_ids=ids, attention_mask=mask, max_new_tokens=args.new_tokens, min_new_tokens=args.new_tokens,
              do_sample=False)  # fmt: skip
    tokens = args.batch * args.new_tokens
    warm = {**kw, "max_new_tokens": 2, "min_new_tokens": 2}  # first calls pay one-off set-up on both sides
    model.generate(**warm)
    t0 = time.perf_counter()
    local = model.generate(**kw)[:, ids.shape[1] :]
    local_s = time.perf_counter() - t0
    try:
        with Client(args.target, timeout=30) as client, remote_attention(model, client) as session:
            model.generate(**warm)
            session.stats = type(session.stats)()  # count the measured run only
            t0 = time.perf_counter()
            remote = model.generate(**kw)[:, ids.shape[1] :]
            remote_s = time.perf_counter() - t0
            info = session.info
    except ValueError as exc:  # the server serves another model
        print(f"demo: error: {exc}", file=sys.stderr)
        return 2
    except errors.TkgError as exc:
        print(f"demo: error: {args.target}: {exc}", file=sys.stderr)
        return 1
    geometry = f"{info.num_layers} layers, {info.num_q_heads} q / {info.num_kv_heads} kv heads, d={info.head_dim}"
    print(f"model: tiny {args.family} {args.dtype}, server {args.target} backend={info.backend} ({geometry})")
    for row in range(args.batch):
        n = int(mask[row].sum())
        print(f"  [{row}] prompt {n:3d} tokens -> {as_text(remote[row].tolist())!r}")
    same = bool(torch.equal(local, remote))
    print(f"same ids as local attention: {'yes' if same else 'no'}")
    print(f"tokens/s: tkg {tokens / remote_s:.0f} ({tokens} tokens in {remote_s:.2f} s), "
          f"local attention {tokens / local_s:.0f} ({local_s:.2f} s)")  # fmt: skip
    print(f"server timing: {session.stats.split()}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
