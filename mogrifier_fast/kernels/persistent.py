"""The whole recurrence in one Triton launch per direction of the chain: forward and backward.

One program owns a block of batch rows for all T steps (grid: one program per block). Per step
it runs every mogrifier round (:func:`~mogrifier_fast.kernels.mogrify._mogrify_forward_kernel`), the gate
product with the LSTM pointwise step fused into its epilogue (four gate accumulators per column
tile), and writes h', c', the gates and the states kept for the backward; a barrier separates
dependent phases. The backward launch walks the steps in reverse the same way: pointwise
backward, the gate product's data gradient, the rounds in reverse. Weight gradients are left to
the caller (one product over all T·B rows), as in the step-by-step backend, and the buffers are
the same (:class:`~mogrifier_fast.kernels.mogrify.MogrifyBuffers`, gates (T, B, 4H), cells
(T+1, B, H)).

States live in global memory between phases (L1/L2-resident at these sizes); the weights are
re-read from cache each step. The hidden dimension is not split across programs: that needs a
grid-wide barrier per step, which Triton has no cooperative launch for (a spin barrier on
atomics deadlocks when not every program is resident, and in the CPU interpreter, which runs
programs one after another). So parallelism is the number of row blocks: small batches use
little of a large GPU.
"""

from __future__ import annotations

import triton
import triton.language as tl
from torch import Tensor

from mogrifier_fast.backends.layout import StepRows
from mogrifier_fast.kernels import accumulator, dot_precision
from mogrifier_fast.kernels.lstm import _cell_backward_tile, _cell_forward, _store_gates
from mogrifier_fast.kernels.mogrify import (
    BLOCK_B,
    MogrifyBuffers,
    StackedMaps,
    _blocks,
    _load_tile,
    _mogrify_backward_kernel,
    _mogrify_forward_kernel,
    _or,
    _stride,
)


@triton.jit
def _weight_t(w, rows, cols, width, n_rows):
    """The (cols, rows) tile of W^T for W (n_rows, width): w[rows, cols] transposed."""
    return tl.load(
        w + rows[None, :] * width + cols[:, None],
        mask=(rows[None, :] < n_rows) & (cols[:, None] < width),
        other=0.0,
    )


@triton.jit
def _accumulate_gates(
    v, w, rows, row_ok, n, acc_i, acc_f, acc_g, acc_o, K_SIZE: tl.constexpr,
    H_SIZE: tl.constexpr, BLOCK_K: tl.constexpr, PRECISION: tl.constexpr,
):  # fmt: skip
    """The four gate accumulators of columns n plus v (rows, K) W^T, W (4H, K) row-major."""
    G = 4 * H_SIZE
    for k0 in range(0, K_SIZE, BLOCK_K):
        k = k0 + tl.arange(0, BLOCK_K)
        a = _load_tile(v, rows, k, K_SIZE, row_ok)
        acc_i = tl.dot(a, _weight_t(w, n, k, K_SIZE, G), acc_i, input_precision=PRECISION)
        acc_f = tl.dot(a, _weight_t(w, n + H_SIZE, k, K_SIZE, G), acc_f, input_precision=PRECISION)
        acc_g = tl.dot(a, _weight_t(w, n + 2 * H_SIZE, k, K_SIZE, G), acc_g, input_precision=PRECISION)  # fmt: skip
        acc_o = tl.dot(a, _weight_t(w, n + 3 * H_SIZE, k, K_SIZE, G), acc_o, input_precision=PRECISION)  # fmt: skip
    return acc_i, acc_f, acc_g, acc_o


