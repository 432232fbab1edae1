"""Backend ``"fused"``: one autograd function over a whole sequence, with a hand-derived backward.

How it runs the math of :mod:`mogrifier_fast.mogrify`:

* **Powers of two folded into weights.** Round j computes ``v_j = 2 σ(W_j v_{j-1} + b_j) ⊙ v_{j-2}``
  (with ``v_{-1} = x``, ``v_0 = h``). Writing ``v_j = 2^{d_j} u_j`` (d_j rounds have doubled it)
  gives ``u_j = σ(2^{d_{j-1}} W_j u_{j-1} + b_j) ⊙ u_{j-2}``: the doublings move into the weights,
  scaled once per call (exactly: powers of two), so a round is one GEMM and one ``glu``.
* **One buffer layout for forward and backward.** ``u_{j-2}`` and the pre-activation ``z_j`` sit
  side by side in one (B, 2·size) row block, so ``glu`` computes ``u_j`` and ``glu_backward`` both
  gradients in one call each; each state is written once, straight into the place its consumer
  reads it from (the next glu block, or the concatenated [x, h] of the gate GEMM).
* **tanh as a scaled sigmoid.** The g-gate rows of the gate weights are doubled, so one sigmoid
  (fused into the oneDNN GEMM where that is faster) serves all four gates: tanh(g) = 2σ(2g) − 1.
* **Data gradients in the loop, weight gradients after it**: the backward chain carries only
  dh, dc and the round gradients; every weight gradient is one GEMM over all T·B rows.
* **The fastest GEMM for the shape**: oneDNN's packed linear (packed once per call) for large
  per-step products on CPU in float32, MKL/cuBLAS ``addmm`` otherwise (always correct).
"""

from __future__ import annotations

import functools
from dataclasses import dataclass

import torch
from torch import Tensor

from mogrifier_fast.backends import Backend
from mogrifier_fast.mogrify import LayerParams

# A per-step product of at least this many multiply-adds runs faster through oneDNN's packed
# linear than through addmm on the CPUs measured (DESIGN.md section 4); below it, oneDNN's
# fixed cost per call (~12 us) dominates.
ONEDNN_MIN_MACS = 1 << 22

_glu = torch._C._nn.glu
_glu_backward = torch.ops.aten.glu_backward.grad_input
_sigmoid_backward = torch.ops.aten.sigmoid_backward.grad_input


@functools.cache
def onednn_linear_available() -> bool:
    """Whether oneDNN's packed linear runs here (checked once, on a tiny product)."""
    try:
        weight, x = torch.ones(4, 4), torch.ones(2, 4)
        packed = torch.ops.mkldnn._reorder_linear_weight(weight, 2)
        y = torch.ops.mkldnn._linear_pointwise(x, packed, None, "sigmoid", [], "")
        return bool(torch.allclose(y, torch.sigmoid(x @ weight.T)))
    except (AttributeError, RuntimeError):
        return False


class _Linear:
    """``v -> act(v W^T + b)`` for a weight W (out, in) used at every step of one call."""

    def __init__(self, weight: Tensor, bias: Tensor | None, rows: int) -> None:
        self.weight_t = weight.t()
        self.bias = bias
        self.packed = None
        macs = rows * weight.shape[0] * weight.shape[1]
        if (
            weight.device.type == "cpu"
            and weight.dtype == torch.float32
            and macs >= ONEDNN_MIN_MACS
            and onednn_linear_available()
        ):
            self.packed = torch.ops.mkldnn._reorder_linear_weight(weight.contiguous(), rows)

    def __call__(self, v: Tensor, out: Tensor, sigmoid: bool = False) -> None:
        """out = [σ](v W^T + b). v: (B, in), out: (B, out), may be strided views."""
        if self.packed is not None:
            activation = "sigmoid" if sigmoid else "none"
            out.copy_(
                torch.ops.mkldnn._linear_pointwise(v, self.packed, self.bias, activation, [], "")
            )
            return
        if self.bias is None:
            torch.mm(v, self.weight_t, out=out)
        else:
            torch.addmm(self.bias, v, self.weight_t, out=out)
        if sigmoid:
            out.sigmoid_()

    def accumulate(self, v: Tensor, out: Tensor) -> None:
        """out += v W^T (no bias)."""
        if self.packed is not None:
            out.add_(torch.ops.mkldnn._linear_pointwise(v, self.packed, None, "none", [], ""))
        else:
            torch.addmm(out, v, self.weight_t, out=out)


