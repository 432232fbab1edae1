"""Backend ``"fused"``: one autograd function over a whole sequence, with a hand-derived backward.

How it runs the math of :mod:`mogrifier_fast.mogrify`:

* **Powers of two folded into weights.** Round j computes ``v_j = 2 σ(W_j v_{j-1} + b_j) ⊙ v_{j-2}``
  (with ``v_{-1} = x``, ``v_0 = h``). Writing ``v_j = 2^{d_j} u_j`` (d_j rounds have doubled it)
  gives ``u_j = σ(2^{d_{j-1}} W_j u_{j-1} + b_j) ⊙ u_{j-2}``: the doublings move into the weights
  (exactly: powers of two), so a round is one product, one in-place sigmoid and one multiply.
  The Python loops scale copies of the weights once per call; the C++ loops fold the scales in
  as they pack the weights, or apply them to the product when they read the weights in place.
* **Each state written once, where it is read.** The two states that enter the gate product are
  written straight into their halves of the concatenated [x, h] row block, so the gate product
  is one GEMM; the others live in per-state buffers kept for the backward.
* **One sigmoid for four gates.** The g-gate rows of the gate weights are doubled, so one
  sigmoid serves all four gates (σ(2g) is what the backward needs of g); tanh(g) and tanh(c)
  themselves come from tanh (an accurate vector tanh in the C++ loops), not from
  2σ(2v) − 1, whose error near zero is absolute (about 1e-7 in float32), not relative: that
  showed as 1e-3 relative errors on small projected outputs. The cell is carried doubled.
* **Data gradients in the loop, weight gradients after it**: the backward chain carries only
  dh, dc and the round gradients; every weight gradient is one GEMM over all T·B rows.
* **Two ways to run the loops, on the same buffers**: in float32 on CPU, the C++ loops of
  :mod:`mogrifier_fast.backends.fused_chain` (where they build; they also form the weight
  gradients; one :class:`~mogrifier_fast.backends.fused_chain.NativeCall` per call, decided
  once); otherwise Python loops of torch ops, with oneDNN's linear on CPU in float32 for
  per-step products of at least ``ONEDNN_MIN_MACS`` multiply-adds (the weight packed once per
  call from ``ONEDNN_PACK_MACS``) and ``addmm`` elsewhere (always correct). Under ``no_grad``
  nothing is kept for a backward.
"""

from __future__ import annotations

import functools
from dataclasses import dataclass

import torch
from torch import Tensor

from mogrifier_fast.backends import Backend, fused_chain, needs_backward, refuse_double_backward
from mogrifier_fast.backends.layout import StepRows
from mogrifier_fast.mogrify import LayerParams, Sequence, State

# torch.compiler.disable imports torch._dynamo where it decorates: about 2.5 s of every import
# of this package. torch's own lazy form (which Dynamo skips, so it graph-breaks there) defers
# that to the first call; a torch without it gets the public form.
compile_disabled = getattr(torch, "_disable_dynamo", torch.compiler.disable)

# Per-step products of at least this many multiply-adds run faster through oneDNN's linear than
# through addmm on the CPUs measured; below it, oneDNN's fixed cost per
# call (~12 us) dominates. From ONEDNN_PACK_MACS on, packing the weight once per call (~0.1-0.2
# ms) pays for itself within a few dozen steps.
ONEDNN_MIN_MACS = 1 << 21
ONEDNN_PACK_MACS = 1 << 23
# The backward prepares its per-step factors for chunks of steps of about this many bytes.
CHUNK_BYTES = 1 << 18

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
        self.onednn = None  # the weight as oneDNN's linear takes it, when that is faster here
        macs = rows * weight.shape[0] * weight.shape[1]
        if (
            weight.device.type == "cpu"
            and weight.dtype == torch.float32
            and macs >= ONEDNN_MIN_MACS
            and onednn_linear_available()
        ):
            self.onednn = weight.contiguous()
            if macs >= ONEDNN_PACK_MACS:
                self.onednn = torch.ops.mkldnn._reorder_linear_weight(self.onednn, rows)

    def __call__(self, v: Tensor, out: Tensor | None = None, sigmoid: bool = False) -> Tensor:
        """[σ](v W^T + b) for v (B, in): into ``out`` (B, out) if given, else a new tensor."""
        if self.onednn is not None:
            activation = "sigmoid" if sigmoid else "none"
            result = torch.ops.mkldnn._linear_pointwise(
                v, self.onednn, self.bias, activation, [], ""
            )
            return result if out is None else out.copy_(result)
        if self.bias is None:
            result = (
                torch.mm(v, self.weight_t) if out is None else torch.mm(v, self.weight_t, out=out)
            )
        elif out is None:
            result = torch.addmm(self.bias, v, self.weight_t)
        else:
            result = torch.addmm(self.bias, v, self.weight_t, out=out)
        return result.sigmoid_() if sigmoid else result

    def accumulate(self, v: Tensor, total: Tensor) -> Tensor:
        """total + v W^T (no bias): in place into ``total``, or a new tensor from oneDNN."""
        if self.onednn is not None:
            return torch.ops.mkldnn._linear_pointwise.binary(v, total, self.onednn, None, "add")
        return torch.addmm(total, v, self.weight_t, out=total)


