"""The status mapping (`tkg.status`): wire numbers, and the server's and the client's exception
classes named after their codes, so a server error arrives as the client class of the same name."""

from __future__ import annotations

import grpc
import pytest

from tkg import status
from tkg.client import errors as client_errors
from tkg.server import errors as server_errors


def _subclasses(cls: type) -> list[type]:
    out = []
    for sub in cls.__subclasses__():
        out += [sub, *_subclasses(sub)]
    return out


def test_wire_numbers_round_trip_and_unknown_numbers_are_unknown() -> None:
    for code in grpc.StatusCode:
        assert status.from_number(status.number(code)) is code
    assert status.number(grpc.StatusCode.INVALID_ARGUMENT) == 3
    assert status.from_number(999) is grpc.StatusCode.UNKNOWN


def test_the_client_has_a_class_for_every_code_but_ok() -> None:
    assert set(client_errors.BY_CODE) == set(grpc.StatusCode) - {grpc.StatusCode.OK}
    for code, cls in client_errors.BY_CODE.items():
        assert cls.__name__ == status.class_name(code) and cls.code is code
        assert type(client_errors.error_for(status.number(code), "x")) is cls


def test_each_server_error_arrives_as_the_client_class_of_its_name() -> None:
    raised = [c for c in _subclasses(server_errors.ServiceError) if c is not server_errors.Denied]
    assert {c.__name__ for c in raised} >= {"InvalidArgument", "NotFound", "Unauthenticated", "PermissionDenied"}
    for cls in raised:
        assert cls.__name__ == status.class_name(cls.code), cls
        assert client_errors.BY_CODE[cls.code].__name__ == cls.__name__


def test_the_auth_guard_raises_the_service_errors() -> None:
    from tkg.server import auth

    assert auth.Denied is server_errors.Denied
    assert issubclass(server_errors.Unauthenticated, auth.Denied)
    assert issubclass(server_errors.PermissionDenied, auth.Denied)


def test_by_code_refuses_a_misnamed_class_and_a_code_twice() -> None:
    class NotFound(Exception):
        code = grpc.StatusCode.NOT_FOUND

    class Missing(Exception):
        code = grpc.StatusCode.NOT_FOUND

    assert status.by_code([NotFound]) == {grpc.StatusCode.NOT_FOUND: NotFound}
    with pytest.raises(ValueError, match="Missing: code NOT_FOUND; expected the class NotFound"):
        status.by_code([Missing])
    with pytest.raises(ValueError, match="already belongs to NotFound"):
        status.by_code([NotFound, NotFound])
