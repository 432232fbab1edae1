"""Triton kernels for the Mogrifier LSTM step.

* :mod:`~mogrifier_fast.kernels.mogrify`: the mogrifier rounds of one step (each round's product
  with its ``2·σ(·)⊙`` epilogue fused; all rounds in one launch when the states are narrow), and
  their backward.
* :mod:`~mogrifier_fast.kernels.lstm`: the LSTM pointwise step (gates -> c', h') and its backward.

The kernels run on CUDA tensors, or on CPU tensors under Triton's interpreter
(``TRITON_INTERPRET=1`` set before the first import), which is how CI checks them.
Importing this package raises ImportError when triton is not installed.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl
from triton.runtime.interpreter import InterpretedFunction


def interpreted(kernel: object) -> bool:
    """Whether ``kernel`` was compiled for Triton's CPU interpreter (TRITON_INTERPRET=1 at import)."""
    return isinstance(kernel, InterpretedFunction)


def kernel_unavailable_reason(kernel: object, device: torch.device) -> str | None:
    """None where a kernel decorated with ``triton.jit`` runs on ``device``, else why not."""
    if interpreted(kernel):
        return (
            None if device.type == "cpu" else "Triton runs in interpreter mode (CPU tensors only)"
        )
    if device.type != "cuda":
        return "Triton kernels run on CUDA devices, or on CPU with TRITON_INTERPRET=1 set before import"
    if not torch.cuda.is_available():
        return "no CUDA device is available"
    return None


def accumulator(dtype: torch.dtype) -> tl.dtype:
    """The kernels' accumulation type for tensors of ``dtype``: float64 for float64, else float32."""
    return tl.float64 if dtype == torch.float64 else tl.float32


def dot_precision(dtype: torch.dtype) -> str:
    """``tl.dot``'s input precision: exact ("ieee") float32 unless torch's TF32 switch for matrix
    products is on ("tf32"); Triton does not read torch's switches by itself."""
    if dtype == torch.float32 and torch.backends.cuda.matmul.allow_tf32:
        return "tf32"
    return "ieee"


def block(size: int, least: int = 16, most: int = 64) -> int:
    """A power-of-two block width covering ``size``, within [least, most] (tl.dot needs >= 16)."""
    return max(least, min(most, triton.next_power_of_2(max(size, 1))))


__all__ = ["accumulator", "block", "dot_precision", "interpreted", "kernel_unavailable_reason"]
