"""Old home of the wire's numpy dtypes: a re-export of `tkg.dtypes`, the registry, for the modules
not moved to it yet (server/service.py and the tests that build the service in-process)."""

from tkg.dtypes import BF16, FP8, FP8_MAX, to_fp8

__all__ = ["BF16", "FP8", "FP8_MAX", "to_fp8"]
