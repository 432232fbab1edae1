"""Backend ``"compile"``: the reference step (:func:`mogrifier_fast.mogrify.mogrifier_lstm_step`)
compiled with ``torch.compile``, looped over time in Python.

Only the step is compiled, never the loop over time, so compile time does not grow with the
sequence length: one graph per (rounds, map form, dtype, grad mode), with dynamic sizes. The
first call of each such configuration compiles (seconds; see the README); later calls reuse it.
"""

from __future__ import annotations

import functools
import shutil

import torch
from torch import Tensor

from mogrifier_fast.backends import Backend, plain_torch_required, quiet_torchscript_deprecation
from mogrifier_fast.mogrify import (
    LayerParams,
    Sequence,
    State,
    final_state,
    masked_state,
    mogrifier_lstm_step,
    retire_ended,
)

# Graphs kept per process for the step (torch's default of 8 is too few for a few layer
# configurations times dtypes and grad modes; past the limit torch falls back to eager).
RECOMPILE_LIMIT = 256


@functools.cache
def _compiled_step():
    import torch._functorch.config

    # Donated buffers would forbid backward(retain_graph=True), which code written for nn.LSTM
    # may use. The setting is read when graphs compile, not when this is created, so it is
    # turned off for the process: it saves memory and never changes results.
    torch._functorch.config.donated_buffer = False
    return torch.compile(mogrifier_lstm_step, dynamic=True)


def _with_zero_biases(params: LayerParams) -> tuple:
    """The step's arguments with every missing bias replaced by zeros, so that layers with and
    without biases share one compiled graph."""
    w_ih, w_hh, b_ih, b_hh, factors, biases, w_hr = params.step_args()
    gates = w_ih.shape[0]
    b_ih = w_ih.new_zeros(gates) if b_ih is None else b_ih
    b_hh = w_ih.new_zeros(gates) if b_hh is None else b_hh
    biases = [
        f[0].new_zeros(f[0].shape[0]) if b is None else b
        for f, b in zip(factors, biases, strict=True)
    ]
    return w_ih, w_hh, b_ih, b_hh, factors, biases, w_hr


def run_compiled(seq: Sequence, state: State, params: LayerParams) -> tuple[Tensor, State]:
    """One layer, one direction (see :mod:`mogrifier_fast.backends` for the contract); the
    loop is :func:`mogrifier_fast.mogrify.mogrifier_lstm_sequence`'s, around the compiled
    step."""
    # torch.compile imports TorchScript internals, which warn that TorchScript is deprecated.
    with quiet_torchscript_deprecation():
        import torch._dynamo

        if plain_torch_required():
            # Traced or exported: the plain step, whose ops the graph records (torch.jit.trace
            # cannot trace a compiled function, and export would record the same ops anyway).
            step, args = mogrifier_lstm_step, params.step_args()
        else:
            step, args = _compiled_step(), _with_zero_biases(params)
        h, c = state
        outputs, ended_h, ended_c = [], [], []
        with torch._dynamo.config.patch(recompile_limit=RECOMPILE_LIMIT):
            for x_t in seq.step_inputs():
                if seq.packed:
                    h = retire_ended(x_t.shape[0], h, ended_h)
                    c = retire_ended(x_t.shape[0], c, ended_c)
                h, c = step(x_t, masked_state(h, seq.state_mask), c, *args)
                outputs.append(h)
    return seq.join(outputs), State(final_state(h, ended_h), final_state(c, ended_c))


def _unavailable_reason(device: torch.device) -> str | None:
    if device.type == "cpu" and not any(
        shutil.which(cc) for cc in ("cc", "gcc", "g++", "clang", "c++")
    ):
        return "torch.compile needs a C++ compiler on PATH for CPU code, and none was found"
    if device.type == "cuda":
        try:
            import triton  # noqa: F401
        except ImportError:
            return "torch.compile needs the triton package for CUDA code"
    if device.type not in ("cpu", "cuda"):
        return f"torch.compile is not supported on {device.type} here"
    return None


BACKEND = Backend(name="compile", run=run_compiled, unavailable_reason=_unavailable_reason)
