"""The LSTM pointwise step as Triton kernels: gate pre-activations -> (c', h'), and its backward.

Gate order i, f, g, o as in ``nn.LSTM``; ``c' = σ(f) c + σ(i) tanh(g)``, ``h' = σ(o) tanh(c')``
(tanh accurate near 0, see ``_tanh``). The backward recomputes the activations from the saved
pre-activations, so a step keeps only its gates (B, 4H) and cell (B, H).
"""

from __future__ import annotations

import triton
import triton.language as tl
from torch import Tensor

from mogrifier_fast.kernels import accumulator, block


@triton.jit
def _tanh(x):
    """tanh to a few ulp, relative: a Taylor polynomial for |x| < 1/8 (where 2σ(2x) − 1 or
    1 − e^{-2|x|} would lose the leading digits), (1 − e^{-2|x|}) / (1 + e^{-2|x|}) elsewhere.
    Coefficients are formed in x's own precision (a float literal would be float32)."""
    one = x * 0 + 1
    a = tl.abs(x)
    e = tl.exp(-2 * a)
    far = (one - e) / (one + e)
    s = x * x
    series = (one * 62 / 2835) + s * (one * -1382 / 155925)
    series = (one * -17 / 315) + s * series
    series = (one * 2 / 15) + s * series
    series = (one * -1 / 3) + s * series
    near = a + a * s * series
    y = tl.where(a < 0.125, near, far)
    return tl.where(x < 0, -y, y)


@triton.jit
def _offsets(n_rows, H: tl.constexpr, BLOCK_B: tl.constexpr, BLOCK_H: tl.constexpr):
    rows = tl.program_id(0) * BLOCK_B + tl.arange(0, BLOCK_B)
    cols = tl.program_id(1) * BLOCK_H + tl.arange(0, BLOCK_H)
    ok = (rows < n_rows)[:, None] & (cols < H)[None, :]
    return rows[:, None] * (4 * H) + cols[None, :], rows[:, None] * H + cols[None, :], ok


@triton.jit
def _lstm_forward_kernel(
    gates, c_prev, c_next, h_next, h_copy, n_rows,
    H: tl.constexpr, COPY: tl.constexpr, ACC: tl.constexpr,
    BLOCK_B: tl.constexpr, BLOCK_H: tl.constexpr,
):  # fmt: skip
    """c_next, h_next (B, H) from gates (B, 4H) and c_prev; h also into h_copy with COPY."""
    g_off, off, ok = _offsets(n_rows, H, BLOCK_B, BLOCK_H)
    i = tl.sigmoid(tl.load(gates + g_off, mask=ok, other=0.0).to(ACC))
    f = tl.sigmoid(tl.load(gates + g_off + H, mask=ok, other=0.0).to(ACC))
    g = _tanh(tl.load(gates + g_off + 2 * H, mask=ok, other=0.0).to(ACC))
    o = tl.sigmoid(tl.load(gates + g_off + 3 * H, mask=ok, other=0.0).to(ACC))
    c = f * tl.load(c_prev + off, mask=ok, other=0.0).to(ACC) + i * g
    h = (o * _tanh(c)).to(h_next.dtype.element_ty)
    tl.store(c_next + off, c.to(c_next.dtype.element_ty), mask=ok)
    tl.store(h_next + off, h, mask=ok)
    if COPY:
        tl.store(h_copy + off, h, mask=ok)


@triton.jit
def _lstm_backward_kernel(
    gates, c_prev, c_next, grad_h_out, grad_h_carry, grad_c, grad_gates, n_rows,
    H: tl.constexpr, ACC: tl.constexpr, BLOCK_B: tl.constexpr, BLOCK_H: tl.constexpr,
):  # fmt: skip
    """From dh = grad_h_out + grad_h_carry and dc = grad_c (gradients of h', c'): the gates'
    pre-activation gradients into grad_gates (B, 4H), and grad_c <- the gradient of c_prev."""
    g_off, off, ok = _offsets(n_rows, H, BLOCK_B, BLOCK_H)
    i = tl.sigmoid(tl.load(gates + g_off, mask=ok, other=0.0).to(ACC))
    f = tl.sigmoid(tl.load(gates + g_off + H, mask=ok, other=0.0).to(ACC))
    g = _tanh(tl.load(gates + g_off + 2 * H, mask=ok, other=0.0).to(ACC))
    o = tl.sigmoid(tl.load(gates + g_off + 3 * H, mask=ok, other=0.0).to(ACC))
    tanh_c = _tanh(tl.load(c_next + off, mask=ok, other=0.0).to(ACC))
    dh = tl.load(grad_h_out + off, mask=ok, other=0.0).to(ACC)
    dh += tl.load(grad_h_carry + off, mask=ok, other=0.0).to(ACC)
    dc = tl.load(grad_c + off, mask=ok, other=0.0).to(ACC) + dh * o * (1 - tanh_c * tanh_c)
    out = grad_gates.dtype.element_ty
    tl.store(grad_gates + g_off, (dc * g * i * (1 - i)).to(out), mask=ok)
    c = tl.load(c_prev + off, mask=ok, other=0.0).to(ACC)
    tl.store(grad_gates + g_off + H, (dc * c * f * (1 - f)).to(out), mask=ok)
    tl.store(grad_gates + g_off + 2 * H, (dc * i * (1 - g * g)).to(out), mask=ok)
    tl.store(grad_gates + g_off + 3 * H, (dh * tanh_c * o * (1 - o)).to(out), mask=ok)
    tl.store(grad_c + off, (dc * f).to(grad_c.dtype.element_ty), mask=ok)


def _grid(rows: int, hidden: int) -> tuple[tuple[int, int], dict]:
    blocks = {"BLOCK_B": block(rows, least=1, most=16), "BLOCK_H": block(hidden, most=128)}
    return (triton.cdiv(rows, blocks["BLOCK_B"]), triton.cdiv(hidden, blocks["BLOCK_H"])), blocks


def lstm_forward(
    gates: Tensor, c_prev: Tensor, c_next: Tensor, h_next: Tensor, h_copy: Tensor | None = None
) -> None:
    """c_next, h_next (B, H) from gates (B, 4H) and c_prev (B, H); h also into h_copy if given."""
    rows, hidden = c_prev.shape
    grid, blocks = _grid(rows, hidden)
    _lstm_forward_kernel[grid](
        gates, c_prev, c_next, h_next, h_next if h_copy is None else h_copy, rows,
        H=hidden, COPY=h_copy is not None, ACC=accumulator(gates.dtype), **blocks,
    )  # fmt: skip


def lstm_backward(
    gates: Tensor,
    c_prev: Tensor,
    c_next: Tensor,
    grad_h_out: Tensor,
    grad_h_carry: Tensor,
    grad_c: Tensor,
    grad_gates: Tensor,
) -> None:
    """grad_gates (B, 4H) from dh = grad_h_out + grad_h_carry and grad_c (B, H), which becomes
    the gradient of c_prev in place."""
    rows, hidden = c_prev.shape
    grid, blocks = _grid(rows, hidden)
    _lstm_backward_kernel[grid](
        gates, c_prev, c_next, grad_h_out, grad_h_carry, grad_c, grad_gates, rows,
        H=hidden, ACC=accumulator(gates.dtype), **blocks,
    )  # fmt: skip
