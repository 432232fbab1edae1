"""Backend ``"triton"``: the recurrence step by step with Triton kernels.

Per step: the mogrify kernel (every round, :mod:`mogrifier_fast.kernels.mogrify`), the gate
product through torch (two ``addmm`` into one (B, 4H) block), and the LSTM pointwise kernel
(:mod:`mogrifier_fast.kernels.lstm`). The backward walks the steps in reverse carrying only data
gradients; every weight gradient is one product over all T·B rows after the loop. On a CUDA
device the whole call, forward and backward, is captured once per shape as CUDA graphs and
replayed (:mod:`mogrifier_fast.backends.cuda_graphs`). Under ``TRITON_INTERPRET=1`` the kernels
run on CPU tensors, which is how CI checks this backend.
"""

from __future__ import annotations

import torch
from torch import Tensor

from mogrifier_fast.backends import Backend, needs_backward, refuse_double_backward
from mogrifier_fast.backends.cuda_graphs import graphed
from mogrifier_fast.backends.layout import StepRows
from mogrifier_fast.kernels import check_dtype, kernel_unavailable_reason
from mogrifier_fast.kernels.lstm import _lstm_forward_kernel, lstm_backward, lstm_forward
from mogrifier_fast.kernels.mogrify import (
    MogrifyBuffers,
    StackedMaps,
    mogrify_backward,
    mogrify_forward,
    stacked_map_grads,
)
from mogrifier_fast.kernels.persistent import persistent_backward, persistent_forward
from mogrifier_fast.mogrify import LayerParams, Sequence, State


def _forward(
    rows: StepRows, x: Tensor, h0: Tensor, c0: Tensor, w_ih: Tensor, w_hh: Tensor,
    bias: Tensor | None, maps: StackedMaps, plan: str | None,
) -> tuple[Tensor, Tensor, Tensor, MogrifyBuffers]:  # fmt: skip
    """x: (R, I) (every step's rows), h0, c0: (B, H) -> output (R, H), cells (B + R, H) = c_0
    then every step's c, gate pre-activations (R, 4H), and the rounds' buffers; step by step
    (``plan`` None), or in one persistent launch of that plan ("rows" or "grid")."""
    batch, big_h = h0.shape
    buffers = MogrifyBuffers.empty(maps.rounds, maps.rank, rows.total, x.shape[1], big_h, x)
    buffers.xs[0].copy_(x)
    buffers.hs[0, :batch].copy_(h0)
    gates = x.new_empty(rows.total, 4 * big_h)
    cells = x.new_empty(batch + rows.total, big_h)
    cells[:batch].copy_(c0)
    output = x.new_empty(rows.total, big_h)
    if plan is not None:
        persistent_forward(maps, buffers, w_ih, w_hh, bias, gates, cells, output, rows, plan)
        return output, cells, gates, buffers
    x_final, h_final = buffers.xs[-1], buffers.hs[-1]
    sizes = rows.sizes
    for t in range(rows.steps):
        step, n = rows.step_span(t), sizes[t]
        if maps.rounds:
            mogrify_forward(maps, buffers, step)
        if bias is None:
            torch.mm(x_final[step], w_ih.t(), out=gates[step])
        else:
            torch.addmm(bias, x_final[step], w_ih.t(), out=gates[step])
        gates[step].addmm_(h_final[step], w_hh.t())
        c_prev = rows.previous(cells, step)
        c_next = cells[batch + step.start : batch + step.stop]
        # The next step's h input: this step's h, or its first rows (sequences still running).
        next_rows = rows.step_span(t + 1) if t + 1 < rows.steps else None
        whole = next_rows is not None and sizes[t + 1] == n
        lstm_forward(
            gates[step], c_prev, c_next, output[step], buffers.hs[0, next_rows] if whole else None
        )
        if next_rows is not None and not whole:
            buffers.hs[0, next_rows].copy_(output[step][: sizes[t + 1]])
    return output, cells, gates, buffers


