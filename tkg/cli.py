"""The `tkg` console script: one entry point, subcommands implemented where they belong.

Each subcommand lives in its own module exposing `main(argv: list[str]) -> int`, imported only
when chosen, so `tkg loadtest` never imports torch or the server, and `tkg serve` never imports
the load-test tool.
"""

from __future__ import annotations

import importlib
import sys

# command path -> (module, one-line help)
COMMANDS: dict[tuple[str, ...], tuple[str, str]] = {
    ("serve",): ("tkg.server.cli", "run the decode-attention gRPC service"),
    ("loadtest",): ("tkg.client.loadtest", "drive a running server and report latency/throughput"),
    ("bench", "kernel"): ("tkg.bench.kernel", "kernel speed vs memory bandwidth and torch peers"),
    ("bench", "serve"): ("tkg.bench.serve", "service vs a bare gRPC echo with the same bytes"),
    ("bench", "segments"): ("tkg.bench.segments", "a context-parallel decode vs its slowest segment alone"),
}


def _usage() -> str:
    lines = ["usage: tkg <command> [options]", "", "commands:"]
    for path, (_, help_) in COMMANDS.items():
        lines.append(f"  {' '.join(path):<14} {help_}")
    lines.append("")
    lines.append("`tkg <command> --help` shows a command's options.")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    args = list(sys.argv[1:] if argv is None else argv)
    if not args or args[0] in ("-h", "--help"):
        print(_usage())
        return 0 if args else 2
    if args[0] in ("-V", "--version"):
        from tkg import __version__

        print(__version__)
        return 0
    for path, (module, _) in COMMANDS.items():
        if tuple(args[: len(path)]) == path:
            mod = importlib.import_module(module)
            return int(mod.main(args[len(path) :]) or 0)
    print(f"tkg: unknown command {' '.join(args[:2])!r}\n", file=sys.stderr)
    print(_usage(), file=sys.stderr)
    return 2


if __name__ == "__main__":
    raise SystemExit(main())
