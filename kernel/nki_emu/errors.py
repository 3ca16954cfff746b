"""Exceptions raised by the NKI emulator.

`NkiValidationError` is also exported as `nisa.NkiValidationError` (the real package's name for a
hardware-constraint violation). Every message names the instruction, the operand (argument name)
and the expected value, so a kernel bug can be found from the message alone.
"""

from __future__ import annotations


class EmulatorError(Exception):
    """Base class of every error the emulator raises on purpose."""


class NkiValidationError(EmulatorError, ValueError):
    """A call breaks a documented NKI rule (shape, buffer, dtype, limit, signature)."""


class DeadTensorError(NkiValidationError):
    """A tensor is used after its explicitly addressed memory was re-allocated to another tensor."""


class PoisonError(NkiValidationError):
    """A kernel output holds values computed from never-written (poisoned) memory."""


class OutOfBoundsError(NkiValidationError):
    """An indirect DMA addressed memory outside its tensor (oob_mode=error)."""


class RemovedApiError(EmulatorError, AttributeError):
    """A legacy / removed NKI API was used (nki-api.md section 4.21 and 6.2)."""


class DeadlockError(EmulatorError, RuntimeError):
    """The programs of an LNC2 launch can never meet (sendrecv / core_barrier)."""


class LaunchError(EmulatorError, RuntimeError):
    """A kernel launch is malformed (grid, arguments, return value)."""
