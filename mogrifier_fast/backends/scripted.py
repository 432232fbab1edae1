"""Backend ``"script"``: the reference sequence (:func:`mogrifier_fast.mogrify.mogrifier_lstm_sequence`)
run by TorchScript.

TorchScript is deprecated from torch 2.11 and warns on every call; this module silences that
warning for its own calls only. Where ``torch.jit.script`` cannot compile the sequence, the
backend is absent from ``available_backends``.
"""

from __future__ import annotations

import functools

import torch
from torch import Tensor

from mogrifier_fast.backends import Backend, quiet_torchscript_deprecation
from mogrifier_fast.mogrify import LayerParams, Sequence, State, mogrifier_lstm_sequence


@functools.cache
def _scripted_sequence() -> torch.jit.ScriptFunction | str:
    """The scripted sequence, or why it could not be scripted."""
    with quiet_torchscript_deprecation():
        try:
            return torch.jit.script(mogrifier_lstm_sequence)
        except Exception as error:  # any failure means: not available here
            return f"torch.jit.script failed ({type(error).__name__}: {error})"


def run_scripted(seq: Sequence, state: State, params: LayerParams) -> tuple[Tensor, State]:
    """One layer, one direction (see :mod:`mogrifier_fast.backends` for the contract)."""
    # Without graph optimisation the interpreter records autograd per op, as eager does; the
    # profiling executor's differentiable graphs can mix up shapes across layers of one model.
    with quiet_torchscript_deprecation(), torch.jit.optimized_execution(False):
        outputs, h, c = _scripted_sequence()(
            seq.step_inputs(), state.h, state.c, *params.step_args(), seq.packed, seq.state_mask
        )
    return seq.join(outputs), State(h, c)


def _unavailable_reason(device: torch.device) -> str | None:
    scripted = _scripted_sequence()
    return scripted if isinstance(scripted, str) else None


BACKEND = Backend(name="script", run=run_scripted, unavailable_reason=_unavailable_reason)
