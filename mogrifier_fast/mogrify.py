"""The Mogrifier LSTM's math, once, in plain torch: the executable specification.

Mogrification, rounds j = 1..r, starting from the input x and the previous hidden state h::

    odd j:   x = 2 * sigmoid(W_j h + b_j) * x      W_j: (input_size, hidden_size)
    even j:  h = 2 * sigmoid(W_j x + b_j) * h      W_j: (hidden_size, input_size)

then one ordinary LSTM step (gate order i, f, g, o as in ``nn.LSTM``) on the mogrified (x, h)
with the previous cell state c. The new hidden state, not the mogrified h, is carried on.
``W_j`` may be low rank, ``W_j = A_j @ B_j``. With no rounds this is exactly an LSTM step.

The functions take plain tensors and lists, so the same definitions run in Python (backend
"reference"), under ``torch.jit.script`` (backend "script") and ``torch.compile`` (backend
"compile"); :class:`LayerParams` packs a layer's parameters into those arguments.
"""

from __future__ import annotations

from typing import List, NamedTuple, Optional, Tuple  # TorchScript reads these annotations

import torch
import torch.nn.functional as F
from torch import Tensor


def apply_map(v: Tensor, factors: List[Tensor], bias: Optional[Tensor]) -> Tensor:
    """v (B, in) -> v W^T + bias (B, out), W = factors[0] (out, in), or factors[0] (out, k) @
    factors[1] (k, in) applied as two thin products."""
    if len(factors) == 2:
        return F.linear(F.linear(v, factors[1]), factors[0], bias)
    return F.linear(v, factors[0], bias)


def mogrify(
    x: Tensor,
    h: Tensor,
    factors: List[List[Tensor]],
    biases: List[Optional[Tensor]],
) -> Tuple[Tensor, Tensor]:
    """Run the mogrifier rounds, one (factors, bias) per round. x: (B, I), h: (B, H) -> the
    mogrified (x, h), same shapes."""
    for j in range(len(factors)):
        if j % 2 == 0:  # rounds 1, 3, ...: update x from h
            x = 2 * torch.sigmoid(apply_map(h, factors[j], biases[j])) * x
        else:  # rounds 2, 4, ...: update h from x
            h = 2 * torch.sigmoid(apply_map(x, factors[j], biases[j])) * h
    return x, h


def lstm_step(
    x: Tensor,
    h: Tensor,
    c: Tensor,
    w_ih: Tensor,
    w_hh: Tensor,
    b_ih: Optional[Tensor],
    b_hh: Optional[Tensor],
) -> Tuple[Tensor, Tensor]:
    """One LSTM step, ``nn.LSTM``'s gate order (i, f, g, o). x: (B, I), h, c: (B, H) -> (h', c')."""
    gates = F.linear(x, w_ih, b_ih) + F.linear(h, w_hh, b_hh)
    i, f, g, o = gates.chunk(4, dim=-1)
    c_next = torch.sigmoid(f) * c + torch.sigmoid(i) * torch.tanh(g)
    h_next = torch.sigmoid(o) * torch.tanh(c_next)
    return h_next, c_next


def mogrifier_lstm_step(
    x: Tensor,
    h: Tensor,
    c: Tensor,
    w_ih: Tensor,
    w_hh: Tensor,
    b_ih: Optional[Tensor],
    b_hh: Optional[Tensor],
    factors: List[List[Tensor]],
    biases: List[Optional[Tensor]],
) -> Tuple[Tensor, Tensor]:
    """One Mogrifier LSTM step. x: (B, I), h, c: (B, H) -> (h', c'), each (B, H)."""
    x, h = mogrify(x, h, factors, biases)
    return lstm_step(x, h, c, w_ih, w_hh, b_ih, b_hh)


def mogrifier_lstm_sequence(
    x: Tensor,
    h: Tensor,
    c: Tensor,
    w_ih: Tensor,
    w_hh: Tensor,
    b_ih: Optional[Tensor],
    b_hh: Optional[Tensor],
    factors: List[List[Tensor]],
    biases: List[Optional[Tensor]],
) -> Tuple[Tensor, Tensor, Tensor]:
    """The step looped over time. x: (T, B, I), h, c: (B, H) -> output (T, B, H), h_T, c_T."""
    outputs: List[Tensor] = []
    for x_t in x.unbind(0):
        h, c = mogrifier_lstm_step(x_t, h, c, w_ih, w_hh, b_ih, b_hh, factors, biases)
        outputs.append(h)
    return torch.stack(outputs), h, c


class RoundMap(NamedTuple):
    """One mogrifier round's map.

    ``factors`` is ``(weight,)`` with weight (out, in), or ``(a, b)`` with a (out, k) and
    b (k, in) for a low-rank map; ``bias`` is (out,) or None.
    """

    factors: tuple[Tensor, ...]
    bias: Tensor | None

    @property
    def low_rank(self) -> bool:
        return len(self.factors) == 2

    def weight(self) -> Tensor:
        """The effective dense weight (out, in), differentiable in the factors."""
        return self.factors[0] @ self.factors[1] if self.low_rank else self.factors[0]


class LayerParams(NamedTuple):
    """The parameters of one direction of one layer, as every backend receives them.

    w_ih: (4H, I), w_hh: (4H, H), b_ih and b_hh: (4H,) or None; ``maps`` holds one
    :class:`RoundMap` per round, in order (a shared map appears once per round it serves).
    """

    w_ih: Tensor
    w_hh: Tensor
    b_ih: Tensor | None
    b_hh: Tensor | None
    maps: tuple[RoundMap, ...]

    @property
    def rounds(self) -> int:
        return len(self.maps)

    def step_args(self) -> tuple:
        """The trailing arguments of :func:`mogrifier_lstm_step` and
        :func:`mogrifier_lstm_sequence`: (w_ih, w_hh, b_ih, b_hh, factors, biases)."""
        factors = [list(m.factors) for m in self.maps]
        return self.w_ih, self.w_hh, self.b_ih, self.b_hh, factors, [m.bias for m in self.maps]