@dataclass(frozen=True)
class _Structure:
    """The static shape of one layer-direction: sizes, which stored map serves each round."""

    input_size: int
    hidden_size: int
    map_of_round: tuple[int, ...]
    low_rank: tuple[bool, ...]
    map_bias: tuple[bool, ...]
    lstm_bias: bool

    @property
    def rounds(self) -> int:
        return len(self.map_of_round)

    def size(self, state: int) -> int:
        """Width of state u_s: x-states (odd s, s = -1 the input) are I wide, h-states H."""
        return self.input_size if state % 2 else self.hidden_size

    def doublings(self, state: int) -> int:
        """How many rounds have doubled state s (d_s in the module docstring)."""
        return max(0, (state + 1) // 2)

    def final_states(self) -> tuple[int, int]:
        """(x state, h state) that enter the gate product."""
        r = self.rounds
        return (r, r - 1) if r % 2 else (r - 1, r)


def _split(params: LayerParams) -> tuple[_Structure, list[Tensor | None]]:
    """A layer's parameters as a structure and a flat list (w_ih, w_hh, b_ih, b_hh, then each
    stored map's factors and bias), each stored map once even when it serves several rounds."""
    stored: dict[int, int] = {}
    maps = []
    for round_map in params.maps:
        key = id(round_map.factors[0])
        if key not in stored:
            stored[key] = len(maps)
            maps.append(round_map)
    structure = _Structure(
        input_size=params.w_ih.shape[1],
        hidden_size=params.w_hh.shape[1],
        map_of_round=tuple(stored[id(m.factors[0])] for m in params.maps),
        low_rank=tuple(m.low_rank for m in maps),
        map_bias=tuple(m.bias is not None for m in maps),
        lstm_bias=params.b_ih is not None,
    )
    flat: list[Tensor | None] = [params.w_ih, params.w_hh, params.b_ih, params.b_hh]
    for m in maps:
        flat.extend([*m.factors, m.bias])
    return structure, flat


def _unflatten(
    structure: _Structure, flat: tuple
) -> tuple[tuple, list[tuple[tuple[Tensor, ...], Tensor | None]]]:
    lstm, rest = tuple(flat[:4]), list(flat[4:])
    maps = []
    for low_rank in structure.low_rank:
        count = 2 if low_rank else 1
        maps.append((tuple(rest[:count]), rest[count]))
        rest = rest[count + 1 :]
    return lstm, maps


class _Round:
    """Round j's map: z = u_{j-1} (c·W)^T + b with c = 2^{d_{j-1}}, dense or low rank (W = A B,
    run as two thin products through an inner (B, k) value kept per step for the weight
    gradients). Prepared for the forward products, or for the backward ones."""

    def __init__(
        self,
        factors: tuple[Tensor, ...],
        bias: Tensor | None,
        scale: float,
        rows: int,
        backward: bool,
    ) -> None:
        self.scale = scale
        self.low_rank = len(factors) == 2
        scaled = (*factors[:-1], factors[-1] * scale)  # the scale acts on the map's input
        if backward:  # dz -> dz (c·W), or dz A then (dz A)(c·B)
            self.linears = [_Linear(f.t(), None, rows) for f in scaled]
        elif self.low_rank:
            self.linears = [_Linear(scaled[1], None, rows), _Linear(scaled[0], bias, rows)]
        else:
            self.linears = [_Linear(scaled[0], bias, rows)]

    def forward(self, u: Tensor, z: Tensor, inner: Tensor | None) -> None:
        if self.low_rank:
            self.linears[0](u, inner)
            self.linears[1](inner, z)
        else:
            self.linears[0](u, z)

    def backward(self, dz: Tensor, du: Tensor, inner_grad: Tensor | None) -> None:
        """du += dz (c·W): accumulated into the gradient of the map's input."""
        if self.low_rank:
            self.linears[0](dz, inner_grad)
            self.linears[1].accumulate(inner_grad, du)
        else:
            self.linears[0].accumulate(dz, du)

    def weight_grads(
        self, dz: Tensor, u: Tensor, inner: Tensor | None, inner_grad: Tensor | None
    ) -> list[Tensor]:
        """Gradients of (factors..., bias) from all R rows at once: dz (R, out), u (R, in)."""
        if self.low_rank:
            return [dz.t() @ inner, inner_grad.t() @ u * self.scale, dz.sum(0)]
        return [dz.t() @ u * self.scale, dz.sum(0)]


class _Weights:
    """One call's weights prepared for the time loop, for the forward or the backward products.

    Gate weights get the final states' scales folded into their columns and the g rows doubled
    (tanh(g) = 2σ(2g) − 1), as one (4H, I+H) matrix for the concatenated [x, h]."""

    def __init__(
        self, structure: _Structure, flat: tuple, rows: int, backward: bool = False
    ) -> None:
        s, big_h = structure, structure.hidden_size
        (w_ih, w_hh, b_ih, b_hh), maps = _unflatten(s, flat)
        x_final, h_final = s.final_states()
        self.column_scales = (2.0 ** s.doublings(x_final), 2.0 ** s.doublings(h_final))
        self.g_rows = slice(2 * big_h, 3 * big_h)
        gate_weight = torch.cat([w_ih * self.column_scales[0], w_hh * self.column_scales[1]], dim=1)
        gate_weight[self.g_rows] *= 2
        if backward:
            self.gates = _Linear(gate_weight.t(), None, rows)
        else:
            gate_bias = None
            if s.lstm_bias:
                gate_bias = b_ih + b_hh
                gate_bias[self.g_rows] *= 2
            self.gates = _Linear(gate_weight, gate_bias, rows)
        self.rounds = [
            _Round(*maps[m], 2.0 ** s.doublings(j - 1), rows, backward)
            for j, m in enumerate(s.map_of_round, start=1)
        ]


def _homes(structure: _Structure, blocks: list[Tensor], xh: Tensor) -> dict[int, Tensor]:
    """Where each state u_s (s = -1..r) lives over time: the left half of the glu block of round
    s+2 if that round exists, else its part of the concatenated [x, h] gate input. ``blocks[j-1]``
    is round j's block."""
    big_i, r = structure.input_size, structure.rounds
    homes = {}
    for s in range(-1, r + 1):
        if s + 2 <= r:
            homes[s] = blocks[s + 1][..., : structure.size(s)]
        else:
            homes[s] = xh[..., :big_i] if s % 2 else xh[..., big_i:]
    return homes


@dataclass
class _Saved:
    """What the forward keeps for the backward, over time (T+1 steps where a state is also the
    next step's input). blocks[j-1]: round j's [u_{j-2}, z_j] (T+1, B, 2·size); inners[j-1]:
    low-rank round j's u_{j-1} (c·B)^T (T, B, k), else None; xh: gate input [x, h] (T+1, B, I+H);
    activations: [σ(i), σ(f), σ(2g), σ(o)] (T, B, 4H); tanh_g, tanh_c: (T, B, H); cells:
    c_0..c_T (T+1, B, H)."""

    blocks: list[Tensor]
    inners: list[Tensor | None]
    xh: Tensor
    activations: Tensor
    tanh_g: Tensor
    cells: Tensor
    tanh_c: Tensor

    @classmethod
    def allocate(
        cls, structure: _Structure, like: Tensor, steps: int, rows: int, ranks: list[int | None]
    ) -> _Saved:
        s, big_h, new = structure, structure.hidden_size, like.new_empty
        return cls(
            blocks=[new(steps + 1, rows, 2 * s.size(j)) for j in range(1, s.rounds + 1)],
            inners=[None if k is None else new(steps, rows, k) for k in ranks],
            xh=new(steps + 1, rows, s.input_size + big_h),
            activations=new(steps, rows, 4 * big_h),
            tanh_g=new(steps, rows, big_h),
            cells=new(steps + 1, rows, big_h),
            tanh_c=new(steps, rows, big_h),
        )

    def tensors(self) -> list[Tensor]:
        inners = [t for t in self.inners if t is not None]
        return [
            *self.blocks,
            *inners,
            self.xh,
            self.activations,
            self.tanh_g,
            self.cells,
            self.tanh_c,
        ]

    @classmethod
    def from_tensors(
        cls, structure: _Structure, ranks: list[int | None], tensors: tuple[Tensor, ...]
    ) -> _Saved:
        r = structure.rounds
        found = iter(tensors[r : r + sum(k is not None for k in ranks)])
        inners = [None if k is None else next(found) for k in ranks]
        return cls(list(tensors[:r]), inners, *tensors[len(tensors) - 5 :])


def _chunks(t: Tensor, count: int) -> list[tuple[Tensor, ...]]:
    """Split the last dim of t (..., count·n) into count parts, each unbound over time."""
    width = t.shape[-1] // count
    return [t[..., k * width : (k + 1) * width].unbind(0) for k in range(count)]


def _ranks(structure: _Structure, flat: tuple) -> list[int | None]:
    _, maps = _unflatten(structure, flat)
    return [
        maps[m][0][0].shape[1] if structure.low_rank[m] else None for m in structure.map_of_round
    ]


def _forward(structure: _Structure, x: Tensor, h0: Tensor, c0: Tensor, flat: tuple) -> _Saved:
    """Run the whole sequence. x: (T, B, I), h0, c0: (B, H)."""
    s, steps, rows = structure, x.shape[0], x.shape[1]
    weights = _Weights(s, flat, rows)
    saved = _Saved.allocate(s, x, steps, rows, _ranks(s, flat))
    homes = _homes(s, saved.blocks, saved.xh)
    homes[-1][:-1].copy_(x)
    homes[0][0].copy_(h0)
    saved.cells[0].copy_(c0)
    home = {k: v.unbind(0) for k, v in homes.items()}
    blocks = [b.unbind(0) for b in saved.blocks]
    z = [_chunks(b, 2)[1] for b in saved.blocks]
    inners = [None if t is None else t.unbind(0) for t in saved.inners]
    xh, act = saved.xh.unbind(0), saved.activations.unbind(0)
    gate_i, gate_f, gate_g, gate_o = _chunks(saved.activations, 4)
    tanh_g, cells, tanh_c = saved.tanh_g.unbind(0), saved.cells.unbind(0), saved.tanh_c.unbind(0)
    h_next = home[0][1:]
    minus_one, two = x.new_tensor(-1.0), x.new_tensor(2.0)
    mul, addcmul, tanh, gates = torch.mul, torch.addcmul, torch.tanh, weights.gates
    rounds = [
        (j, weights.rounds[j - 1], blocks[j - 1], z[j - 1], inners[j - 1])
        for j in range(1, s.rounds + 1)
    ]
    for t in range(steps):
        for j, round_, block, z_j, inner in rounds:
            round_.forward(home[j - 1][t], z_j[t], None if inner is None else inner[t])
            _glu(block[t], -1, out=home[j][t])
        gates(xh[t], act[t], sigmoid=True)
        addcmul(minus_one, gate_g[t], two, out=tanh_g[t])
        mul(gate_f[t], cells[t], out=cells[t + 1])
        cells[t + 1].addcmul_(gate_i[t], tanh_g[t])
        tanh(cells[t + 1], out=tanh_c[t])
        mul(gate_o[t], tanh_c[t], out=h_next[t])
    return saved


def _outputs(structure: _Structure, saved: _Saved) -> tuple[Tensor, Tensor, Tensor]:
    h = _homes(structure, saved.blocks, saved.xh)[0]
    return h[1:].contiguous(), h[-1].clone(), saved.cells[-1].clone()


def _backward(
    structure: _Structure,
    flat: tuple,
    saved: _Saved,
    grad_output: Tensor,
    grad_h: Tensor,
    grad_c: Tensor,
) -> tuple[Tensor, Tensor, Tensor, list[Tensor | None]]:
    """Gradients of x, h0, c0 and of the flat weights, from those of output, h_T and c_T."""
    s, steps, rows = structure, grad_output.shape[0], grad_output.shape[1]
    weights = _Weights(s, flat, rows, backward=True)
    new = grad_output.new_empty
    grad_blocks = [new(steps, rows, 2 * s.size(j)) for j in range(1, s.rounds + 1)]
    grad_inners = [None if t is None else torch.empty_like(t) for t in saved.inners]
    grad_xh = new(steps, rows, s.input_size + s.hidden_size)
    grad_act = new(steps, rows, 4 * s.hidden_size)
    grad_homes = _homes(s, grad_blocks, grad_xh)

    dhome = {k: v.unbind(0) for k, v in grad_homes.items()}
    blocks = [b.unbind(0) for b in saved.blocks]
    dblocks = [b.unbind(0) for b in grad_blocks]
    dz = [_chunks(b, 2)[1] for b in grad_blocks]
    dinners = [None if t is None else t.unbind(0) for t in grad_inners]
    act, dact, dxh = saved.activations.unbind(0), grad_act.unbind(0), grad_xh.unbind(0)
    gate_i, gate_f, _, gate_o = _chunks(saved.activations, 4)
    d_i, d_f, d_g, d_o = _chunks(grad_act, 4)
    tanh_g, cells, tanh_c = saved.tanh_g.unbind(0), saved.cells.unbind(0), saved.tanh_c.unbind(0)
    one, zero = grad_output.new_tensor(1.0), grad_output.new_tensor(0.0)
    mul, addcmul, gates = torch.mul, torch.addcmul, weights.gates
    rounds = [
        (j, weights.rounds[j - 1], blocks[j - 1], dblocks[j - 1], dz[j - 1], dinners[j - 1])
        for j in range(s.rounds, 0, -1)
    ]
    dh = grad_output[-1] + grad_h
    dc = grad_c.clone()
    through_tanh = torch.empty_like(dc)
    for t in range(steps - 1, -1, -1):
        # dc += dh σ(o) (1 − tanh² c)
        addcmul(one, tanh_c[t], tanh_c[t], value=-1, out=through_tanh)
        through_tanh.mul_(gate_o[t])
        dc.addcmul_(dh, through_tanh)
        # Gradients of the four activations, then of the pre-activations, in place.
        mul(dc, tanh_g[t], out=d_i[t])
        mul(dc, cells[t], out=d_f[t])
        addcmul(zero, dc, gate_i[t], value=2, out=d_g[t])
        mul(dh, tanh_c[t], out=d_o[t])
        _sigmoid_backward(dact[t], act[t], grad_input=dact[t])
        dc.mul_(gate_f[t])
        gates(dact[t], dxh[t])
        for j, round_, block, dblock, dz_j, dinner in rounds:
            _glu_backward(dhome[j][t], block[t], -1, grad_input=dblock[t])
            round_.backward(dz_j[t], dhome[j - 1][t], None if dinner is None else dinner[t])
        if t > 0:
            torch.add(grad_output[t - 1], dhome[0][t], out=dh)
    grad_x, grad_h0 = grad_homes[-1].contiguous(), dhome[0][0].clone()

    # Weight gradients: one product each over all T·B rows.
    big_i, total = s.input_size, steps * rows
    homes = _homes(s, saved.blocks, saved.xh)
    dp = grad_act.view(total, -1)
    d_gate_weight = dp.t() @ saved.xh[:-1].view(total, -1)
    d_gate_weight[weights.g_rows] *= 2
    d_w_ih = d_gate_weight[:, :big_i] * weights.column_scales[0]
    d_w_hh = d_gate_weight[:, big_i:] * weights.column_scales[1]
    d_bias = None
    if s.lstm_bias:
        d_bias = dp.sum(0)
        d_bias[weights.g_rows] *= 2
    map_grads: list[list[Tensor] | None] = [None] * len(s.low_rank)
    for j, m in enumerate(s.map_of_round, start=1):
        dz_all = grad_blocks[j - 1][..., s.size(j) :].reshape(total, -1)
        u_all = homes[j - 1][:-1].reshape(total, -1)
        inner, dinner = saved.inners[j - 1], grad_inners[j - 1]
        if inner is not None:
            inner, dinner = inner.view(total, -1), dinner.view(total, -1)
        grads = weights.rounds[j - 1].weight_grads(dz_all, u_all, inner, dinner)
        previous = map_grads[m]
        map_grads[m] = (
            grads if previous is None else [a + b for a, b in zip(previous, grads, strict=True)]
        )
    flat_grads: list[Tensor | None] = [
        d_w_ih,
        d_w_hh,
        d_bias,
        None if d_bias is None else d_bias.clone(),
    ]
    for grads, has_bias in zip(map_grads, s.map_bias, strict=True):
        flat_grads.extend(grads if has_bias else grads[:-1] + [None])
    return grad_x, grad_h0, dc, flat_grads


class _FusedSequence(torch.autograd.Function):
    @staticmethod
    def forward(
        ctx, structure: _Structure, x: Tensor, h0: Tensor, c0: Tensor, *flat: Tensor | None
    ):
        saved = _forward(structure, x, h0, c0, flat)
        ctx.structure, ctx.weight_slots = structure, [t is not None for t in flat]
        ctx.save_for_backward(*(t for t in flat if t is not None), *saved.tensors())
        return _outputs(structure, saved)

    @staticmethod
    def backward(ctx, grad_output: Tensor, grad_h: Tensor, grad_c: Tensor):
        if torch.is_grad_enabled():
            raise RuntimeError(
                "backend 'fused' does not support double backward (create_graph=True): its "
                "backward is hand-written; use backend='reference' for higher-order gradients"
            )
        structure, tensors = ctx.structure, ctx.saved_tensors
        present = iter(tensors)
        flat = tuple(next(present) if slot else None for slot in ctx.weight_slots)
        saved = _Saved.from_tensors(structure, _ranks(structure, flat), tuple(present))
        grad_x, grad_h0, grad_c0, grads = _backward(
            structure, flat, saved, grad_output.contiguous(), grad_h, grad_c
        )
        return None, grad_x, grad_h0, grad_c0, *grads


def run_fused(
    x: Tensor, h0: Tensor, c0: Tensor, params: LayerParams
) -> tuple[Tensor, Tensor, Tensor]:
    """One layer, one direction. x: (T, B, I), h0, c0: (B, H) -> output (T, B, H), h_T, c_T."""
    structure, flat = _split(params)
    if torch.is_grad_enabled() and any(
        t is not None and t.requires_grad for t in (x, h0, c0, *flat)
    ):
        return _FusedSequence.apply(structure, x, h0, c0, *flat)
    with torch.no_grad():
        return _outputs(structure, _forward(structure, x, h0, c0, tuple(flat)))


BACKEND = Backend(name="fused", run=run_fused)
