"""Operator constants (`nl.add`, `nl.exp`, `nl.bitwise_and`, ...) for `op=` / `op0=` arguments.

In NKI the same `nl.xxx` objects are both element-wise functions (`nl.exp(tile)`) and the operator
constants the ISA takes (`nisa.activation(dst, op=nl.exp, ...)`), nki-api.md 3.8-3.9. An `Op` here
carries what each role needs: the ALU implementation (binary or unary, arithmetic on fp32 or
bit-vector on integers), whether it is a legal reduction operator, and the Scalar-engine
activation function with its valid input range. Calling an `Op` runs the `nl.*` wrapper.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import numpy as np

Fn = Callable[..., np.ndarray]


def _f(x: np.ndarray) -> np.ndarray:
    return (x != 0).astype(np.float32)


@dataclass(eq=False, frozen=True)
class Op:
    """One `nl.` operator / function."""

    name: str
    alu: Fn | None = None  # ALU implementation: binary f(a, b), or unary f(a) if `unary`
    unary: bool = False
    bitvec: bool = False
    reducible: bool = False
    act: Fn | None = None  # activation function (Scalar engine)
    act_range: tuple[float, float] | None = None  # documented valid input range of `act`
    gen4_only: bool = False
    gpsimd_only: bool = False

    def __repr__(self) -> str:
        return f"nl.{self.name}"

    def __call__(self, *args: Any, **kwargs: Any) -> Any:
        from tkg.kernel.nki_emu import language

        return language.elementwise(self, args, kwargs)


def _sigmoid(x: np.ndarray) -> np.ndarray:
    return 1.0 / (1.0 + np.exp(-x))


def _erf(x: np.ndarray) -> np.ndarray:
    return np.vectorize(math.erf, otypes=[np.float64])(x)


def _gelu(x: np.ndarray) -> np.ndarray:
    return 0.5 * x * (1.0 + _erf(x / math.sqrt(2.0)))


def _gelu_tanh(x: np.ndarray) -> np.ndarray:
    return 0.5 * x * (1.0 + np.tanh(math.sqrt(2.0 / math.pi) * (x + 0.044715 * x**3)))


def _softplus(x: np.ndarray) -> np.ndarray:
    return np.logaddexp(0.0, x)


def _shl(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    return np.left_shift(a, b.astype(a.dtype))


def _shr(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    # Logical right shift (arithmetic right shift is not supported, nki-api.md 3.9).
    if a.dtype.kind == "i":
        u = a.view(np.dtype(f"u{a.dtype.itemsize}"))
        return np.right_shift(u, b.astype(u.dtype)).view(a.dtype)
    return np.right_shift(a, b.astype(a.dtype))


def _abs_max(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    return np.where(np.abs(a) > np.abs(b), a, b)


def _abs_min(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    return np.where(np.abs(a) < np.abs(b), a, b)


PI = math.pi
OPS: dict[str, Op] = {}


def _reg(op: Op) -> Op:
    OPS[op.name] = op
    return op


# ALU arithmetic (fp32)
add = _reg(Op("add", np.add, reducible=True))
subtract = _reg(Op("subtract", np.subtract, reducible=True))
multiply = _reg(Op("multiply", np.multiply, reducible=True))
maximum = _reg(Op("maximum", np.maximum, reducible=True))
minimum = _reg(Op("minimum", np.minimum, reducible=True))
equal = _reg(Op("equal", lambda a, b: (a == b).astype(np.float32)))
not_equal = _reg(Op("not_equal", lambda a, b: (a != b).astype(np.float32)))
greater = _reg(Op("greater", lambda a, b: (a > b).astype(np.float32)))
greater_equal = _reg(Op("greater_equal", lambda a, b: (a >= b).astype(np.float32)))
less = _reg(Op("less", lambda a, b: (a < b).astype(np.float32)))
less_equal = _reg(Op("less_equal", lambda a, b: (a <= b).astype(np.float32)))
logical_and = _reg(Op("logical_and", lambda a, b: _f(a) * _f(b), reducible=True))
logical_or = _reg(Op("logical_or", lambda a, b: np.maximum(_f(a), _f(b)), reducible=True))
logical_xor = _reg(Op("logical_xor", lambda a, b: (_f(a) != _f(b)).astype(np.float32), reducible=True))
power = _reg(Op("power", np.power, gpsimd_only=True))
abs_max = _reg(Op("abs_max", _abs_max, gen4_only=True))
abs_min = _reg(Op("abs_min", _abs_min, gen4_only=True))
# Simulation-only element-wise functions (not ALU operators on hardware, nki-api.md 3.8).
divide = _reg(Op("divide"))
fmod = _reg(Op("fmod"))
mod = _reg(Op("mod"))
# ALU bit-vector (integers, raw bits)
bitwise_and = _reg(Op("bitwise_and", np.bitwise_and, bitvec=True, reducible=True))
bitwise_or = _reg(Op("bitwise_or", np.bitwise_or, bitvec=True, reducible=True))
bitwise_xor = _reg(Op("bitwise_xor", np.bitwise_xor, bitvec=True, reducible=True))
left_shift = _reg(Op("left_shift", _shl, bitvec=True))
right_shift = _reg(Op("right_shift", _shr, bitvec=True))
invert = _reg(Op("invert", np.invert, unary=True, bitvec=True))
# Unary: ALU (tensor_scalar with operand None/0) and/or activation functions
abs = _reg(Op("abs", np.abs, unary=True, act=np.abs))
square = _reg(Op("square", np.square, unary=True, act=np.square))
relu = _reg(Op("relu", lambda x: np.maximum(x, 0.0), unary=True, act=lambda x: np.maximum(x, 0.0)))
rsqrt = _reg(Op("rsqrt", lambda x: 1.0 / np.sqrt(x), unary=True, act=lambda x: 1.0 / np.sqrt(x),
                act_range=(2.0**-87, 2.0**97)))  # fmt: skip
reciprocal = _reg(Op("reciprocal", lambda x: 1.0 / x, unary=True, act=lambda x: 1.0 / x, act_range=(2.0**-42, 2.0**42)))
copy = _reg(Op("copy", act=lambda x: x))
exp = _reg(Op("exp", act=np.exp))
log = _reg(Op("log", act=np.log, act_range=(2.0**-64, 2.0**64)))
sin = _reg(Op("sin", act=np.sin, act_range=(-PI, PI)))
cos = _reg(Op("cos"))  # element-wise only: there is no cosine activation (nki-api.md 3.9)
tan = _reg(Op("tan"))
arctan = _reg(Op("arctan", act=np.arctan, act_range=(-PI / 2, PI / 2)))
sqrt = _reg(Op("sqrt", act=np.sqrt, act_range=(2.0**-116, 2.0**118)))
tanh = _reg(Op("tanh", act=np.tanh))
sigmoid = _reg(Op("sigmoid", act=_sigmoid))
sign = _reg(Op("sign", act=np.sign))
silu = _reg(Op("silu", act=lambda x: x * _sigmoid(x)))
softplus = _reg(Op("softplus", act=_softplus))
mish = _reg(Op("mish", act=lambda x: x * np.tanh(_softplus(x))))
gelu = _reg(Op("gelu", act=_gelu))
gelu_apprx_tanh = _reg(Op("gelu_apprx_tanh", act=_gelu_tanh))
gelu_apprx_sigmoid = _reg(Op("gelu_apprx_sigmoid", act=lambda x: x * _sigmoid(1.702 * x)))
erf = _reg(Op("erf", act=_erf))
negative = _reg(Op("negative"))
ceil = _reg(Op("ceil"))
floor = _reg(Op("floor"))
trunc = _reg(Op("trunc"))
logical_not = _reg(Op("logical_not"))
bypass = _reg(Op("bypass", gen4_only=True))

# Element-wise functions (nl.xxx(x)) for ops without an ALU/activation implementation above.
ELEMENTWISE: dict[str, Fn] = {
    "divide": np.divide, "fmod": np.fmod, "mod": np.mod, "cos": np.cos, "tan": np.tan,
    "negative": np.negative, "ceil": np.ceil, "floor": np.floor, "trunc": np.trunc,
    "logical_not": lambda x: (x == 0).astype(np.float32),
}  # fmt: skip

__all__ = list(OPS)
