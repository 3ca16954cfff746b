"""Build hook for the optional native CPU kernel (see kernel/native/).

Everything else lives in pyproject.toml. The extension is optional: when no C compiler is
available the build goes on and the `cpu` backend falls back to its torch implementation.
"""

from setuptools import setup

setup()
