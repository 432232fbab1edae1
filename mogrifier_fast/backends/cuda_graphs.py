"""CUDA graphs for the step-by-step backends: a whole fixed-shape call, forward and backward,
captured once and replayed.

A step-by-step backend launches a few small kernels per step, so on a GPU its time goes to
launching. :func:`graphed` wraps a backend's ``run``: on CUDA tensors, the first call of each
configuration (shapes, dtypes, which tensors need gradients, grad mode, the parameters' storage)
is captured with ``torch.cuda.make_graphed_callables`` (forward and backward graphs) or, without
gradients, ``torch.cuda.graph``; later calls replay it. Outputs are copied out of the graph's
static buffers, and gradients out of its gradient buffers, so results stay valid across calls.
A graph holds the activations of one call until its backward, so while that backward is
pending a further call with gradients runs with plain launches. Where capture fails, the reason is logged once (logger ``mogrifier_fast``) and
that configuration runs with plain launches. ``MOGRIFIER_CUDA_GRAPHS=0`` turns graphs off.
"""

from __future__ import annotations

import logging
import os
import weakref
from collections import OrderedDict
from collections.abc import Callable

import torch
from torch import Tensor

from mogrifier_fast.backends import RunFn, needs_backward
from mogrifier_fast.mogrify import LayerParams, RoundMap, Sequence, State

# Captured configurations kept per backend; the least recently used is dropped past this.
MAX_GRAPHS = 16

logger = logging.getLogger("mogrifier_fast")
_logged: set[str] = set()


def graphs_enabled() -> bool:
    """CUDA graphs are used unless ``MOGRIFIER_CUDA_GRAPHS=0``."""
    return os.environ.get("MOGRIFIER_CUDA_GRAPHS", "1") != "0"


def _uses_graphs(x: Tensor) -> bool:
    """Whether a call on ``x`` is captured/replayed: CUDA, graphs on, not inside a capture."""
    return (
        x.device.type == "cuda"
        and graphs_enabled()
        and not torch.cuda.is_current_stream_capturing()
    )


def _log_once(message: str) -> None:
    if message not in _logged:
        _logged.add(message)
        logger.warning(message)


def _flatten(params: LayerParams) -> tuple[list[Tensor], Callable[[list[Tensor]], LayerParams]]:
    """The layer's tensors as a flat list, and the function that rebuilds LayerParams from such a
    list (a map serving several rounds appears once, so gradients still add up through it)."""
    tensors: list[Tensor] = []
    slots: dict[int, int] = {}

    def slot(t: Tensor | None) -> int | None:
        if t is None:
            return None
        if id(t) not in slots:
            slots[id(t)] = len(tensors)
            tensors.append(t)
        return slots[id(t)]

    lstm = [slot(t) for t in (params.w_ih, params.w_hh, params.b_ih, params.b_hh)]
    maps = [([slot(f) for f in m.factors], slot(m.bias)) for m in params.maps]
    projection = slot(params.w_hr)

    def rebuild(flat: list[Tensor]) -> LayerParams:
        def get(index: int | None) -> Tensor | None:
            return None if index is None else flat[index]

        return LayerParams(
            *(get(i) for i in lstm),
            tuple(RoundMap(tuple(get(f) for f in fs), get(b)) for fs, b in maps),
            params.map_of_round,
            get(projection),
        )

    return tensors, rebuild


class _ReleaseOnBackward(torch.autograd.Function):
    """Identity on the outputs whose backward marks the graph's activations as free again."""

    @staticmethod
    def forward(ctx, pending: dict, *outputs: Tensor):
        ctx.pending = pending
        return tuple(o.clone() for o in outputs)

    @staticmethod
    def backward(ctx, *grads: Tensor):
        ctx.pending["busy"] = False
        return None, *grads


class _CopyGradients(torch.autograd.Function):
    """Identity on the graph's inputs (views, so the graph sees the same storage) whose backward
    copies the gradients out of the graph's static buffers: autograd may otherwise keep such a
    buffer as a leaf's ``.grad``, which the next replay would overwrite."""

    @staticmethod
    def forward(ctx, *inputs: Tensor):
        return tuple(t.view_as(t) for t in inputs)

    @staticmethod
    def backward(ctx, *grads: Tensor):
        return tuple(None if g is None else g.clone() for g in grads)


class _Graph:
    """One captured configuration: a replay function and, with gradients, a pending flag."""

    def __init__(self, run: RunFn, rebuild, inputs: list[Tensor], train: bool) -> None:
        def function(*flat: Tensor) -> tuple[Tensor, Tensor, Tensor]:
            output, (h, c) = run(
                Sequence(flat[0]), State(flat[1], flat[2]), rebuild(list(flat[3:]))
            )
            return output, h, c

        self.train = train
        self.pending = {"busy": False}
        if train:
            sample = tuple(t.detach().clone().requires_grad_(t.requires_grad) for t in inputs)
            self.replay = torch.cuda.make_graphed_callables(function, sample)
            return
        self.static_inputs = [t.detach().clone() for t in inputs]
        stream = torch.cuda.Stream()
        stream.wait_stream(torch.cuda.current_stream())
        with torch.cuda.stream(stream):
            for _ in range(2):  # warm-up: compile the kernels, settle the allocator
                function(*self.static_inputs)
        torch.cuda.current_stream().wait_stream(stream)
        self.graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(self.graph):
            self.static_outputs = function(*self.static_inputs)

    def __call__(self, inputs: list[Tensor]) -> tuple[Tensor, Tensor, Tensor]:
        if not self.train:
            for static, given in zip(self.static_inputs, inputs, strict=True):
                if static.data_ptr() != given.data_ptr():
                    static.copy_(given)
            self.graph.replay()
            return tuple(o.clone() for o in self.static_outputs)
        self.pending["busy"] = True
        outputs = _ReleaseOnBackward.apply(
            self.pending, *self.replay(*_CopyGradients.apply(*inputs))
        )
        # An output dropped without a backward frees the activations too.
        weakref.finalize(outputs[0], self.pending.__setitem__, "busy", False)
        return outputs


def graphed(name: str, run: RunFn) -> RunFn:
    """``run`` replayed from CUDA graphs on CUDA tensors (see the module docstring); unchanged
    on other devices."""
    graphs: OrderedDict[tuple, _Graph | None] = OrderedDict()

    def run_graphed(seq: Sequence, state: State, params: LayerParams) -> tuple[Tensor, State]:
        x, (h0, c0) = seq.data, state
        # A packed batch's batch_sizes change from batch to batch: never captured.
        if not _uses_graphs(x) or seq.packed:
            return run(seq, state, params)
        flat, rebuild = _flatten(params)
        inputs = [x, h0, c0, *flat]
        train = needs_backward(*inputs)
        key = (
            train,
            torch.is_autocast_enabled(),
            tuple((t.shape, t.dtype, t.device, t.requires_grad, t.data_ptr()) for t in flat),
            tuple((t.shape, t.dtype, t.device, t.requires_grad) for t in inputs[:3]),
        )
        if key not in graphs:
            try:
                graphs[key] = _Graph(run, rebuild, inputs, train)
            except Exception as error:  # capture is best effort; plain launches always work
                graphs[key] = None
                _log_once(
                    f"backend {name!r}: CUDA graph capture failed, using plain launches ({error})"
                )
            while len(graphs) > MAX_GRAPHS:
                graphs.popitem(last=False)
        graphs.move_to_end(key)
        graph = graphs[key]
        if graph is None or (graph.train and graph.pending["busy"]):
            return run(seq, state, params)
        output, h, c = graph(inputs)
        return output, State(h, c)

    return run_graphed
