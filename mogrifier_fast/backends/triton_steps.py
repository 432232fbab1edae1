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
    x: Tensor, h0: Tensor, c0: Tensor, w_ih: Tensor, w_hh: Tensor, bias: Tensor | None,
    maps: StackedMaps, persistent: bool,
) -> tuple[Tensor, Tensor, Tensor, MogrifyBuffers]:  # fmt: skip
    """x: (T, B, I), h0, c0: (B, H) -> output (T, B, H), cells (T+1, B, H) = c_0..c_T,
    gate pre-activations (T, B, 4H), and the rounds' buffers; step by step, or in one
    ``persistent`` launch."""
    steps, rows, _ = x.shape
    big_h = h0.shape[1]
    buffers = MogrifyBuffers.empty(maps.rounds, maps.rank, steps, rows, x.shape[2], big_h, x)
    buffers.xs[0].copy_(x)
    buffers.hs[0, 0].copy_(h0)
    gates = x.new_empty(steps, rows, 4 * big_h)
    cells = x.new_empty(steps + 1, rows, big_h)
    cells[0].copy_(c0)
    output = x.new_empty(steps, rows, big_h)
    if persistent:
        persistent_forward(maps, buffers, w_ih, w_hh, bias, gates, cells, output)
        return output, cells, gates, buffers
    x_final, h_final = buffers.xs[-1], buffers.hs[-1]
    for t in range(steps):
        if maps.rounds:
            mogrify_forward(maps, buffers, t)
        if bias is None:
            torch.mm(x_final[t], w_ih.t(), out=gates[t])
        else:
            torch.addmm(bias, x_final[t], w_ih.t(), out=gates[t])
        gates[t].addmm_(h_final[t], w_hh.t())
        h_copy = buffers.hs[0, t + 1] if t + 1 < steps else None
        lstm_forward(gates[t], cells[t], cells[t + 1], output[t], h_copy)
    return output, cells, gates, buffers


class _TritonSequence(torch.autograd.Function):
    """One layer-direction over a whole sequence, step by step or persistent (the first
    argument); the same buffers, backward chain and weight-gradient products either way."""

    @staticmethod
    def forward(ctx, persistent, x, h0, c0, w_ih, w_hh, bias, *map_tensors):
        maps = StackedMaps(*map_tensors)
        output, cells, gates, buffers = _forward(x, h0, c0, w_ih, w_hh, bias, maps, persistent)
        ctx.persistent, ctx.has_bias = persistent, bias is not None
        ctx.present, present_maps = maps.saved()
        ctx.save_for_backward(w_ih, w_hh, cells, gates, *buffers, *present_maps)
        return output, output[-1].clone(), cells[-1].clone()

    @staticmethod
    def backward(ctx, grad_output: Tensor, grad_h: Tensor, grad_c: Tensor):
        name = "persistent" if ctx.persistent else "triton"
        refuse_double_backward(name)
        w_ih, w_hh, cells, gates, *rest = ctx.saved_tensors
        buffers = MogrifyBuffers(*rest[:5])
        maps = StackedMaps.restore(ctx.present, rest[5:])
        steps, rows, big_h = cells.shape[0] - 1, cells.shape[1], cells.shape[2]
        xs, hs = buffers.xs, buffers.hs
        grad_output = grad_output.contiguous()
        grad_gates = gates.new_empty(gates.shape)
        # Per-step state gradients; grad_hs[0] carries dh into the step before.
        grad_xs, grad_hs, dz_x, dz_h, dinner = buffers.gradient_buffers()
        grad_hs[0].copy_(grad_h)
        grad_cell = grad_c.clone()
        grad_x = xs.new_empty(xs.shape[1:])
        if ctx.persistent:
            persistent_backward(
                maps, buffers, w_ih, w_hh, gates, cells, grad_output, grad_xs, grad_hs,
                grad_cell, grad_gates, dz_x, dz_h, dinner, grad_x,
            )  # fmt: skip
        else:
            for t in range(steps - 1, -1, -1):
                lstm_backward(
                    gates[t], cells[t], cells[t + 1], grad_output[t], grad_hs[0], grad_cell,
                    grad_gates[t],
                )  # fmt: skip
                torch.mm(grad_gates[t], w_ih, out=grad_xs[-1])
                torch.mm(grad_gates[t], w_hh, out=grad_hs[-1])
                if maps.rounds:
                    mogrify_backward(maps, buffers, t, grad_xs, grad_hs, dz_x, dz_h, dinner)
                grad_x[t].copy_(grad_xs[0])

        # Weight gradients: one product each over all T·B rows.
        gate_rows = grad_gates.view(steps * rows, 4 * big_h)
        grad_w_ih = gate_rows.t() @ xs[-1].reshape(steps * rows, -1)
        grad_w_hh = gate_rows.t() @ hs[-1].reshape(steps * rows, -1)
        grad_bias = gate_rows.sum(0) if ctx.has_bias else None
        map_grads = stacked_map_grads(maps, buffers, dz_x, dz_h, dinner)
        return None, grad_x, grad_hs[0], grad_cell, grad_w_ih, grad_w_hh, grad_bias, *map_grads


def run_sequence(
    seq: Sequence, state: State, params: LayerParams, persistent: bool = False
) -> tuple[Tensor, State]:
    """One layer, one direction, padded input without projections (see
    :mod:`mogrifier_fast.backends` for the contract)."""
    check_dtype("persistent" if persistent else "triton", seq.data)
    maps = StackedMaps.from_params(params)
    bias = None if params.b_ih is None else params.b_ih + params.b_hh
    x, h0, c0 = (t.contiguous() for t in (seq.data, *state))
    args = (x, h0, c0, params.w_ih, params.w_hh, bias)
    if needs_backward(*args, *maps):
        output, h, c = _TritonSequence.apply(persistent, *args, *maps)
        return output, State(h, c)
    output, cells, _, _ = _forward(*args, maps, persistent)
    return output, State(output[-1].clone(), cells[-1].clone())


BACKEND = Backend(
    name="triton",
    run=graphed("triton", run_sequence),
    unavailable_reason=lambda device: kernel_unavailable_reason(_lstm_forward_kernel, device),
    supports=frozenset(),
)
