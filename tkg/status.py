"""gRPC status codes: wire number <-> `grpc.StatusCode` <-> exception class, in one place.

A DecodeStream `Error` carries a code as its number; metrics label a call with the code's name;
the server raises, and the client raises in turn, one exception class per code named after it
(`INVALID_ARGUMENT` -> `InvalidArgument`: `tkg.server.errors`, `tkg.client.errors`).
"""

from __future__ import annotations

from collections.abc import Iterable
from typing import Protocol, TypeVar

import grpc

BY_NUMBER: dict[int, grpc.StatusCode] = {c.value[0]: c for c in grpc.StatusCode}


class HasCode(Protocol):
    code: grpc.StatusCode


C = TypeVar("C", bound=type[HasCode])


def number(code: grpc.StatusCode) -> int:
    """The code's number on the wire (`tkg.v1.Error.code`)."""
    return code.value[0]


def from_number(n: int) -> grpc.StatusCode:
    """The code of a wire number; UNKNOWN for a number gRPC does not define."""
    return BY_NUMBER.get(n, grpc.StatusCode.UNKNOWN)


def class_name(code: grpc.StatusCode) -> str:
    """The exception class named after `code`: `INVALID_ARGUMENT` -> `InvalidArgument`."""
    return "".join(word.capitalize() for word in code.name.split("_"))


def by_code(classes: Iterable[C]) -> dict[grpc.StatusCode, C]:
    """`{cls.code: cls}` for exception classes each named after its code; ValueError when one is
    misnamed or two share a code (so a class cannot silently answer for another code)."""
    table: dict[grpc.StatusCode, C] = {}
    for cls in classes:
        if cls.__name__ != class_name(cls.code):
            raise ValueError(f"{cls.__name__}: code {cls.code.name}; expected the class {class_name(cls.code)}")
        if cls.code in table:
            raise ValueError(f"{cls.__name__}: code {cls.code.name} already belongs to {table[cls.code].__name__}")
        table[cls.code] = cls
    return table
