"""AST lint for the NKI language rules that the emulator (like the official simulator) cannot see.

Kernel code is a Python subset evaluated by the NKI compiler (research/nki-api.md 6.1); CPython runs
constructs the compiler rejects. This pass flags, per kernel module:

    NKI001  `is` / `is not` comparisons (use == / !=; e.g. `x != None`)
    NKI002  `*args`, keyword-only `*` or `**kwargs` in an @nki.jit kernel signature
    NKI003  a list passed as an argument to an @nki.jit kernel (pass tuples)
    NKI004  `neuronxcc` imports or references (legacy NKI; a compile error since 0.4)
    NKI005  removed APIs: nl.arange / nl.mgrid / nl.par_dim / nl.dynamic_range,
            nisa.tensor_copy_dynamic_src / _dst, nki.simulate_kernel / baremetal / benchmark / profile
    NKI006  legacy keywords: mask= / dtype= on nisa calls, psumAccumulateFlag=, is_moving_zero=,
            dst_rmw_op=, unique_indices=, use_gpsimd_dma=, nki.jit(platform_target=...)
    NKI007  dict literal keys that are not strings
    NKI008  @nki.jit on a sub-kernel (a jitted function called from another function of the module)
    NKI009  a class not derived solely from nl.NKIObject (or an Enum)
    NKI010  string buffer names (buffer="sbuf"): use nl.sbuf / nl.psum / nl.shared_hbm
    NKI011  NumPy imported into kernel code (not part of the NKI language; use nl.* dtypes and ops)

Use `check_source(text)`, `check_file(path)`, `check_module(module)` or `check_paths(paths)`; each
returns "file:line:col: CODE message" strings (empty when clean). `python -m
tkg.kernel.nki_emu.lint PATH...` prints them and exits 1 when any are found.
"""

from __future__ import annotations

import ast
import inspect
import sys
from pathlib import Path
from types import ModuleType

REMOVED_ATTRS = {
    "nki.language": {
        "arange": "nl.arange was removed in NKI 0.2 (index with slices, nl.ds or .ap())",
        "mgrid": "nl.mgrid was removed in NKI 0.2 (index with slices, nl.ds or .ap())",
        "par_dim": "nl.par_dim was removed in NKI 0.2 (the partition dim is always dim 0)",
        "dynamic_range": "nl.dynamic_range is deprecated in NKI 0.6 (use nl.fori_loop)",
    },
    "nki.isa": {
        "tensor_copy_dynamic_src": "removed in NKI 0.4 (tensor_copy with .ap(scalar_offset=...))",
        "tensor_copy_dynamic_dst": "removed in NKI 0.4 (tensor_copy with .ap(scalar_offset=...))",
    },
    "nki": {
        "simulate_kernel": "removed in NKI 0.2 (use nki.simulate(kernel)(...))",
        "baremetal": "removed in NKI 0.2 (call the @nki.jit kernel)",
        "benchmark": "removed in NKI 0.2 (use the Neuron profiler)",
        "profile": "removed in NKI 0.2 (use the Neuron profiler)",
    },
}
LEGACY_KWARGS = {
    "mask": "masking was removed in NKI 0.2 (slice the operands)",
    "psumAccumulateFlag": "removed in NKI 0.2 (use accumulate=)",
    "is_moving_zero": "removed in NKI 0.2",
    "dst_rmw_op": "removed in NKI 0.3 (use nisa.dma_compute)",
    "unique_indices": "removed from dma_copy in NKI 0.3 (use nisa.dma_compute)",
    "use_gpsimd_dma": "replaced in NKI 0.3 by dma_engine=nisa.dma_engine.gpsimd_dma",
}
BUFFER_NAMES = {"sbuf", "psum", "hbm", "private_hbm", "shared_hbm"}


