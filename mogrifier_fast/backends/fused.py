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
* **tanh as a scaled sigmoid.** The g-gate rows of the gate weights are doubled, so one sigmoid
  serves all four gates: tanh(g) = 2σ(2g) − 1.
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
from mogrifier_fast.mogrify import LayerParams

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
    and the g rows doubled (tanh(g) = 2σ(2g) − 1), as one (4H, I+H) matrix for [x, h]."""

    def __init__(self, structure: _Structure, flat: tuple, x: Tensor) -> None:
        s, big_h = structure, structure.hidden_size
        (self.w_ih, self.w_hh, self.b_ih, self.b_hh), maps = _unflatten(s, flat)
        x_final, h_final = s.final_states()
        self.column_scales = (2.0 ** s.doublings(x_final), 2.0 ** s.doublings(h_final))
        self.g_rows = slice(2 * big_h, 3 * big_h)
        self.rows = x.shape[1]
        self.rounds = [
            _Round(*maps[m], 2.0 ** s.doublings(j - 1), self.rows)
            for j, m in enumerate(s.map_of_round, start=1)
        ]
        self.native = None
        if fused_chain.usable(x):
            self.native = fused_chain.NativeCall.prepare(
                [self.w_ih, self.w_hh, self.b_ih, self.b_hh,
                 *(t for r in self.rounds for t in (*r.factors, r.bias))],
                [*self.column_scales, *(r.scale for r in self.rounds)],
                [len(r.factors) for r in self.rounds],
                x.shape,
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

    @property
    def ranks(self) -> list[int | None]:
        """Rank k of each round's map (None when dense)."""
        return [round_.rank for round_ in self.rounds]


@dataclass
class _Saved:
    """What the forward keeps for the backward, each over time as a (T, B, ·) buffer (under
    no_grad one block serves every step, and cells2 has two blocks used in turn).

    states[s], the states u_s, s in 1..r-2, that are not gate inputs; inners[j-1], a low-rank
    round's u_{j-1} (c·B)^T (else None); xh, the gate input [x, h]; sig[j-1], σ(z_j);
    activations, [σ(i), σ(f), σ(2g), σ(o)] (T, B, 4H); tanh_g2 = 2 tanh(g); tanh_c; and cells2,
    2·c_0 .. 2·c_T (T + 1 blocks): the cell is carried doubled, so tanh(c) = 2σ(2c) − 1 costs
    one sigmoid, much cheaper than tanh on CPU."""

    states: dict[int, Tensor]
    inners: list[Tensor | None]
    xh: Tensor
    sig: list[Tensor]
    activations: Tensor
    tanh_g2: Tensor
    tanh_c: Tensor
    cells2: Tensor

    @classmethod
    def empty(cls, s: _Structure, ranks: list[int | None], x: Tensor, keep: bool) -> _Saved:
        """Buffers for a call on x (T, B, I); T steps kept, or one block for all."""
        kept, rows, big_h = x.shape[0] if keep else 1, x.shape[1], s.hidden_size
        new = x.new_empty
        return cls(
            states={k: new(kept, rows, s.size(k)) for k in range(1, s.rounds - 1)},
            inners=[None if k is None else new(kept, rows, k) for k in ranks],
            xh=new(kept, rows, s.input_size + big_h),
            sig=[new(kept, rows, s.size(j)) for j in range(1, s.rounds + 1)],
            activations=new(kept, rows, 4 * big_h),
            tanh_g2=new(kept, rows, big_h),
            tanh_c=new(kept, rows, big_h),
            cells2=new(kept + 1, rows, big_h),
        )

    def tensors(self) -> list[Tensor]:
        inners = [t for t in self.inners if t is not None]
        per_step = [*self.sig, self.activations, self.tanh_g2, self.tanh_c, self.cells2]
        return [*self.states.values(), *inners, self.xh, *per_step]

    @classmethod
    def from_tensors(
        cls, s: _Structure, ranks: list[int | None], tensors: tuple[Tensor, ...]
    ) -> _Saved:
        found = iter(tensors)
        states = {k: next(found) for k in range(1, s.rounds - 1)}
        inners = [None if k is None else next(found) for k in ranks]
        xh = next(found)
        sig = [next(found) for _ in range(s.rounds)]
        return cls(states, inners, xh, sig, *found)

    def state_over_time(
        self, s: _Structure, state: int, x: Tensor, h_prev: Tensor | None
    ) -> Tensor:
        """u_s for all steps, (T, B, size): x, h_{t-1}, a state buffer, or a gate-input half."""
        if state == -1 and state + 2 <= s.rounds:
            return x
        if state == 0 and state + 2 <= s.rounds:
            return h_prev
        if state in self.states:
            return self.states[state]
        return self.xh[..., : s.input_size] if state % 2 else self.xh[..., s.input_size :]