@triton.jit
def _gates_and_cell(
    x, h, w_ih, w_hh, bias, gates, c_prev, c_next, h_out, h_copy, copy_rows, rows, n_rows,
    X_SIZE: tl.constexpr, H_SIZE: tl.constexpr, GATE_BIAS: tl.constexpr, ACC: tl.constexpr,
    BLOCK_B: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr,
    PRECISION: tl.constexpr,
):  # fmt: skip
    """gates = x W_ih^T + h W_hh^T + bias (kept), then c', h' (h' also into h_copy for rows
    below copy_rows), column tile by column tile."""
    row_ok = rows < n_rows
    G = 4 * H_SIZE
    for n0 in range(0, H_SIZE, BLOCK_N):
        n = n0 + tl.arange(0, BLOCK_N)
        acc_i = tl.zeros((BLOCK_B, BLOCK_N), ACC)
        acc_f = tl.zeros((BLOCK_B, BLOCK_N), ACC)
        acc_g = tl.zeros((BLOCK_B, BLOCK_N), ACC)
        acc_o = tl.zeros((BLOCK_B, BLOCK_N), ACC)
        acc_i, acc_f, acc_g, acc_o = _accumulate_gates(
            x, w_ih, rows, row_ok, n, acc_i, acc_f, acc_g, acc_o, X_SIZE, H_SIZE, BLOCK_K, PRECISION
        )
        acc_i, acc_f, acc_g, acc_o = _accumulate_gates(
            h, w_hh, rows, row_ok, n, acc_i, acc_f, acc_g, acc_o, H_SIZE, H_SIZE, BLOCK_K, PRECISION
        )
        col_ok = n < H_SIZE
        if GATE_BIAS:
            acc_i += tl.load(bias + n, mask=col_ok, other=0.0).to(ACC)[None, :]
            acc_f += tl.load(bias + H_SIZE + n, mask=col_ok, other=0.0).to(ACC)[None, :]
            acc_g += tl.load(bias + 2 * H_SIZE + n, mask=col_ok, other=0.0).to(ACC)[None, :]
            acc_o += tl.load(bias + 3 * H_SIZE + n, mask=col_ok, other=0.0).to(ACC)[None, :]
        ok = row_ok[:, None] & col_ok[None, :]
        _store_gates(gates, rows[:, None] * G + n[None, :], ok, acc_i, acc_f, acc_g, acc_o, H_SIZE)
        off = rows[:, None] * H_SIZE + n[None, :]
        c, h_new = _cell_forward(
            acc_i, acc_f, acc_g, acc_o, tl.load(c_prev + off, mask=ok, other=0.0).to(ACC)
        )
        h_new = h_new.to(h_out.dtype.element_ty)
        tl.store(c_next + off, c.to(c_next.dtype.element_ty), mask=ok)
        tl.store(h_out + off, h_new, mask=ok)
        tl.store(h_copy + off, h_new, mask=(rows < copy_rows)[:, None] & col_ok[None, :])


@triton.jit
def _gate_input_grad(
    grad_gates, w, out, rows, n_rows, K_SIZE: tl.constexpr, H_SIZE: tl.constexpr,
    ACC: tl.constexpr, BLOCK_B: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr,
    PRECISION: tl.constexpr,
):  # fmt: skip
    """out (rows, K) = grad_gates (rows, 4H) @ W, W (4H, K) row-major."""
    row_ok = rows < n_rows
    G = 4 * H_SIZE
    for k0 in range(0, K_SIZE, BLOCK_K):
        k = k0 + tl.arange(0, BLOCK_K)
        acc = tl.zeros((BLOCK_B, BLOCK_K), ACC)
        for n0 in range(0, G, BLOCK_N):
            n = n0 + tl.arange(0, BLOCK_N)
            d = _load_tile(grad_gates, rows, n, G, row_ok)
            wk = tl.load(
                w + n[:, None] * K_SIZE + k[None, :],
                mask=(n[:, None] < G) & (k[None, :] < K_SIZE),
                other=0.0,
            )
            acc = tl.dot(d, wk, acc, input_precision=PRECISION)
        tl.store(
            out + rows[:, None] * K_SIZE + k[None, :],
            acc.to(out.dtype.element_ty),
            mask=row_ok[:, None] & (k[None, :] < K_SIZE),
        )