class _TritonSequence(torch.autograd.Function):
    """One layer-direction over a whole sequence, step by step or persistent (the first
    argument: None or the persistent plan); the same buffers, backward chain and weight-gradient
    products either way."""

    @staticmethod
    def forward(ctx, plan, rows, x, h0, c0, w_ih, w_hh, bias, *map_tensors):
        maps = StackedMaps(*map_tensors)
        output, cells, gates, buffers = _forward(rows, x, h0, c0, w_ih, w_hh, bias, maps, plan)
        ctx.plan, ctx.rows, ctx.has_bias = plan, rows, bias is not None
        ctx.present, present_maps = maps.saved()
        ctx.save_for_backward(w_ih, w_hh, cells, gates, *buffers, *present_maps)
        return output, *_final_state(rows, output, cells)

    @staticmethod
    def backward(ctx, grad_output: Tensor, grad_h: Tensor, grad_c: Tensor):
        name = "triton" if ctx.plan is None else "persistent"
        refuse_double_backward(name)
        rows: StepRows = ctx.rows
        w_ih, w_hh, cells, gates, *rest = ctx.saved_tensors
        buffers = MogrifyBuffers(*rest[:5])
        maps = StackedMaps.restore(ctx.present, rest[5:])
        batch = grad_h.shape[0]
        xs, hs = buffers.xs, buffers.hs
        grad_output = grad_output.contiguous()
        grad_gates = gates.new_empty(gates.shape)
        # Per-step state gradients; grad_hs[0] carries dh into the step before. Its rows past a
        # step's own are those of sequences that end earlier: they hold h_n's gradient until
        # their last step, as grad_cell holds c_n's.
        grad_xs, grad_hs, dz_x, dz_h, dinner = buffers.gradient_buffers(batch)
        grad_hs[0].copy_(grad_h)
        grad_cell = grad_c.clone()
        grad_x = xs.new_empty(xs.shape[1:])
        if ctx.plan is not None:
            persistent_backward(
                maps, buffers, w_ih, w_hh, gates, cells, grad_output, grad_xs, grad_hs,
                grad_cell, grad_gates, dz_x, dz_h, dinner, grad_x, rows, ctx.plan,
            )  # fmt: skip
        else:
            for t in range(rows.steps - 1, -1, -1):
                step, n = rows.step_span(t), rows.sizes[t]
                c_next = cells[batch + step.start : batch + step.stop]
                lstm_backward(
                    gates[step], rows.previous(cells, step), c_next, grad_output[step],
                    grad_hs[0, :n], grad_cell[:n], grad_gates[step],
                )  # fmt: skip
                torch.mm(grad_gates[step], w_ih, out=grad_xs[-1, :n])
                torch.mm(grad_gates[step], w_hh, out=grad_hs[-1, :n])
                if maps.rounds:
                    mogrify_backward(maps, buffers, step, grad_xs, grad_hs, dz_x, dz_h, dinner)
                grad_x[step].copy_(grad_xs[0, :n])

        # Weight gradients: one product each over all R rows.
        grad_w_ih = grad_gates.t() @ xs[-1]
        grad_w_hh = grad_gates.t() @ hs[-1]
        grad_bias = grad_gates.sum(0) if ctx.has_bias else None
        map_grads = stacked_map_grads(maps, buffers, dz_x, dz_h, dinner)
        return (
            None, None, grad_x, grad_hs[0], grad_cell, grad_w_ih, grad_w_hh, grad_bias,
            *map_grads,
        )  # fmt: skip


def _final_state(rows: StepRows, output: Tensor, cells: Tensor) -> tuple[Tensor, Tensor]:
    """Each sequence's h and c after its own last step (B, H)."""
    return rows.at_last_step(output), rows.at_last_step(cells[rows.batch :])


def run_sequence(
    seq: Sequence, state: State, params: LayerParams, plan: str | None = None
) -> tuple[Tensor, State]:
    """One layer, one direction without projections, padded or packed, step by step or (with a
    ``plan``) persistent (see :mod:`mogrifier_fast.backends` for the contract)."""
    check_dtype("triton" if plan is None else "persistent", seq.data)
    maps = StackedMaps.from_params(params)
    bias = None if params.b_ih is None else params.b_ih + params.b_hh
    rows = StepRows(seq)
    x = rows.all_rows(seq.data).contiguous()
    h0, c0 = (t.contiguous() for t in state)
    args = (x, h0, c0, params.w_ih, params.w_hh, bias)
    if needs_backward(*args, *maps):
        output, h, c = _TritonSequence.apply(plan, rows, *args, *maps)
        return rows.laid_out(output), State(h, c)
    output, cells, _, _ = _forward(rows, *args, maps, plan)
    return rows.laid_out(output), State(*_final_state(rows, output, cells))


BACKEND = Backend(
    name="triton",
    run=graphed("triton", run_sequence),
    unavailable_reason=lambda device: kernel_unavailable_reason(_lstm_forward_kernel, device),
    supports=frozenset({"packed"}),
)