def _forward(
    structure: _Structure, x: Tensor, h0: Tensor, c0: Tensor, weights: _Weights, keep: bool = True
) -> tuple[Tensor, Tensor, _Saved]:
    """Run the whole sequence. x: (T, B, I), h0, c0: (B, H) -> output (T, B, H), c_T, saved.

    Without ``keep`` (inference) nothing is kept for a backward: each step reuses one set of
    state buffers, so memory does not grow with T beyond the output."""
    s, steps, rows, r = structure, x.shape[0], x.shape[1], structure.rounds
    big_i, big_h = s.input_size, s.hidden_size
    saved = _Saved.empty(s, weights.ranks, x, keep)
    output = x.new_empty(steps, rows, big_h)
    if weights.native is not None:
        c_last = x.new_empty(rows, big_h)
        weights.native.forward(x, h0, c0, saved.tensors(), output, c_last, keep)
        return output, c_last, saved

    def per_step(buffer: Tensor) -> list[Tensor]:
        """A buffer's view for each step: its own row block, or the one shared block."""
        return list(buffer.unbind(0)) if keep else [buffer[0]] * steps

    out = output.unbind(0)
    x_final, h_final = s.final_states()
    x_half, h_half = per_step(saved.xh[..., :big_i]), per_step(saved.xh[..., big_i:])
    if h_final == 0:
        h_half[0].copy_(h0)
    state = {k: per_step(saved.state_over_time(s, k, x, None)) for k in range(1, r + 1)}
    state[-1] = list(x.unbind(0))  # with no rounds, copied into the gate input each step
    state[0] = [h0, *out[:-1]]
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
    cells = saved.cells2.unbind(0)
    cells[0].copy_(c0).mul_(2)
    mul, gates = torch.mul, weights.gates
    for t in range(steps):
        if x_final == -1:
            x_half[t].copy_(state[-1][t])
        for j, round_, sig_j, inner in rounds:
            sig = round_.forward(state[j - 1][t], None if inner is None else inner[t], sig_j[t])
            mul(sig, state[j - 2][t], out=state[j][t])
        act = gates(xh[t], out=act_steps[t], sigmoid=True)
        gate_i, gate_f, gate_g, gate_o = act.chunk(4, 1)
        g2 = mul(gate_g, 4, out=g2_steps[t]).sub_(2)  # 2 tanh(g) = 4σ(2g) − 2
        cell_in, cell_out = (t, t + 1) if keep else (t % 2, (t + 1) % 2)
        cell2 = mul(gate_f, cells[cell_in], out=cells[cell_out]).addcmul_(gate_i, g2)  # 2 c'
        tc = torch.sigmoid(cell2, out=tc_steps[t]).mul_(2).sub_(1)  # tanh(c') = 2σ(2c') − 1
        mul(gate_o, tc, out=out[t])
        if h_final == 0 and t + 1 < steps:
            h_half[t + 1].copy_(out[t])
    return output, cells[steps if keep else steps % 2] / 2, saved