class _Checker(ast.NodeVisitor):
    def __init__(self, filename: str):
        self.filename = filename
        self.issues: list[str] = []
        self.aliases: dict[str, str] = {}  # local name -> module ("nki", "nki.language", "nki.isa")
        self.jitted: set[str] = set()
        self.func_stack: list[str] = []

    def add(self, node: ast.AST, code: str, msg: str) -> None:
        self.issues.append(
            f"{self.filename}:{getattr(node, 'lineno', 0)}:{getattr(node, 'col_offset', 0) + 1}: {code} {msg}"
        )

    # -- imports ----------------------------------------------------------------------------
    def visit_Import(self, node: ast.Import) -> None:
        for a in node.names:
            if a.name.split(".")[0] == "neuronxcc":
                self.add(
                    node,
                    "NKI004",
                    f"import of {a.name}: legacy neuronxcc.nki is a compile error since NKI 0.4; use `import nki`",
                )
            if a.name.split(".")[0] == "numpy":
                self.add(node, "NKI011", "NumPy imported into kernel code: use nl.* dtypes and operators")
            if a.name in ("nki", "nki.language", "nki.isa"):
                self.aliases[a.asname or a.name.split(".")[0]] = a.name if a.asname else "nki"
        self.generic_visit(node)

    def visit_ImportFrom(self, node: ast.ImportFrom) -> None:
        mod = node.module or ""
        if mod.split(".")[0] == "neuronxcc":
            self.add(
                node,
                "NKI004",
                f"import from {mod}: legacy neuronxcc.nki is a compile error since NKI 0.4; use `import nki`",
            )
        if mod.split(".")[0] == "numpy":
            self.add(node, "NKI011", "NumPy imported into kernel code: use nl.* dtypes and operators")
        if mod == "nki":
            for a in node.names:
                if a.name in ("language", "isa"):
                    self.aliases[a.asname or a.name] = f"nki.{a.name}"
                elif a.name in REMOVED_ATTRS["nki"]:
                    self.add(node, "NKI005", f"nki.{a.name}: {REMOVED_ATTRS['nki'][a.name]}")
        if mod in REMOVED_ATTRS:
            for a in node.names:
                if a.name in REMOVED_ATTRS[mod]:
                    self.add(node, "NKI005", f"{mod}.{a.name}: {REMOVED_ATTRS[mod][a.name]}")
        self.generic_visit(node)

    def _module_of(self, node: ast.AST) -> str | None:
        if isinstance(node, ast.Name):
            return self.aliases.get(node.id)
        if isinstance(node, ast.Attribute) and isinstance(node.value, ast.Name):
            base = self.aliases.get(node.value.id)
            if base == "nki" and node.attr in ("language", "isa"):
                return f"nki.{node.attr}"
        return None

    # -- expressions ------------------------------------------------------------------------
    def visit_Compare(self, node: ast.Compare) -> None:
        for op in node.ops:
            if isinstance(op, (ast.Is, ast.IsNot)):
                word = "is not" if isinstance(op, ast.IsNot) else "is"
                self.add(node, "NKI001", f"`{word}` comparison: NKI 0.3+ rejects `is`; use == / != (e.g. `x != None`)")
        self.generic_visit(node)

    def visit_Attribute(self, node: ast.Attribute) -> None:
        mod = self._module_of(node.value)
        if mod in REMOVED_ATTRS and node.attr in REMOVED_ATTRS[mod]:
            self.add(node, "NKI005", f"{mod}.{node.attr}: {REMOVED_ATTRS[mod][node.attr]}")
        if isinstance(node.value, ast.Name) and node.value.id == "neuronxcc":
            self.add(node, "NKI004", "reference to neuronxcc: legacy neuronxcc.nki is a compile error since NKI 0.4")
        self.generic_visit(node)

    def visit_Dict(self, node: ast.Dict) -> None:
        for k in node.keys:
            if k is None:
                continue  # {**other}
            if (isinstance(k, ast.Constant) and not isinstance(k.value, str)) or isinstance(k, ast.Tuple):
                self.add(k, "NKI007", "dict key is not a string: NKI dicts take string keys only")
        self.generic_visit(node)

    def visit_Call(self, node: ast.Call) -> None:
        func = node.func
        mod = self._module_of(func.value) if isinstance(func, ast.Attribute) else None
        for kw in node.keywords:
            if kw.arg in LEGACY_KWARGS:
                self.add(kw.value, "NKI006", f"{kw.arg}=: {LEGACY_KWARGS[kw.arg]}")
            if kw.arg == "dtype" and mod == "nki.isa":
                self.add(
                    kw.value, "NKI006", "dtype= on a nisa call: removed in NKI 0.2 (the dst tensor's dtype decides)"
                )
            if kw.arg == "buffer" and isinstance(kw.value, ast.Constant) and kw.value.value in BUFFER_NAMES:
                self.add(
                    kw.value,
                    "NKI010",
                    f'buffer="{kw.value.value}": string buffer names were removed in NKI 0.3; use nl.{kw.value.value}',
                )
            if kw.arg == "platform_target" and self._is_jit(func):
                self.add(
                    kw.value,
                    "NKI006",
                    "nki.jit(platform_target=...) raises since NKI 0.3; set NEURON_PLATFORM_TARGET_OVERRIDE",
                )
        callee = func.value if isinstance(func, ast.Subscript) else func
        if isinstance(callee, ast.Name) and callee.id in self.jitted:
            for a in list(node.args) + [k.value for k in node.keywords]:
                if isinstance(a, (ast.List, ast.ListComp)):
                    self.add(
                        a,
                        "NKI003",
                        f"list passed to @nki.jit kernel {callee.id}: kernel arguments must be tuples, not lists",
                    )
            if self.func_stack and isinstance(func, ast.Name):
                self.add(
                    node,
                    "NKI008",
                    f"{callee.id} is @nki.jit but called from {self.func_stack[-1]}: "
                    "sub-kernels must be plain functions",
                )
        self.generic_visit(node)

    # -- definitions ------------------------------------------------------------------------
    def _is_jit(self, node: ast.AST) -> bool:
        if isinstance(node, ast.Call):
            node = node.func
        return isinstance(node, ast.Attribute) and node.attr == "jit" and self._module_of(node.value) == "nki"

    def visit_FunctionDef(self, node: ast.FunctionDef) -> None:
        if any(self._is_jit(d) for d in node.decorator_list):
            a = node.args
            if a.vararg is not None or a.kwonlyargs or a.kwarg is not None:
                self.add(
                    node,
                    "NKI002",
                    f"@nki.jit kernel {node.name}: no *args, keyword-only `*` or **kwargs "
                    "in kernel signatures (NKI 0.3)",
                )
        self.func_stack.append(node.name)
        self.generic_visit(node)
        self.func_stack.pop()

    visit_AsyncFunctionDef = visit_FunctionDef  # type: ignore[assignment]

    def visit_ClassDef(self, node: ast.ClassDef) -> None:
        names = []
        for b in node.bases:
            if isinstance(b, ast.Attribute):
                names.append(b.attr)
            elif isinstance(b, ast.Name):
                names.append(b.id)
            else:
                names.append("?")
        ok = names in (["NKIObject"], ["Enum"], ["IntEnum"])
        if not ok:
            self.add(
                node,
                "NKI009",
                f"class {node.name}({', '.join(names)}): kernel classes must derive from nl.NKIObject only (or Enum)",
            )
        self.generic_visit(node)