def _rows_product(
    a: Tensor, b: Tensor, scale: float = 1.0, native: fused_chain.NativeCall | None = None
) -> Tensor:
    """scale · a^T b, summed over all R rows: a (R, m), b (R, n) -> (m, n); a weight gradient.

    By the C++ loops' product, which reads both in place, in a call that runs them; else
    through oneDNN when it runs here (about 1.6x MKL's rate at these shapes on the CPUs
    measured, but it transposes both operands first); else ``a.t() @ b``."""
    product = None if native is None else native.rows_product(a, b, scale)
    if product is not None:
        return product
    if a.device.type == "cpu" and a.dtype == torch.float32 and onednn_linear_available():
        a, b = a.contiguous(), b.contiguous()
        product = torch.ops.mkldnn._linear_pointwise(a.t(), b.t(), None, "none", [], "")
    else:
        product = a.t() @ b
    return product.mul_(scale) if scale != 1.0 else product


@dataclass(frozen=True)
class _Structure:
    """The static shape of one layer-direction: sizes, which stored map serves each round."""

    input_size: int
    hidden_size: int
    state_size: int
    map_of_round: tuple[int, ...]
    low_rank: tuple[bool, ...]
    map_bias: tuple[bool, ...]
    lstm_bias: bool
    projected: bool
    state_masked: bool = False

    @property
    def rounds(self) -> int:
        return len(self.map_of_round)

    def size(self, state: int) -> int:
        """Width of state u_s: x-states (odd s, s = -1 the input) are I wide, h-states P."""
        return self.input_size if state % 2 else self.state_size

    def doublings(self, state: int) -> int:
        """How many rounds have doubled state s (d_s in the module docstring)."""
        return max(0, (state + 1) // 2)

    def final_states(self) -> tuple[int, int]:
        """(x state, h state) that enter the gate product."""
        r = self.rounds
        return (r, r - 1) if r % 2 else (r - 1, r)


def _split(
    params: LayerParams, state_masked: bool = False
) -> tuple[_Structure, list[Tensor | None]]:
    """A layer's parameters as a structure and a flat list (w_ih, w_hh, b_ih, b_hh, each stored
    map's factors and bias, then w_hr), each stored map once even when it serves several
    rounds; ``state_masked``: the call's steps read a masked state."""
    structure = _Structure(
        input_size=params.w_ih.shape[1],
        hidden_size=params.cell_size,
        state_size=params.state_size,
        map_of_round=params.map_of_round,
        low_rank=tuple(m.low_rank for m in params.maps),
        map_bias=tuple(m.bias is not None for m in params.maps),
        lstm_bias=params.b_ih is not None,
        projected=params.w_hr is not None,
        state_masked=state_masked,
    )
    flat: list[Tensor | None] = [params.w_ih, params.w_hh, params.b_ih, params.b_hh]
    for m in params.maps:
        flat.extend([*m.factors, m.bias])
    return structure, [*flat, params.w_hr]


def _unflatten(
    structure: _Structure, flat: tuple
) -> tuple[tuple, list[tuple[tuple[Tensor, ...], Tensor | None]], Tensor | None]:
    """The inverse of :func:`_split`: (LSTM weights, stored maps, w_hr)."""
    lstm, rest = tuple(flat[:4]), list(flat[4:-1])
    maps = []
    for low_rank in structure.low_rank:
        count = 2 if low_rank else 1
        maps.append((tuple(rest[:count]), rest[count]))
        rest = rest[count + 1 :]
    return lstm, maps, flat[-1]


class _Round:
    """Round j's map: z = u_{j-1} (c·W)^T + b with c = 2^{d_{j-1}}, dense or low rank (W = A B,
    run as two thin products through an inner (B, k) value kept per step for the weight
    gradients). ``scaled`` holds (c·W,) or (A, c·B); the products of the forward and of the
    backward are prepared from it on first use (the C++ loops take ``scaled`` itself)."""

    def __init__(
        self, factors: tuple[Tensor, ...], bias: Tensor | None, scale: float, rows: int
    ) -> None:
        self.scale, self.bias, self.rows = scale, bias, rows
        self.factors = factors
        self.low_rank = len(factors) == 2

    @functools.cached_property
    def scaled(self) -> tuple[Tensor, ...]:
        """The factors with the scale on the map's input (the last factor); round 1's is 1."""
        factors, scale = self.factors, self.scale
        return (*factors[:-1], factors[-1] * scale if scale != 1 else factors[-1])

    @property
    def rank(self) -> int | None:
        return self.factors[0].shape[1] if self.low_rank else None

    @functools.cached_property
    def forward_products(self) -> list[_Linear]:
        """u -> u (c·W)^T + b, or u (c·B)^T then that A^T + b."""
        scaled, rows = self.scaled, self.rows
        if self.low_rank:
            return [_Linear(scaled[1], None, rows), _Linear(scaled[0], self.bias, rows)]
        return [_Linear(scaled[0], self.bias, rows)]

    @functools.cached_property
    def backward_products(self) -> list[_Linear]:
        """dz -> dz (c·W), or dz A then (dz A)(c·B)."""
        return [_Linear(f.t(), None, self.rows) for f in self.scaled]

    def forward(self, u: Tensor, inner: Tensor | None, out: Tensor) -> Tensor:
        """σ(z) (B, out) for the map input u (B, in), into ``out``; a low-rank map's inner
        value into ``inner``."""
        products = self.forward_products
        if self.low_rank:
            return products[1](products[0](u, inner), out=out, sigmoid=True)
        return products[0](u, out=out, sigmoid=True)

    def backward(self, dz: Tensor, du: Tensor, inner_grad: Tensor | None) -> Tensor:
        """du + dz (c·W): the gradient of the map's input with this round's part added."""
        products = self.backward_products
        if self.low_rank:
            return products[1].accumulate(products[0](dz, inner_grad), du)
        return products[0].accumulate(dz, du)

    def weight_grads(
        self,
        dz: Tensor,
        u: Tensor,
        inner: Tensor | None,
        inner_grad: Tensor | None,
        bias_grad: Tensor | None,
        native: fused_chain.NativeCall | None,
    ) -> list[Tensor | None]:
        """Gradients of (factors..., bias) from all R rows at once: dz (R, out), u (R, in); the
        bias's (dz summed over the rows) is given."""
        if self.low_rank:
            return [
                _rows_product(dz, inner, native=native),
                _rows_product(inner_grad, u, self.scale, native),
                bias_grad,
            ]
        return [_rows_product(dz, u, self.scale, native), bias_grad]


class _Weights:
    """One call's weights for the time loops, forward and backward (kept from the forward for
    the backward). ``native`` is set when the C++ loops run the call: they read the parameters
    as stored and fold the powers of two themselves. The Python loops use the folded copies,
    made on first use: gate weights with the final states' scales folded into their columns
    and the g rows doubled (tanh(g) = 2σ(2g) − 1), as one (4H, I+P) matrix for [x, h]."""

    def __init__(self, structure: _Structure, flat: tuple, rows: StepRows) -> None:
        s, big_h = structure, structure.hidden_size
        (self.w_ih, self.w_hh, self.b_ih, self.b_hh), maps, self.w_hr = _unflatten(s, flat)
        x_final, h_final = s.final_states()
        self.column_scales = (2.0 ** s.doublings(x_final), 2.0 ** s.doublings(h_final))
        self.g_rows = slice(2 * big_h, 3 * big_h)
        self.rows = rows.batch
        self.rounds = [
            _Round(*maps[m], 2.0 ** s.doublings(j - 1), self.rows)
            for j, m in enumerate(s.map_of_round, start=1)
        ]
        self.native = None
        if fused_chain.usable(rows.seq.data):
            self.native = fused_chain.NativeCall.prepare(
                [self.w_ih, self.w_hh, self.b_ih, self.b_hh,
                 *(t for r in self.rounds for t in (*r.factors, r.bias)), self.w_hr],
                [*self.column_scales, *(r.scale for r in self.rounds)],
                [len(r.factors) for r in self.rounds],
                rows.seq,
                rows.total,
            )  # fmt: skip

    @functools.cached_property
    def gate_weight(self) -> Tensor:
        weight = torch.cat(
            [self.w_ih * self.column_scales[0], self.w_hh * self.column_scales[1]], dim=1
        )
        weight[self.g_rows] *= 2
        return weight

    @functools.cached_property
    def gates(self) -> _Linear:
        """The gate product [x, h] -> pre-activations."""
        bias = None
        if self.b_ih is not None:
            bias = self.b_ih + self.b_hh
            bias[self.g_rows] *= 2
        return _Linear(self.gate_weight, bias, self.rows)

    @functools.cached_property
    def gates_backward(self) -> _Linear:
        """Its backward: d_pre -> d[x, h]."""
        return _Linear(self.gate_weight.t(), None, self.rows)

    @functools.cached_property
    def projection(self) -> _Linear:
        """h' = (σ(o) tanh(c')) w_hr^T, (B, H) -> (B, P)."""
        return _Linear(self.w_hr, None, self.rows)

    @functools.cached_property
    def projection_backward(self) -> _Linear:
        """Its backward: dh' (B, P) -> (B, H)."""
        return _Linear(self.w_hr.t(), None, self.rows)

    @property
    def ranks(self) -> list[int | None]:
        """Rank k of each round's map (None when dense)."""
        return [round_.rank for round_ in self.rounds]


@dataclass
class _Saved:
    """What the forward keeps for the backward, each over time as an (R, ·) buffer: step t's
    rows from :class:`StepRows` ``offsets[t]`` (under no_grad one (B, ·) block serves every step,
    and cells2 has two used in turn).

    states[s], the states u_s, s in 1..r-2, that are not gate inputs; inners[j-1], a low-rank
    round's u_{j-1} (c·B)^T (else None); xh, the gate input [x, h]; sig[j-1], σ(z_j);
    activations, [σ(i), σ(f), σ(2g), σ(o)] (R, 4H); tanh_g2 = 2 tanh(g); tanh_c; cells2, 2·c_0
    (B rows) then 2·c of every step (R rows); with a projection, unprojected, σ(o) tanh(c)
    (R, H) (else None); with a state mask, h_in, the masked state each step reads,
    mask ⊙ h_{t-1} (R, P) (else None)."""

    states: dict[int, Tensor]
    inners: list[Tensor | None]
    xh: Tensor
    sig: list[Tensor]
    activations: Tensor
    tanh_g2: Tensor
    tanh_c: Tensor
    cells2: Tensor
    unprojected: Tensor | None
    h_in: Tensor | None = None

    @classmethod
    def empty(
        cls, s: _Structure, ranks: list[int | None], rows: StepRows, like: Tensor, keep: bool
    ) -> _Saved:
        """Buffers for a call on ``rows``; every step kept, or one block for all."""
        kept, big_h = rows.total if keep else rows.batch, s.hidden_size

        def new(width: int, count: int = kept) -> Tensor:
            return like.new_empty(count, width)

        return cls(
            states={k: new(s.size(k)) for k in range(1, s.rounds - 1)},
            inners=[None if k is None else new(k) for k in ranks],
            xh=new(s.input_size + s.state_size),
            sig=[new(s.size(j)) for j in range(1, s.rounds + 1)],
            activations=new(4 * big_h),
            tanh_g2=new(big_h),
            tanh_c=new(big_h),
            cells2=new(big_h, rows.batch + (rows.total if keep else rows.batch)),
            unprojected=new(big_h) if s.projected else None,
            h_in=new(s.state_size) if s.state_masked else None,
        )

    def tensors(self) -> list[Tensor]:
        inners = [t for t in self.inners if t is not None]
        per_step = [*self.sig, self.activations, self.tanh_g2, self.tanh_c, self.cells2]
        extra = [t for t in (self.unprojected, self.h_in) if t is not None]
        return [*self.states.values(), *inners, self.xh, *per_step, *extra]

    @classmethod
    def from_tensors(
        cls, s: _Structure, ranks: list[int | None], tensors: tuple[Tensor, ...]
    ) -> _Saved:
        found = iter(tensors)
        states = {k: next(found) for k in range(1, s.rounds - 1)}
        inners = [None if k is None else next(found) for k in ranks]
        xh = next(found)
        sig = [next(found) for _ in range(s.rounds)]
        per_step = [next(found) for _ in range(4)]
        unprojected = next(found) if s.projected else None
        h_in = next(found) if s.state_masked else None
        return cls(states, inners, xh, sig, *per_step, unprojected, h_in)

    def state_over_time(
        self, s: _Structure, state: int, x: Tensor, h_prev: Tensor | None
    ) -> Tensor:
        """u_s for all steps, (R, size): x, h_{t-1}, a state buffer, or a gate-input half."""
        if state == -1 and state + 2 <= s.rounds:
            return x
        if state == 0 and state + 2 <= s.rounds:
            return h_prev
        if state in self.states:
            return self.states[state]
        return self.xh[..., : s.input_size] if state % 2 else self.xh[..., s.input_size :]


def _forward(
    structure: _Structure, rows: StepRows, state: State, weights: _Weights, keep: bool = True
) -> tuple[Tensor, Tensor, _Saved]:
    """Run the whole sequence ``rows.seq`` -> output (R, P), each sequence's last c (B, H),
    saved buffers.

    Without ``keep`` (inference) nothing is kept for a backward: each step reuses one set of
    state buffers, so memory does not grow with T beyond the output."""
    s, steps, batch, r = structure, rows.steps, rows.batch, structure.rounds
    big_i, big_h = s.input_size, s.hidden_size
    h0, c0 = state
    seq = rows.seq
    x = seq.data
    saved = _Saved.empty(s, weights.ranks, rows, x, keep)
    output = x.new_empty(rows.total, s.state_size)
    if weights.native is not None:
        c_last = x.new_empty(batch, big_h)
        weights.native.forward(seq, h0, c0, saved.tensors(), output, c_last, keep)
        return output, c_last, saved

    sizes = rows.sizes

    def per_step(buffer: Tensor) -> list[Tensor]:
        """A buffer's view for each step: its own rows, or a prefix of the one shared block."""
        return rows.per_step(buffer) if keep else [buffer[:n] for n in sizes]

    out = rows.per_step(output)
    x_final, h_final = s.final_states()
    x_half, h_half = per_step(saved.xh[..., :big_i]), per_step(saved.xh[..., big_i:])
    mask = seq.state_mask
    if h_final == 0 and mask is None:
        h_half[0].copy_(h0)
    states = {k: per_step(saved.state_over_time(s, k, None, None)) for k in range(1, r + 1)}
    states[-1] = seq.step_inputs()  # with no rounds, copied into the gate input each step
    states[0] = [h0, *(out[t - 1][:n] for t, n in enumerate(sizes) if t > 0)]
    if mask is not None:  # each step reads mask ⊙ h_{t-1}, written into h_in first
        previous, states[0] = states[0], per_step(saved.h_in)
    rounds = [
        (
            j,
            weights.rounds[j - 1],
            per_step(saved.sig[j - 1]),
            None if saved.inners[j - 1] is None else per_step(saved.inners[j - 1]),
        )
        for j in range(1, r + 1)
    ]
    xh, act_steps = per_step(saved.xh), per_step(saved.activations)
    g2_steps, tc_steps = per_step(saved.tanh_g2), per_step(saved.tanh_c)
    unprojected = out if saved.unprojected is None else per_step(saved.unprojected)
    cells_in = saved.cells2[:batch]
    cells = (
        [cells_in, *rows.per_step(saved.cells2[batch:])]
        if keep
        else [cells_in, saved.cells2[batch:]]
    )
    cells_in.copy_(c0).mul_(2)
    mul, gates = torch.mul, weights.gates
    for t, n in enumerate(sizes):
        if x_final == -1:
            x_half[t].copy_(states[-1][t])
        if mask is not None:
            mul(previous[t], mask[:n], out=states[0][t])
            if h_final == 0:
                h_half[t].copy_(states[0][t])
        for j, round_, sig_j, inner in rounds:
            sig = round_.forward(states[j - 1][t], None if inner is None else inner[t], sig_j[t])
            mul(sig, states[j - 2][t], out=states[j][t])
        act = gates(xh[t], out=act_steps[t])  # pre-activations, the g gate's doubled
        gate_i, gate_f, gate_g, gate_o = act.chunk(4, 1)
        g2 = mul(gate_g, 0.5, out=g2_steps[t]).tanh_().mul_(2)  # 2 tanh(g), before σ(2g)
        act.sigmoid_()
        cell_in, cell_out = (t, t + 1) if keep else (t % 2, (t + 1) % 2)
        cell2 = mul(gate_f, cells[cell_in][:n], out=cells[cell_out][:n]).addcmul_(gate_i, g2)
        tc = torch.mul(cell2, 0.5, out=tc_steps[t]).tanh_()  # tanh(c')
        mul(gate_o, tc, out=unprojected[t])
        if s.projected:
            weights.projection(unprojected[t], out=out[t])
        if h_final == 0 and t + 1 < steps and mask is None:
            h_half[t + 1].copy_(out[t][: sizes[t + 1]])
    if keep:
        last_cells = rows.at_last_step(saved.cells2[batch:])
    else:  # each sequence's last cell is in the block its last step wrote
        index = (rows.lengths % 2) * batch + torch.arange(batch)
        last_cells = saved.cells2.index_select(0, index.to(x.device))
    return output, last_cells / 2, saved


def _backward_chain(
    s: _Structure,
    weights: _Weights,
    rows: StepRows,
    x: Tensor,
    h_prev: Tensor | None,
    saved: _Saved,
    grad_output: Tensor,
    grad_h: Tensor,
    grad_c: Tensor,
    grad_x: Tensor,
    grad_z: list[Tensor],
    grad_inners: list[Tensor | None],
    grad_act: Tensor,
    grad_projected: Tensor | None,
) -> tuple[Tensor, Tensor]:
    """The backward time loop in Python: fills grad_x (R, I), grad_z[j-1] (R, ·), grad_inners,
    grad_act (R, 4, H) and, with a projection, grad_projected (R, P), the gradient of each
    step's projected h; returns the gradients of h0 and c0 (B, ·)."""
    steps, batch, r, sizes = rows.steps, rows.batch, s.rounds, rows.sizes
    big_i, big_h = s.input_size, s.hidden_size
    x_final, h_final = s.final_states()

    # What the chain needs that depends only on the forward is computed for a chunk of steps at
    # once (small enough to stay in cache and out of fresh pages), so each step runs few, small
    # operations:
    #   d(2c) += dh · through_tanh,                 through_tanh = σ(o)(1 − tanh²c)/2
    #   d_pre[i, f, g] = d(2c) · gate_factors,      d_pre[o] = dh · o_factor
    #   dz_j = du_j · round_factors_j,  du_{j-2} = du_j · σ(z_j)
    gated_states = [saved.state_over_time(s, j - 2, x, h_prev) for j in range(1, r + 1)]
    d_ifg, d_o = rows.per_step(grad_act[:, :3]), rows.per_step(grad_act[:, 3])
    d_pre = rows.per_step(grad_act.view(rows.total, -1))
    dz = [rows.per_step(t) for t in grad_z]
    dinners = [None if t is None else rows.per_step(t) for t in grad_inners]
    grad_x_steps, grad_out = rows.per_step(grad_x), rows.per_step(grad_output)
    grad_projected_steps = None if grad_projected is None else rows.per_step(grad_projected)
    mul, gates, mask = torch.mul, weights.gates_backward, rows.seq.state_mask
    chunk = max(1, CHUNK_BYTES // (batch * 4 * big_h * x.element_size()))
    dc2 = grad_c / 2  # the gradient of the doubled cell
    grad_h0 = grad_h
    for end in range(steps, 0, -chunk):
        begin = max(0, end - chunk)
        span = rows.span(begin, end)
        act = saved.activations[span].view(-1, 4, big_h)
        slope = torch.addcmul(act, act, act, value=-1)  # σ'(pre-activation) = σ(1 − σ)
        tanh_c = saved.tanh_c[span]
        through = torch.addcmul(act.new_tensor(0.5), tanh_c, tanh_c, value=-0.5).mul_(act[:, 3])
        # Step t's rows of the cell it started from: the first B_t of step t - 1's.
        cells_in = rows.previous(saved.cells2, span)
        gate_terms = [saved.tanh_g2[span], cells_in, act[:, 0] * 4, tanh_c]
        factors = torch.stack(gate_terms, dim=1).mul_(slope)
        lengths = sizes[begin:end]
        through, forget = through.split(lengths), act[:, 1].split(lengths)
        gate_factors, o_factor = factors[:, :3].split(lengths), factors[:, 3].split(lengths)
        rounds = []
        for j in range(r, 0, -1):
            sig = saved.sig[j - 1][span]
            factor = torch.addcmul(sig, sig, sig, value=-1).mul_(gated_states[j - 1][span])
            rounds.append(
                (
                    j,
                    weights.rounds[j - 1],
                    sig.split(lengths),
                    factor.split(lengths),
                    dz[j - 1],
                    dinners[j - 1],
                )
            )
        for t in range(end - 1, begin - 1, -1):
            k, n = t - begin, sizes[t]
            # dh: from the output, and from the next step for the sequences still running
            # there, else from h_n (their last step).
            n_next = sizes[t + 1] if t + 1 < steps else 0
            dh = grad_out[t].clone()
            dh[:n_next] += grad_h0[:n_next]
            dh[n_next:] += grad_h[n_next:n]
            if grad_projected_steps is not None:
                grad_projected_steps[t].copy_(dh)
                dh = weights.projection_backward(dh)
            dc2_t = dc2[:n]
            dc2_t.addcmul_(dh, through[k])
            mul(dc2_t.unsqueeze(1), gate_factors[k], out=d_ifg[t])
            mul(dh, o_factor[k], out=d_o[t])
            dc2_t.mul_(forget[k])
            grad_xh = gates(d_pre[t])
            grad_state = {x_final: grad_xh[:, :big_i], h_final: grad_xh[:, big_i:]}
            for j, round_, sig_j, factor_j, dz_j, dinner in rounds:
                du = grad_state.pop(j)
                mul(du, factor_j[k], out=dz_j[t])
                if j == 1:
                    mul(du, sig_j[k], out=grad_x_steps[t])
                else:
                    grad_state[j - 2] = mul(du, sig_j[k])
                inner_grad = None if dinner is None else dinner[t]
                grad_state[j - 1] = round_.backward(dz_j[t], grad_state[j - 1], inner_grad)
            if x_final == -1:
                grad_x_steps[t].copy_(grad_state[-1])
            grad_h0 = grad_state[0] if mask is None else grad_state[0] * mask[:n]
    return grad_h0.clone(), dc2 * 2


def _backward(
    structure: _Structure,
    weights: _Weights,
    rows: StepRows,
    seq: Sequence,
    h0: Tensor,
    output: Tensor,
    saved: _Saved,
    grad_output: Tensor,
    grad_h: Tensor,
    grad_c: Tensor,
) -> tuple[Tensor, Tensor, Tensor, list[Tensor | None]]:
    """Gradients of the input, h0, c0 and of the flat weights, from those of output (R, P),
    h_n and c_n; the input's in its own layout."""
    s, total, r = structure, rows.total, structure.rounds
    big_i = s.input_size
    grad_x = seq.data.new_empty(total, big_i)
    # The gradients of the gates' pre-activations and of each round's, side by side in one
    # buffer, so that every bias gradient comes from one sum over the rows; with a projection,
    # the projected h's gradient (for w_hr's) after them.
    widths = [4 * s.hidden_size, *(s.size(j) for j in range(1, r + 1))]
    extra = [s.state_size] if s.projected else []
    pre_grads = seq.data.new_empty(total, sum(widths + extra))
    grad_act, *grad_z = pre_grads.split(widths + extra, dim=-1)
    grad_projected = grad_z.pop() if s.projected else None
    grad_act = grad_act.unflatten(-1, (4, s.hidden_size))
    grad_inners = [None if t is None else torch.empty_like(t) for t in saved.inners]
    x = rows.all_rows(seq.data)
    h_prev = saved.h_in  # h_{t-1} as the steps read it: masked, or the previous output
    if r >= 2 and h_prev is None:
        h_prev = rows.previous(torch.cat([h0, output]), slice(0, total))
    if weights.native is not None:
        grad_h0, grad_c0 = torch.empty_like(h0), h0.new_empty(rows.batch, s.hidden_size)
        weights.native.backward(
            (grad_output, grad_h, grad_c), seq, h0, output, saved.tensors(),
            grad_x, grad_h0, grad_c0, pre_grads, grad_inners,
        )  # fmt: skip
    else:
        grad_h0, grad_c0 = _backward_chain(
            s, weights, rows, x, h_prev, saved, grad_output, grad_h, grad_c,
            grad_x, grad_z, grad_inners, grad_act, grad_projected,
        )  # fmt: skip

    # Weight gradients: one product each over all R rows.
    bias_grads = [None] * (r + 1)
    if s.lstm_bias or any(s.map_bias):
        bias_grads = pre_grads[:, : sum(widths)].sum(0).split(widths)
    dp = grad_act.view(total, -1)
    d_gate_weight = _rows_product(dp, saved.xh, native=weights.native)
    d_gate_weight[weights.g_rows] *= 2
    d_w_ih = d_gate_weight[:, :big_i] * weights.column_scales[0]
    d_w_hh = d_gate_weight[:, big_i:] * weights.column_scales[1]
    d_bias = None
    if s.lstm_bias:
        d_bias = bias_grads[0]
        d_bias[weights.g_rows] *= 2
    map_grads: list[list[Tensor] | None] = [None] * len(s.low_rank)
    for j, m in enumerate(s.map_of_round, start=1):
        u_all = saved.state_over_time(s, j - 1, x, h_prev)
        grads = weights.rounds[j - 1].weight_grads(
            grad_z[j - 1], u_all, saved.inners[j - 1], grad_inners[j - 1], bias_grads[j],
            weights.native,
        )  # fmt: skip
        previous = map_grads[m]
        map_grads[m] = (
            grads
            if previous is None
            else [None if a is None else a + b for a, b in zip(previous, grads, strict=True)]
        )
    flat_grads: list[Tensor | None] = [
        d_w_ih,
        d_w_hh,
        d_bias,
        None if d_bias is None else d_bias.clone(),
    ]
    for grads, has_bias in zip(map_grads, s.map_bias, strict=True):
        flat_grads.extend(grads if has_bias else [*grads[:-1], None])
    d_w_hr = None
    if s.projected:
        d_w_hr = _rows_product(grad_projected, saved.unprojected, native=weights.native)
    return rows.laid_out(grad_x), grad_h0, grad_c0, [*flat_grads, d_w_hr]


class _FusedSequence(torch.autograd.Function):
    @staticmethod
    def forward(ctx, structure: _Structure, rows: StepRows, x: Tensor, h0: Tensor, c0: Tensor,
                *flat: Tensor | None):  # fmt: skip
        weights = _Weights(structure, flat, rows)
        output, c_last, saved = _forward(structure, rows, State(h0, c0), weights)
        ctx.structure, ctx.rows, ctx.weights = structure, rows, weights
        # The parameters are saved only so that autograd refuses a backward after they were
        # changed in place (the folded copies in ctx.weights would hide that).
        params = [t for t in flat if t is not None]
        ctx.save_for_backward(x, h0, output, *params, *saved.tensors())
        ctx.param_count = len(params)
        return rows.laid_out(output), rows.at_last_step(output), c_last

    @staticmethod
    @compile_disabled
    def backward(ctx, grad_output: Tensor, grad_h: Tensor, grad_c: Tensor):
        refuse_double_backward("fused")
        structure, rows, weights = ctx.structure, ctx.rows, ctx.weights
        x, h0, output, *rest = ctx.saved_tensors
        saved = _Saved.from_tensors(structure, weights.ranks, tuple(rest[ctx.param_count :]))
        grad_output = rows.all_rows(grad_output.contiguous())
        grad_x, grad_h0, grad_c0, grads = _backward(
            structure, weights, rows, rows.seq._replace(data=x), h0, output, saved,
            grad_output, grad_h, grad_c,
        )  # fmt: skip
        return None, None, grad_x, grad_h0, grad_c0, *grads


# torch.compile leaves the call to its own code (C++ ops, hand-written backward): compiled
# models graph-break around it, and it runs as in eager.
@compile_disabled
def run_fused(seq: Sequence, state: State, params: LayerParams) -> tuple[Tensor, State]:
    """One layer, one direction (see :mod:`mogrifier_fast.backends` for the contract)."""
    structure, flat = _split(params, seq.state_mask is not None)
    # Rows may be strided (batch_first), elements not (the C++ loops read whole rows).
    x = seq.data if seq.data.stride(-1) == 1 else seq.data.contiguous()
    h0, c0 = state.h.contiguous(), state.c.contiguous()
    mask = None if seq.state_mask is None else seq.state_mask.detach().contiguous()
    rows = StepRows(Sequence(x, seq.batch_sizes, mask))
    if needs_backward(x, h0, c0, *flat):
        output, h, c = _FusedSequence.apply(structure, rows, x, h0, c0, *flat)
        return output, State(h, c)
    with torch.no_grad():
        weights = _Weights(structure, tuple(flat), rows)
        output, c_last, _ = _forward(structure, rows, State(h0, c0), weights, keep=False)
        return rows.laid_out(output), State(rows.at_last_step(output), c_last)


BACKEND = Backend(name="fused", run=run_fused)