@triton.jit
def _persistent_forward_kernel(
    xs, hs, sig_x, sig_h, inner, maps_x, maps_h, factors_x, factors_h, bias_x, bias_h,
    w_ih, w_hh, gate_bias, gates, cells, output, step_rows, step_first, cell_first,
    xs_stride, hs_stride, sig_x_stride, sig_h_stride, inner_stride,
    maps_x_stride, maps_h_stride, factors_x_stride, factors_h_stride, steps,
    X_SIZE: tl.constexpr, H_SIZE: tl.constexpr, RANK: tl.constexpr, ROUNDS: tl.constexpr,
    HAS_BIAS: tl.constexpr, GATE_BIAS: tl.constexpr, ACC: tl.constexpr, BLOCK_B: tl.constexpr,
    BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr, BLOCK_R: tl.constexpr,
    PRECISION: tl.constexpr,
):  # fmt: skip
    """All T steps for one block of rows. Step t runs step_rows[t] rows from row
    step_first[t] of every buffer (cells: the cell it starts from at cell_first[t], the one it
    writes at cell_first[t + 1]). xs[0] holds the inputs and hs[0] h0 (step 0's rows) on
    entry."""
    rows = tl.program_id(0) * BLOCK_B + tl.arange(0, BLOCK_B)
    for t in range(steps):
        n_rows = tl.load(step_rows + t)
        first = tl.load(step_first + t)
        x_at, h_at = first * X_SIZE, first * H_SIZE
        if ROUNDS > 0:
            _mogrify_forward_kernel(
                xs + x_at, hs + h_at, sig_x + x_at, sig_h + h_at,
                inner + first * RANK, maps_x, maps_h, factors_x, factors_h, bias_x, bias_h,
                xs_stride, hs_stride, sig_x_stride, sig_h_stride, inner_stride,
                maps_x_stride, maps_h_stride, factors_x_stride, factors_h_stride, n_rows,
                X_SIZE, H_SIZE, RANK, 1, ROUNDS, HAS_BIAS, ACC,
                BLOCK_B, BLOCK_N, BLOCK_K, BLOCK_R, PRECISION,
            )  # fmt: skip
        # The next step's h input: this step's h for the rows that run it (its buffers follow).
        copy_rows = tl.load(step_rows + t + 1)  # step_rows ends with a 0
        _gates_and_cell(
            xs + ((ROUNDS + 1) // 2) * xs_stride + x_at, hs + (ROUNDS // 2) * hs_stride + h_at,
            w_ih, w_hh, gate_bias, gates + 4 * h_at, cells + tl.load(cell_first + t) * H_SIZE,
            cells + tl.load(cell_first + t + 1) * H_SIZE, output + h_at,
            hs + (first + n_rows) * H_SIZE, copy_rows,
            rows, n_rows, X_SIZE, H_SIZE, GATE_BIAS, ACC, BLOCK_B, BLOCK_N, BLOCK_K, PRECISION,
        )  # fmt: skip
        tl.debug_barrier()


@triton.jit
def _persistent_backward_kernel(
    xs, hs, sig_x, sig_h, maps_x, maps_h, factors_x, factors_h, w_ih, w_hh, gates, cells,
    grad_output, grad_xs, grad_hs, grad_cell, grad_gates, dz_x, dz_h, dinner, grad_x,
    step_rows, step_first, cell_first,
    xs_stride, hs_stride, sig_x_stride, sig_h_stride, grad_xs_stride, grad_hs_stride,
    dz_x_stride, dz_h_stride, dinner_stride,
    maps_x_stride, maps_h_stride, factors_x_stride, factors_h_stride, steps,
    X_SIZE: tl.constexpr, H_SIZE: tl.constexpr, RANK: tl.constexpr, ROUNDS: tl.constexpr,
    ACC: tl.constexpr, BLOCK_B: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr,
    BLOCK_R: tl.constexpr, PRECISION: tl.constexpr,
):  # fmt: skip
    """All T steps of the backward for one block of rows, last step first (rows as in the
    forward). On entry grad_hs[0] holds the gradient of h_n and grad_cell that of c_n (each
    sequence's last step); on exit grad_hs[0] and grad_cell hold those of h0 and c0. grad_xs
    (nx+1, B, I) and grad_hs (nh+1, B, H) are per-step scratch; a step's rows are their first
    ones, so the rows of sequences that end earlier keep h_n's and c_n's gradients."""
    rows = tl.program_id(0) * BLOCK_B + tl.arange(0, BLOCK_B)
    for back in range(steps):
        t = steps - 1 - back
        n_rows = tl.load(step_rows + t)
        first = tl.load(step_first + t)
        x_at, h_at = first * X_SIZE, first * H_SIZE
        for c0 in range(0, H_SIZE, BLOCK_N):
            _cell_backward_tile(
                gates + 4 * h_at, cells + tl.load(cell_first + t) * H_SIZE,
                cells + tl.load(cell_first + t + 1) * H_SIZE,
                grad_output + h_at, grad_hs, grad_cell, grad_gates + 4 * h_at,
                rows, c0 + tl.arange(0, BLOCK_N), n_rows, H_SIZE, ACC,
            )  # fmt: skip
        tl.debug_barrier()
        _gate_input_grad(
            grad_gates + 4 * h_at, w_ih, grad_xs + ((ROUNDS + 1) // 2) * grad_xs_stride, rows, n_rows,
            X_SIZE, H_SIZE, ACC, BLOCK_B, BLOCK_N, BLOCK_K, PRECISION,
        )  # fmt: skip
        _gate_input_grad(
            grad_gates + 4 * h_at, w_hh, grad_hs + (ROUNDS // 2) * grad_hs_stride, rows, n_rows,
            H_SIZE, H_SIZE, ACC, BLOCK_B, BLOCK_N, BLOCK_K, PRECISION,
        )  # fmt: skip
        tl.debug_barrier()
        if ROUNDS > 0:
            _mogrify_backward_kernel(
                xs + x_at, hs + h_at, sig_x + x_at, sig_h + h_at,
                grad_xs, grad_hs, dz_x + x_at, dz_h + h_at,
                dinner + first * RANK, maps_x, maps_h, factors_x, factors_h,
                xs_stride, hs_stride, sig_x_stride, sig_h_stride, grad_xs_stride,
                grad_hs_stride, dz_x_stride, dz_h_stride, dinner_stride,
                maps_x_stride, maps_h_stride, factors_x_stride, factors_h_stride, n_rows,
                X_SIZE, H_SIZE, RANK, 1, ROUNDS, ACC,
                BLOCK_B, BLOCK_N, BLOCK_K, BLOCK_R, PRECISION,
            )  # fmt: skip
        for k0 in range(0, X_SIZE, BLOCK_K):
            k = k0 + tl.arange(0, BLOCK_K)
            ok = (rows < n_rows)[:, None] & (k < X_SIZE)[None, :]
            tl.store(grad_x + x_at + rows[:, None] * X_SIZE + k[None, :],
                     _load_tile(grad_xs, rows, k, X_SIZE, rows < n_rows), mask=ok)  # fmt: skip
        tl.debug_barrier()


def persistent_forward(
    maps: StackedMaps, buffers: MogrifyBuffers, w_ih: Tensor, w_hh: Tensor,
    bias: Tensor | None, gates: Tensor, cells: Tensor, output: Tensor, steps: StepRows,
) -> None:  # fmt: skip
    """Every step in one launch, each on its rows (``steps``): reads xs[0] (the inputs), hs[0]'s
    first B rows (h0) and cells' (c0); writes the rest of ``buffers`` (R rows), gates (R, 4H),
    cells (B + R, H) past c0 and output (R, H)."""
    xs, hs, sig_x, sig_h, inner = buffers
    rows, big_i = steps.batch, xs.shape[2]
    big_h, dummy = hs.shape[-1], xs
    _persistent_forward_kernel[(triton.cdiv(rows, BLOCK_B),)](
        xs, hs, _or(sig_x, dummy), _or(sig_h, dummy), _or(inner, dummy),
        _or(maps.maps_x, dummy), _or(maps.maps_h, dummy),
        _or(maps.factors_x, dummy), _or(maps.factors_h, dummy),
        _or(maps.bias_x, dummy), _or(maps.bias_h, dummy),
        w_ih, w_hh, _or(bias, dummy), gates, cells, output, *steps.tables(xs.device),
        xs.stride(0), hs.stride(0), _stride(sig_x), _stride(sig_h), _stride(inner),
        _stride(maps.maps_x), _stride(maps.maps_h),
        _stride(maps.factors_x), _stride(maps.factors_h), steps.steps,
        X_SIZE=big_i, H_SIZE=big_h, RANK=maps.rank, ROUNDS=maps.rounds,
        HAS_BIAS=maps.bias_x is not None, GATE_BIAS=bias is not None,
        ACC=accumulator(xs.dtype), PRECISION=dot_precision(xs.dtype), **_blocks(maps, big_i, big_h),
    )  # fmt: skip


def persistent_backward(
    maps: StackedMaps, buffers: MogrifyBuffers, w_ih: Tensor, w_hh: Tensor, gates: Tensor,
    cells: Tensor, grad_output: Tensor, grad_xs: Tensor, grad_hs: Tensor, grad_cell: Tensor,
    grad_gates: Tensor, dz_x: Tensor, dz_h: Tensor, dinner: Tensor, grad_x: Tensor,
    steps: StepRows,
) -> None:  # fmt: skip
    """Every step of the backward in one launch (see ``_persistent_backward_kernel``)."""
    xs, hs, sig_x, sig_h, _ = buffers
    rows, big_i = steps.batch, xs.shape[2]
    big_h, dummy = hs.shape[-1], xs
    _persistent_backward_kernel[(triton.cdiv(rows, BLOCK_B),)](
        xs, hs, _or(sig_x, dummy), _or(sig_h, dummy),
        _or(maps.maps_x, dummy), _or(maps.maps_h, dummy),
        _or(maps.factors_x, dummy), _or(maps.factors_h, dummy), w_ih, w_hh, gates, cells,
        grad_output, grad_xs, grad_hs, grad_cell, grad_gates,
        _or(dz_x, dummy), _or(dz_h, dummy), _or(dinner, dummy), grad_x,
        *steps.tables(xs.device),
        xs.stride(0), hs.stride(0), _stride(sig_x), _stride(sig_h),
        grad_xs.stride(0), grad_hs.stride(0), _stride(dz_x), _stride(dz_h), _stride(dinner),
        _stride(maps.maps_x), _stride(maps.maps_h),
        _stride(maps.factors_x), _stride(maps.factors_h), steps.steps,
        X_SIZE=big_i, H_SIZE=big_h, RANK=maps.rank, ROUNDS=maps.rounds,
        ACC=accumulator(xs.dtype), PRECISION=dot_precision(xs.dtype), **_blocks(maps, big_i, big_h),
    )  # fmt: skip