def _collect_jitted(tree: ast.AST, checker: _Checker) -> None:
    # First pass: the names of jitted functions, so calls that come before the def are seen.
    pre = _Checker(checker.filename)
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            for a in node.names:
                if a.name in ("nki", "nki.language", "nki.isa"):
                    pre.aliases[a.asname or a.name.split(".")[0]] = a.name if a.asname else "nki"
    for node in ast.walk(tree):
        if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef)) and any(
            pre._is_jit(d) for d in node.decorator_list
        ):
            checker.jitted.add(node.name)


def check_source(source: str, filename: str = "<kernel>") -> list[str]:
    """Lint kernel source text; returns the issues as "file:line:col: CODE message"."""
    tree = ast.parse(source, filename=filename)
    checker = _Checker(filename)
    _collect_jitted(tree, checker)
    checker.visit(tree)
    return checker.issues


def check_file(path: str | Path) -> list[str]:
    p = Path(path)
    return check_source(p.read_text(encoding="utf-8"), str(p))


def check_module(module: ModuleType) -> list[str]:
    src = inspect.getsourcefile(module)
    if src is None:
        raise ValueError(f"check_module: {module.__name__} has no source file")
    return check_file(src)


def check_paths(paths: list[str | Path]) -> list[str]:
    """Lint files and (recursively) the .py files of directories."""
    issues: list[str] = []
    for raw in paths:
        p = Path(raw)
        files = sorted(p.rglob("*.py")) if p.is_dir() else [p]
        for f in files:
            issues.extend(check_file(f))
    return issues


def main(argv: list[str] | None = None) -> int:
    args = sys.argv[1:] if argv is None else argv
    if not args:
        print("usage: python -m tkg.kernel.nki_emu.lint PATH...", file=sys.stderr)
        return 2
    issues = check_paths(list(args))
    for i in issues:
        print(i)
    return 1 if issues else 0


if __name__ == "__main__":
    raise SystemExit(main())
