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
    ("bench", "host"): ("tkg.bench.host", "server host time per step vs the device kernel's estimate"),
    ("bench", "segments"): ("tkg.bench.segments", "a context-parallel decode vs its slowest segment alone"),
    ("bench", "tiers"): ("tkg.bench.tiers", "KV tier restores vs memcpy and disk reads; decode under spills"),
}


# Modules of the `server` extra (torch and the service's own dependencies). A command that needs one
# of them says which extra to install instead of printing an ImportError's traceback.
SERVER_EXTRA_MODULES = frozenset(
    {"torch", "prometheus_client", "grpc_health", "grpc_reflection", "yaml", "uvloop"}
)
# Commands that run the kernel or the service: they need the `server` extra.
NEEDS_SERVER_EXTRA = frozenset({("serve",), ("bench", "kernel"), ("bench", "serve"), ("bench", "tiers")})


def _usage(prefix: tuple[str, ...] = ()) -> str:
    """The command list (those under `prefix`, e.g. ("bench",), when given)."""
    head = " ".join(("tkg", *prefix))
    lines = [f"usage: {head} <command> [options]", "", "commands:"]
    for path, (_, help_) in COMMANDS.items():
        if path[: len(prefix)] == prefix:
            lines.append(f"  {' '.join(path):<14} {help_}")
    lines.append("")
    lines.append("`tkg <command> --help` shows a command's options.")
    return "\n".join(lines)


def _missing_extra(path: tuple[str, ...], exc: ModuleNotFoundError) -> str | None:
    """One line naming the extra to install when `exc` is a missing module of the `server` extra."""
    top = (exc.name or "").split(".")[0]
    if path in NEEDS_SERVER_EXTRA and top in SERVER_EXTRA_MODULES:
        return (
            f"tkg {' '.join(path)}: needs the `[server]` extra (module {top!r} is not installed); "
            "install the `[server]` extra: pip install 'tkg-attention[server]'"
        )
    return None


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
            try:
                mod = importlib.import_module(module)
                return int(mod.main(args[len(path) :]) or 0)
            except ModuleNotFoundError as exc:  # also raised later by a lazy import (a backend's torch)
                line = _missing_extra(path, exc)
                if line is None:
                    raise
                print(line, file=sys.stderr)
                return 2
    groups = {path[0] for path in COMMANDS if len(path) > 1}
    if args[0] in groups and (len(args) == 1 or args[1] in ("-h", "--help")):
        print(_usage((args[0],)))  # `tkg bench`, `tkg bench --help`: the bench commands
        return 0 if len(args) > 1 else 2
    print(f"tkg: unknown command {' '.join(args[:2])!r}\n", file=sys.stderr)
    print(_usage(), file=sys.stderr)
    return 2


if __name__ == "__main__":
    raise SystemExit(main())