def _backward_chain(
    s: _Structure,
    weights: _Weights,
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
) -> tuple[Tensor, Tensor]:
    """The backward time loop in Python: fills grad_x (T, B, I), grad_z[j-1] (T, B, ·),
    grad_inners and grad_act (T, B, 4, H); returns the gradients of h0 and c0 (B, H)."""
    steps, rows, r = grad_output.shape[0], grad_output.shape[1], s.rounds
    big_i, big_h = s.input_size, s.hidden_size
    x_final, h_final = s.final_states()

    # What the chain needs that depends only on the forward is computed for a chunk of steps at
    # once (small enough to stay in cache and out of fresh pages), so each step runs few, small
    # operations:
    #   d(2c) += dh · through_tanh,                 through_tanh = σ(o)(1 − tanh²c)/2
    #   d_pre[i, f, g] = d(2c) · gate_factors,      d_pre[o] = dh · o_factor
    #   dz_j = du_j · round_factors_j,  du_{j-2} = du_j · σ(z_j)
    gated_states = [saved.state_over_time(s, j - 2, x, h_prev) for j in range(1, r + 1)]
    d_ifg, d_o = grad_act[:, :, :3].unbind(0), grad_act[:, :, 3].unbind(0)
    d_pre = grad_act.view(steps, rows, -1).unbind(0)
    dz = [t.unbind(0) for t in grad_z]
    dinners = [None if t is None else t.unbind(0) for t in grad_inners]
    grad_x_steps = grad_x.unbind(0)
    mul, gates = torch.mul, weights.gates_backward
    chunk = max(1, CHUNK_BYTES // (rows * 4 * big_h * x.element_size()))
    dh = grad_output[-1] + grad_h
    dc2 = grad_c / 2  # the gradient of the doubled cell
    for end in range(steps, 0, -chunk):
        begin = max(0, end - chunk)
        span = slice(begin, end)
        act = saved.activations[span].view(-1, rows, 4, big_h)
        slope = torch.addcmul(act, act, act, value=-1)  # σ'(pre-activation) = σ(1 − σ)
        tanh_c = saved.tanh_c[span]
        through = torch.addcmul(act.new_tensor(0.5), tanh_c, tanh_c, value=-0.5).mul_(act[:, :, 3])
        gate_terms = [
            saved.tanh_g2[span],
            saved.cells2[span],
            act[:, :, 0] * 4,
            tanh_c,
        ]
        factors = torch.stack(gate_terms, dim=2).mul_(slope)
        through, gate_factors, o_factor = (
            through.unbind(0),
            factors[:, :, :3].unbind(0),
            factors[:, :, 3].unbind(0),
        )
        forget = act[:, :, 1].unbind(0)
        rounds = []
        for j in range(r, 0, -1):
            sig = saved.sig[j - 1][span]
            factor = torch.addcmul(sig, sig, sig, value=-1).mul_(gated_states[j - 1][span])
            rounds.append(
                (
                    j,
                    weights.rounds[j - 1],
                    sig.unbind(0),
                    factor.unbind(0),
                    dz[j - 1],
                    dinners[j - 1],
                )
            )
        for t in range(end - 1, begin - 1, -1):
            k = t - begin
            dc2.addcmul_(dh, through[k])
            mul(dc2.unsqueeze(1), gate_factors[k], out=d_ifg[t])
            mul(dh, o_factor[k], out=d_o[t])
            dc2.mul_(forget[k])
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
            if t > 0:
                torch.add(grad_output[t - 1], grad_state[0], out=dh)
    return grad_state[0].clone(), dc2 * 2


def _backward(
    structure: _Structure,
    weights: _Weights,
    x: Tensor,
    h0: Tensor,
    output: Tensor,
    saved: _Saved,
    grad_output: Tensor,
    grad_h: Tensor,
    grad_c: Tensor,
) -> tuple[Tensor, Tensor, Tensor, list[Tensor | None]]:
    """Gradients of x, h0, c0 and of the flat weights, from those of output, h_T and c_T."""
    s, steps, rows, r = structure, grad_output.shape[0], grad_output.shape[1], structure.rounds
    big_i, big_h = s.input_size, s.hidden_size
    grad_x = torch.empty_like(x)
    # The gradients of the gates' pre-activations and of each round's, side by side in one
    # buffer, so that every bias gradient comes from one sum over the rows.
    widths = [4 * big_h, *(s.size(j) for j in range(1, r + 1))]
    pre_grads = x.new_empty(steps, rows, sum(widths))
    grad_act, *grad_z = pre_grads.split(widths, dim=-1)
    grad_act = grad_act.unflatten(-1, (4, big_h))
    grad_inners = [None if t is None else torch.empty_like(t) for t in saved.inners]
    h_prev = torch.cat([h0[None], output[:-1]]) if r >= 2 else None
    if weights.native is not None:
        grad_h0, grad_c0 = torch.empty_like(h0), torch.empty_like(h0)
        weights.native.backward(
            (grad_output, grad_h, grad_c), x, h0, output, saved.tensors(),
            grad_x, grad_h0, grad_c0, pre_grads, grad_inners,
        )  # fmt: skip
    else:
        grad_h0, grad_c0 = _backward_chain(
            s, weights, x, h_prev, saved, grad_output, grad_h, grad_c,
            grad_x, grad_z, grad_inners, grad_act,
        )  # fmt: skip

    # Weight gradients: one product each over all T·B rows.
    total = steps * rows
    bias_grads = [None] * (r + 1)
    if s.lstm_bias or any(s.map_bias):
        bias_grads = pre_grads.view(total, -1).sum(0).split(widths)
    dp = grad_act.view(total, -1)
    d_gate_weight = _rows_product(dp, saved.xh.view(total, -1), native=weights.native)
    d_gate_weight[weights.g_rows] *= 2
    d_w_ih = d_gate_weight[:, :big_i] * weights.column_scales[0]
    d_w_hh = d_gate_weight[:, big_i:] * weights.column_scales[1]
    d_bias = None
    if s.lstm_bias:
        d_bias = bias_grads[0]
        d_bias[weights.g_rows] *= 2
    map_grads: list[list[Tensor] | None] = [None] * len(s.low_rank)
    for j, m in enumerate(s.map_of_round, start=1):
        u_all = saved.state_over_time(s, j - 1, x, h_prev).reshape(total, -1)
        inner, dinner = saved.inners[j - 1], grad_inners[j - 1]
        if inner is not None:
            inner, dinner = inner.view(total, -1), dinner.view(total, -1)
        grads = weights.rounds[j - 1].weight_grads(
            grad_z[j - 1].reshape(total, -1), u_all, inner, dinner, bias_grads[j], weights.native
        )
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
    return grad_x, grad_h0, grad_c0, flat_grads


class _FusedSequence(torch.autograd.Function):
    @staticmethod
    def forward(
        ctx, structure: _Structure, x: Tensor, h0: Tensor, c0: Tensor, *flat: Tensor | None
    ):
        weights = _Weights(structure, flat, x)
        output, c_last, saved = _forward(structure, x, h0, c0, weights)
        ctx.structure, ctx.weights = structure, weights
        # The parameters are saved only so that autograd refuses a backward after they were
        # changed in place (the folded copies in ctx.weights would hide that).
        params = [t for t in flat if t is not None]
        ctx.save_for_backward(x, h0, output, *params, *saved.tensors())
        ctx.param_count = len(params)
        return output, output[-1].clone(), c_last

    @staticmethod
    def backward(ctx, grad_output: Tensor, grad_h: Tensor, grad_c: Tensor):
        refuse_double_backward("fused")
        structure, weights = ctx.structure, ctx.weights
        x, h0, output, *rest = ctx.saved_tensors
        saved = _Saved.from_tensors(structure, weights.ranks, tuple(rest[ctx.param_count :]))
        grad_x, grad_h0, grad_c0, grads = _backward(
            structure, weights, x, h0, output, saved, grad_output.contiguous(), grad_h, grad_c
        )
        return None, grad_x, grad_h0, grad_c0, *grads


def run_fused(
    x: Tensor, h0: Tensor, c0: Tensor, params: LayerParams
) -> tuple[Tensor, Tensor, Tensor]:
    """One layer, one direction. x: (T, B, I), h0, c0: (B, H) -> output (T, B, H), h_T, c_T."""
    structure, flat = _split(params)
    # Rows may be strided (batch_first), elements not (the C++ loops read whole rows).
    x = x if x.stride(-1) == 1 else x.contiguous()
    h0, c0 = h0.contiguous(), c0.contiguous()
    if needs_backward(x, h0, c0, *flat):
        return _FusedSequence.apply(structure, x, h0, c0, *flat)
    with torch.no_grad():
        weights = _Weights(structure, tuple(flat), x)
        output, c_last, _ = _forward(structure, x, h0, c0, weights, keep=False)
        return output, output[-1].clone(), c_last


BACKEND = Backend(name="fused", run=run_fused)
