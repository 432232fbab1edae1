"""Backend ``"cudnn"``: per step, the Triton mogrify kernel prepares (x, h), then ``nn.LSTM``'s
own implementation (cuDNN on a CUDA device) runs that one LSTM step with the layer's weights.

The mogrifier rounds of a step are one autograd function (Triton forward and backward; its map
gradients are formed from that step's rows); the LSTM step is ``torch._VF.lstm`` with a sequence
length of one, differentiated by torch. On a CUDA device the whole call is replayed from CUDA
graphs (:mod:`mogrifier_fast.backends.cuda_graphs`). It is listed only for CUDA devices; the
same code runs on CPU tensors under ``TRITON_INTERPRET=1`` (torch's own LSTM step), which is how
its tests check it without a GPU.
"""

from __future__ import annotations

import warnings

import torch
from torch import Tensor

from mogrifier_fast.backends import Backend, refuse_double_backward
from mogrifier_fast.backends.cuda_graphs import graphed
from mogrifier_fast.kernels import check_dtype, kernel_unavailable_reason
from mogrifier_fast.kernels.mogrify import (
    MogrifyBuffers,
    StackedMaps,
    _mogrify_forward_kernel,
    mogrify_backward,
    mogrify_forward,
    stacked_map_grads,
)
from mogrifier_fast.mogrify import LayerParams, Sequence, State


class _MogrifyStep(torch.autograd.Function):
    """(x (B, I), h (B, H), *StackedMaps) -> the mogrified (x, h) of one step."""

    @staticmethod
    def forward(ctx, x, h, *map_tensors):
        maps = StackedMaps(*map_tensors)
        rows = x.shape[0]
        buffers = MogrifyBuffers.empty(maps.rounds, maps.rank, rows, x.shape[1], h.shape[1], x)
        buffers.xs[0].copy_(x)
        buffers.hs[0].copy_(h)
        mogrify_forward(maps, buffers, slice(0, rows))
        ctx.present, present_maps = maps.saved()
        ctx.save_for_backward(*buffers, *present_maps)
        return buffers.xs[-1].clone(), buffers.hs[-1].clone()

    @staticmethod
    def backward(ctx, grad_x: Tensor, grad_h: Tensor):
        refuse_double_backward("cudnn")
        buffers = MogrifyBuffers(*ctx.saved_tensors[:5])
        maps = StackedMaps.restore(ctx.present, ctx.saved_tensors[5:])
        rows = grad_x.shape[0]
        grad_xs, grad_hs, dz_x, dz_h, dinner = buffers.gradient_buffers(rows)
        grad_xs[-1].copy_(grad_x)
        grad_hs[-1].copy_(grad_h)
        mogrify_backward(maps, buffers, slice(0, rows), grad_xs, grad_hs, dz_x, dz_h, dinner)
        return grad_xs[0], grad_hs[0], *stacked_map_grads(maps, buffers, dz_x, dz_h, dinner)


def run_cudnn(seq: Sequence, state: State, params: LayerParams) -> tuple[Tensor, State]:
    """One layer, one direction, padded input without projections (see
    :mod:`mogrifier_fast.backends` for the contract)."""
    x, (h0, c0) = seq.data, state
    check_dtype("cudnn", x)
    maps = StackedMaps.from_params(params)
    has_bias = params.b_ih is not None
    weights = [params.w_ih, params.w_hh, *((params.b_ih, params.b_hh) if has_bias else ())]
    train = torch.is_grad_enabled()
    h, c, outputs = h0, c0, []
    with warnings.catch_warnings():
        # The layer's weights are separate tensors, not nn.LSTM's one flattened buffer; cuDNN
        # copies them per step, which it warns about on every call.
        warnings.filterwarnings("ignore", message=".*single contiguous chunk of memory.*")
        for x_t in x.unbind(0):
            if maps.rounds:
                x_t, h = _MogrifyStep.apply(x_t.contiguous(), h.contiguous(), *maps)
            _, h_n, c_n = torch._VF.lstm(
                x_t[None], (h[None], c[None]), weights, has_bias, 1, 0.0, train, False, False
            )
            h, c = h_n[0], c_n[0]
            outputs.append(h)
    return torch.stack(outputs), State(h, c)


def _unavailable_reason(device: torch.device) -> str | None:
    if device.type != "cuda":
        return "it runs nn.LSTM's cuDNN path, on CUDA devices only"
    if not torch.backends.cudnn.is_available():
        return "cuDNN is not available"
    return kernel_unavailable_reason(_mogrify_forward_kernel, device)


BACKEND = Backend(
    name="cudnn",
    run=graphed("cudnn", run_cudnn),
    unavailable_reason=_unavailable_reason,
    supports=frozenset(),
)
