"""Backend ``"persistent"``: the whole recurrence in one Triton launch, forward and backward.

See :mod:`mogrifier_fast.kernels.persistent` for the kernels; the autograd function, buffers and
weight-gradient products are the step-by-step backend's (:mod:`.triton_steps`). A layer whose
weights exceed ``MAX_WEIGHT_BYTES`` (they are re-read from cache every step, so they should fit
in the GPU's L2) runs step by step instead, said once per layer shape in the ``mogrifier_fast``
log. A packed batch runs in the same single launch, each step on its own rows (the kernels
read each step's row count and first row from small tables). On a CUDA device calls are
replayed from CUDA graphs like the other Triton backends.

Two plans run the same kernels (see the kernels' module): ``"rows"``, one program per block of
16 batch rows, and ``"grid"``, a cooperative launch over up to one program per SM with a
grid-wide barrier between phases. :func:`choose_plan` picks one per call;
``MOGRIFIER_PERSISTENT_PLAN=rows|grid`` forces it.
"""

from __future__ import annotations

import logging
import os

import torch
from torch import Tensor

from mogrifier_fast.backends import Backend
from mogrifier_fast.backends.cuda_graphs import graphed
from mogrifier_fast.backends.triton_steps import run_sequence
from mogrifier_fast.kernels import kernel_unavailable_reason
from mogrifier_fast.kernels.persistent import PLANS, _persistent_forward_kernel, grid_programs
from mogrifier_fast.mogrify import LayerParams, Sequence, State

# The most weight bytes a layer-direction may have to run persistently (about two thirds of an
# H100/H200's 50-60 MB L2). A design bound, not a measured optimum.
MAX_WEIGHT_BYTES = 40 * 2**20

logger = logging.getLogger("mogrifier_fast")
_fallbacks_logged: set[tuple] = set()
_plans: dict[tuple, str] = {}  # choose_plan's answers, by layer sizes and GPU


def weight_bytes(params: LayerParams) -> int:
    """Bytes of one layer-direction's weights as the kernels read them (shared maps once)."""
    tensors = {
        id(t): t for t in (params.w_ih, params.w_hh, params.b_ih, params.b_hh) if t is not None
    }
    for round_map in params.maps:
        tensors.update({id(t): t for t in (*round_map.factors, round_map.bias) if t is not None})
    return sum(t.numel() * t.element_size() for t in tensors.values())


def choose_plan(seq: Sequence, params: LayerParams) -> str:
    """The persistent plan for a call: ``MOGRIFIER_PERSISTENT_PLAN`` where set; else, on a GPU, the
    plan :func:`mogrifier_fast.predict.persistent_plan` predicts faster for this layer's sizes on
    this GPU's SMs (no plan has been timed on a GPU yet); "grid" on CPU (the interpreter)."""
    forced = os.environ.get("MOGRIFIER_PERSISTENT_PLAN")
    if forced:
        if forced not in PLANS:
            raise ValueError(
                f"MOGRIFIER_PERSISTENT_PLAN: expected one of {list(PLANS)}, got {forced!r}"
            )
        return forced
    data = seq.data
    if data.device.type != "cuda":
        return "grid"
    key = (
        seq.steps, seq.batch, params.w_ih.shape[1], params.cell_size, params.rounds,
        params.maps[0].factors[0].shape[1] if params.rounds and params.maps[0].low_rank else None,
        data.dtype, torch.is_grad_enabled() and (data.requires_grad or params.w_ih.requires_grad),
        grid_programs(data.device),
    )  # fmt: skip
    if key not in _plans:
        from mogrifier_fast.bench import Config
        from mogrifier_fast.predict import persistent_plan

        steps, batch, inputs, hidden, rounds, rank, dtype, training, sms = key
        config = Config(
            steps, batch, inputs, hidden, rounds, rank,
            dtype="bfloat16" if dtype == torch.bfloat16 else "float32",
            mode="training" if training else "inference",
        )  # fmt: skip
        _plans[key] = persistent_plan(config, sms)
    return _plans[key]


def run_persistent(seq: Sequence, state: State, params: LayerParams) -> tuple[Tensor, State]:
    """One layer, one direction, padded or packed input without projections (see
    :mod:`mogrifier_fast.backends` for the contract)."""
    size = weight_bytes(params)
    if size > MAX_WEIGHT_BYTES:
        shape = (params.w_ih.shape, params.w_hh.shape, params.rounds, seq.data.dtype)
        if shape not in _fallbacks_logged:
            _fallbacks_logged.add(shape)
            logger.warning(
                "backend 'persistent': %.1f MB of weights exceed its %.0f MB budget "
                "(MAX_WEIGHT_BYTES); this layer runs step by step (backend 'triton')",
                size / 2**20, MAX_WEIGHT_BYTES / 2**20,
            )  # fmt: skip
        return run_sequence(seq, state, params)
    return run_sequence(seq, state, params, plan=choose_plan(seq, params))


BACKEND = Backend(
    name="persistent",
    run=graphed("persistent", run_persistent),
    unavailable_reason=lambda device: kernel_unavailable_reason(_persistent_forward_kernel, device),
    supports=frozenset({"packed"}),
)
