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

import functools

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


@triton.jit
def _dot_probe_kernel(a, b, out, N: tl.constexpr):
    rows, cols = tl.arange(0, N)[:, None], tl.arange(0, N)[None, :]
    product = tl.dot(tl.load(a + rows * N + cols), tl.load(b + rows * N + cols))
    tl.store(out + rows * N + cols, product)


@functools.cache
def _float64_dot_runs(device: torch.device) -> bool:
    a = torch.randn(16, 16, dtype=torch.float64, device=device)
    b = torch.randn(16, 16, dtype=torch.float64, device=device)
    out = torch.empty_like(a)
    try:
        _dot_probe_kernel[(1,)](a, b, out, N=16)
    except Exception:  # a compiler error means: not supported by this Triton build here
        return False
    return bool(torch.allclose(out, a @ b, rtol=1e-12, atol=1e-12))


def check_dtype(backend: str, tensor: torch.Tensor) -> None:
    """Raise TypeError where the kernels cannot run ``tensor``'s dtype: float64 on a GPU whose
    Triton build does not compile float64 ``tl.dot`` (probed once per device)."""
    cuda_float64 = tensor.dtype == torch.float64 and tensor.device.type == "cuda"
    if cuda_float64 and not _float64_dot_runs(tensor.device):
        raise TypeError(
            f"backend {backend!r}: float64 needs tl.dot in float64, which this Triton build "
            "does not run on this GPU; use float32/bfloat16, or backend 'fused' for float64"
        )


__all__ = [
    "accumulator",
    "block",
    "check_dtype",
    "dot_precision",
    "interpreted",
    "kernel_unavailable_reason",
]
