"""Every shipped backend module satisfies `tkg.kernel.backends.KernelBackend` and the Protocol of
each optional hook it defines: the members exist and accept the calls the Protocols describe.

Modules that cannot be imported here (`nkilib` needs the Neuron SDK) are read from their source."""

from __future__ import annotations

import ast
import importlib
import importlib.util
import inspect
import types
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest

from tkg.kernel import backends

_KINDS = (inspect.Parameter.POSITIONAL_ONLY, inspect.Parameter.POSITIONAL_OR_KEYWORD)


def _protocol_methods(proto: type) -> dict[str, inspect.Signature]:
    """The Protocol's methods as a module function would have them (no `self`)."""
    out = {}
    for name, fn in vars(proto).items():
        if inspect.isfunction(fn) and not name.startswith("_"):
            sig = inspect.signature(fn)
            out[name] = sig.replace(parameters=list(sig.parameters.values())[1:])
    return out


def _accepts(impl: inspect.Signature, wanted: inspect.Signature) -> str | None:
    """None when every call `wanted` allows binds to `impl` (its positional arguments and, with
    `**options`, any keyword), else what is missing."""
    args = [object() for p in wanted.parameters.values() if p.kind in _KINDS and p.default is p.empty]
    try:
        impl.bind(*args)
    except TypeError as exc:
        return f"cannot be called with {len(args)} positional argument(s): {exc}"
    takes_options = any(p.kind is p.VAR_KEYWORD for p in wanted.parameters.values())
    if takes_options and not any(p.kind is p.VAR_KEYWORD for p in impl.parameters.values()):
        return "takes no **options"
    return None


def conformance(members: dict[str, Any]) -> list[str]:
    """What a module with top-level `members` (name -> value or signature) lacks."""
    problems = []
    if not isinstance(members.get("NAME"), str):
        problems.append("NAME: missing or not a str")
    wanted = {**_protocol_methods(backends.KernelBackend)}
    for hook, proto in backends.HOOKS.items():
        if hook in members:
            wanted.update(_protocol_methods(proto))
    for name, sig in wanted.items():
        impl = members.get(name)
        if impl is None:
            problems.append(f"{name}: missing")
            continue
        why = _accepts(impl if isinstance(impl, inspect.Signature) else inspect.signature(impl), sig)
        if why:
            problems.append(f"{name}: {why}")
    return problems


def _imported_members(mod: types.ModuleType) -> dict[str, Any]:
    return {k: v for k, v in vars(mod).items() if k == "NAME" or (callable(v) and not k.startswith("_"))}


def _signature(fn: ast.FunctionDef) -> inspect.Signature:
    a, P = fn.args, inspect.Parameter
    params = [P(x.arg, P.POSITIONAL_ONLY) for x in a.posonlyargs]
    first_default = len(a.args) - len(a.defaults)
    params += [P(x.arg, P.POSITIONAL_OR_KEYWORD, default=None if i >= first_default else P.empty)
               for i, x in enumerate(a.args)]  # fmt: skip
    if a.vararg:
        params.append(P(a.vararg.arg, P.VAR_POSITIONAL))
    params += [P(x.arg, P.KEYWORD_ONLY, default=None if d is not None else P.empty)
               for x, d in zip(a.kwonlyargs, a.kw_defaults, strict=True)]  # fmt: skip
    if a.kwarg:
        params.append(P(a.kwarg.arg, P.VAR_KEYWORD))
    return inspect.Signature(params)


def _source_members(path: str) -> dict[str, Any]:
    tree = ast.parse(Path(path).read_text())
    out: dict[str, Any] = {}
    for node in tree.body:
        if isinstance(node, ast.FunctionDef):
            out[node.name] = _signature(node)
        elif isinstance(node, ast.Assign) and any(isinstance(t, ast.Name) and t.id == "NAME" for t in node.targets):
            out["NAME"] = ast.literal_eval(node.value)
    return out


def _members(name: str) -> dict[str, Any]:
    path = backends.module_path(name)
    try:
        return _imported_members(importlib.import_module(path))
    except ImportError:
        spec = importlib.util.find_spec(path)
        assert spec is not None and spec.origin is not None, path
        return _source_members(spec.origin)


# The hooks each backend ships. A lost hook is no error to the registry (callers fall back: to
# `attention_tkg` per kv head, to host pools, to "available"), so losing one silently would cost
# speed or a device store: the list pins them.
HOOKS_SHIPPED = {
    "nki": {"available", "auto_reason", "require_runtime", "paged_decode", "kv_store"},
    "cpu": {"available", "paged_decode"},
    "reference": set(),
    "nki-emu": {"available", "paged_decode", "kv_store"},
    "nkilib": {"available"},
    "nkilib-emu": {"available", "paged_decode"},
}


def test_the_pinned_list_names_every_backend() -> None:
    assert set(HOOKS_SHIPPED) == set(backends.names())


@pytest.mark.parametrize("name", backends.names())
def test_every_backend_module_satisfies_the_protocols(name: str) -> None:
    members = _members(name)
    assert conformance(members) == []
    assert members["NAME"] == name  # `run_paged` and the metrics know a backend by its module's NAME
    assert {h for h in backends.HOOKS if h in members} == HOOKS_SHIPPED[name]


def test_the_source_reading_agrees_with_the_imported_module() -> None:
    """The fallback for modules that do not import here sees what the import sees."""
    path = importlib.util.find_spec(backends.module_path("cpu")).origin
    from_source, imported = _source_members(path), _imported_members(importlib.import_module("tkg.kernel.backends.cpu"))
    for name in ("NAME", "run", *backends.HOOKS):
        assert (name in from_source) == (name in imported), name
        if name != "NAME" and name in imported:
            assert list(from_source[name].parameters) == list(inspect.signature(imported[name]).parameters)


def _fake(**members: Callable[..., Any] | str) -> dict[str, Any]:
    return {"NAME": "fake", "run": lambda call: None, **members}


@pytest.mark.parametrize(
    ("members", "problem"),
    [
        ({"NAME": "fake"}, "run: missing"),
        ({"run": lambda call: None}, "NAME: missing"),
        (_fake(run=lambda: None), "run: cannot be called with 1 positional"),
        (_fake(paged_decode=lambda args: None), "paged_decode: takes no **options"),
        (_fake(kv_store=lambda **options: None), "kv_store: cannot be called with 1 positional"),
        (_fake(available=lambda why: None), "available: cannot be called with 0 positional"),
    ],
)
def test_the_check_names_what_a_backend_lacks(members: dict[str, Any], problem: str) -> None:
    assert any(p.startswith(problem) for p in conformance(members)), conformance(members)
    assert conformance(_fake()) == []
