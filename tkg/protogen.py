"""Regenerate the committed protobuf/gRPC Python code from `proto/` (`make proto`).

`generate(dest)` writes `tkg/v1/*_pb2*.py(i)` under `dest`; the test suite generates into a
temporary folder and compares with the committed files, so stale generated code fails CI.
"""

from __future__ import annotations

import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
PROTO_DIR = ROOT / "proto"
PROTOS = ["tkg/v1/decode_attention.proto"]
GENERATED = ["decode_attention_pb2.py", "decode_attention_pb2.pyi", "decode_attention_pb2_grpc.py"]


def generate(dest: Path) -> list[Path]:
    """Run protoc (grpcio-tools) into `dest`; return the generated files."""
    from grpc_tools import protoc  # dev dependency only

    dest.mkdir(parents=True, exist_ok=True)
    args = [
        "protoc",
        f"-I{PROTO_DIR}",
        f"--python_out={dest}",
        f"--pyi_out={dest}",
        f"--grpc_python_out={dest}",
        *(str(PROTO_DIR / p) for p in PROTOS),
    ]
    if protoc.main(args) != 0:
        raise RuntimeError(f"protoc failed: {' '.join(args)}")
    return [dest / "tkg" / "v1" / name for name in GENERATED]


def main() -> int:
    files = generate(PROTO_DIR)
    for f in files:
        print(f"generated {f.relative_to(ROOT)}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
