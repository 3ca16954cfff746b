"""Build hook for the optional native CPU kernel (see kernel/backends/native/).

Everything else lives in pyproject.toml. The extension is optional: when it cannot be built (no
C compiler, no Python headers) the install still succeeds and the `cpu` backend falls back to
its torch implementation (`tkg.kernel.backends.cpu.implementation()` then says "torch").

Portability: the extension is compiled for the baseline ISA of the target; the AVX2 and
AVX-512(-BF16) variants of the kernel carry their own `#pragma GCC target` and are chosen at
run time by CPUID, so a wheel or image built on one x86-64 machine runs on any other. Never add
-march=native here.
"""

import sys

from setuptools import Extension, setup
from setuptools.command.build_ext import build_ext

NATIVE_SOURCES = [
    "kernel/backends/native/module.c",
    "kernel/backends/native/pool.c",
    "kernel/backends/native/host_ops.c",
    "kernel/backends/native/attn_amx.c",
    "kernel/backends/native/attn_avx512bf16.c",
    "kernel/backends/native/attn_avx512.c",
    "kernel/backends/native/attn_avx2.c",
    "kernel/backends/native/attn_generic.c",
]


class OptionalBuildExt(build_ext):
    """build_ext that warns instead of failing: the native kernel is an accelerator only."""

    def run(self) -> None:
        try:
            super().run()
        except Exception as exc:  # any toolchain failure means "no native kernel"
            self._skip(exc)

    def build_extension(self, ext: Extension) -> None:
        try:
            super().build_extension(ext)
        except Exception as exc:
            self._skip(exc)

    @staticmethod
    def _skip(exc: Exception) -> None:
        print(
            f"WARNING: the native CPU kernel (tkg.kernel.backends._native) was not built ({exc}); "
            "the cpu backend will use its torch implementation",
            file=sys.stderr,
        )


native = Extension(
    "tkg.kernel.backends._native",
    sources=NATIVE_SOURCES,
    depends=["kernel/backends/native/tkg_native.h", "kernel/backends/native/attn_impl.h"],
    extra_compile_args=["-O3", "-std=gnu11", "-Wno-psabi", "-pthread", "-fno-math-errno"],
    extra_link_args=["-pthread"],
    libraries=["m"],
    optional=True,
)

setup(ext_modules=[native], cmdclass={"build_ext": OptionalBuildExt})
