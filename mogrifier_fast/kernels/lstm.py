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
def _cell_forward(pre_i, pre_f, pre_g, pre_o, c_prev):
    """(c', h') from the gates' pre-activations and c, all (rows, cols) in one precision."""
    c = tl.sigmoid(pre_f) * c_prev + tl.sigmoid(pre_i) * _tanh(pre_g)
    return c, tl.sigmoid(pre_o) * _tanh(c)


@triton.jit
def _cell_backward(pre_i, pre_f, pre_g, pre_o, c_prev, c_next, dh, dc):
    """Gradients of the four pre-activations and of c, from those of h' (dh) and c' (dc)."""
    i, f, g, o = tl.sigmoid(pre_i), tl.sigmoid(pre_f), _tanh(pre_g), tl.sigmoid(pre_o)
    tanh_c = _tanh(c_next)
    dc = dc + dh * o * (1 - tanh_c * tanh_c)
    return (
        dc * g * i * (1 - i),
        dc * c_prev * f * (1 - f),
        dc * i * (1 - g * g),
        dh * tanh_c * o * (1 - o),
        dc * f,
    )


@triton.jit
def _load_gates(gates, offsets, ok, H: tl.constexpr, ACC: tl.constexpr):
    """The four gate tiles at ``offsets`` of a (rows, 4H) block, in ACC."""
    return (
        tl.load(gates + offsets, mask=ok, other=0.0).to(ACC),
        tl.load(gates + offsets + H, mask=ok, other=0.0).to(ACC),
        tl.load(gates + offsets + 2 * H, mask=ok, other=0.0).to(ACC),
        tl.load(gates + offsets + 3 * H, mask=ok, other=0.0).to(ACC),
    )


@triton.jit
def _store_gates(gates, offsets, ok, d_i, d_f, d_g, d_o, H: tl.constexpr):
    out = gates.dtype.element_ty
    tl.store(gates + offsets, d_i.to(out), mask=ok)
    tl.store(gates + offsets + H, d_f.to(out), mask=ok)
    tl.store(gates + offsets + 2 * H, d_g.to(out), mask=ok)
    tl.store(gates + offsets + 3 * H, d_o.to(out), mask=ok)


@triton.jit
def _cell_backward_tile(
    gates, c_prev, c_next, grad_h_out, grad_h_carry, grad_c, grad_gates, rows, cols, n_rows,
    H: tl.constexpr, ACC: tl.constexpr,
):  # fmt: skip
    """One (rows, cols) tile of the pointwise backward: grad_gates from dh = grad_h_out +
    grad_h_carry and grad_c, which becomes the gradient of c_prev in place."""
    ok = (rows < n_rows)[:, None] & (cols < H)[None, :]
    g_off, off = rows[:, None] * (4 * H) + cols[None, :], rows[:, None] * H + cols[None, :]
    pre_i, pre_f, pre_g, pre_o = _load_gates(gates, g_off, ok, H, ACC)
    dh = tl.load(grad_h_out + off, mask=ok, other=0.0).to(ACC)
    dh += tl.load(grad_h_carry + off, mask=ok, other=0.0).to(ACC)
    d_i, d_f, d_g, d_o, dc = _cell_backward(
        pre_i, pre_f, pre_g, pre_o,
        tl.load(c_prev + off, mask=ok, other=0.0).to(ACC),
        tl.load(c_next + off, mask=ok, other=0.0).to(ACC),
        dh, tl.load(grad_c + off, mask=ok, other=0.0).to(ACC),
    )  # fmt: skip
    _store_gates(grad_gates, g_off, ok, d_i, d_f, d_g, d_o, H)
    tl.store(grad_c + off, dc.to(grad_c.dtype.element_ty), mask=ok)


@triton.jit
def _lstm_forward_kernel(
    gates, c_prev, c_next, h_next, h_copy, n_rows,
    H: tl.constexpr, COPY: tl.constexpr, ACC: tl.constexpr,
    BLOCK_B: tl.constexpr, BLOCK_H: tl.constexpr,
):  # fmt: skip
    """c_next, h_next (B, H) from gates (B, 4H) and c_prev; h also into h_copy with COPY."""
    rows = tl.program_id(0) * BLOCK_B + tl.arange(0, BLOCK_B)
    cols = tl.program_id(1) * BLOCK_H + tl.arange(0, BLOCK_H)
    ok = (rows < n_rows)[:, None] & (cols < H)[None, :]
    g_off, off = rows[:, None] * (4 * H) + cols[None, :], rows[:, None] * H + cols[None, :]
    pre_i, pre_f, pre_g, pre_o = _load_gates(gates, g_off, ok, H, ACC)
    c, h = _cell_forward(
        pre_i, pre_f, pre_g, pre_o, tl.load(c_prev + off, mask=ok, other=0.0).to(ACC)
    )
    h = h.to(h_next.dtype.element_ty)
    tl.store(c_next + off, c.to(c_next.dtype.element_ty), mask=ok)
    tl.store(h_next + off, h, mask=ok)
    if COPY:
        tl.store(h_copy + off, h, mask=ok)


@triton.jit
def _lstm_backward_kernel(
    gates, c_prev, c_next, grad_h_out, grad_h_carry, grad_c, grad_gates, n_rows,
    H: tl.constexpr, ACC: tl.constexpr, BLOCK_B: tl.constexpr, BLOCK_H: tl.constexpr,
):  # fmt: skip
    """The pointwise backward of one step, a (BLOCK_B, BLOCK_H) tile per program."""
    _cell_backward_tile(
        gates, c_prev, c_next, grad_h_out, grad_h_carry, grad_c, grad_gates,
        tl.program_id(0) * BLOCK_B + tl.arange(0, BLOCK_B),
        tl.program_id(1) * BLOCK_H + tl.arange(0, BLOCK_H), n_rows, H, ACC,
    )  # fmt: skip


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
