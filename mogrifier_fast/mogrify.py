"""The Mogrifier LSTM's math, once, in plain torch: the executable specification.

Mogrification, rounds j = 1..r, starting from the input x and the previous hidden state h::

    odd j:   x = 2 * sigmoid(W_j h + b_j) * x      W_j: (input_size, hidden_size)
    even j:  h = 2 * sigmoid(W_j x + b_j) * h      W_j: (hidden_size, input_size)

then one ordinary LSTM step (gate order i, f, g, o as in ``nn.LSTM``) on the mogrified (x, h)
with the previous cell state c. The new hidden state, not the mogrified h, is carried on.
``W_j`` may be low rank, ``W_j = A_j @ B_j``. With no rounds this is exactly an LSTM step.

Every backend computes these functions; the reference backend is a Python loop over them.
"""

from __future__ import annotations

from typing import NamedTuple

import torch
import torch.nn.functional as F
from torch import Tensor


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

    def __call__(self, v: Tensor) -> Tensor:
        """Apply the map: v (B, in) -> v W^T + bias (B, out); low rank as two thin products."""
        if self.low_rank:
            a, b = self.factors
            return F.linear(F.linear(v, b), a, self.bias)
        return F.linear(v, self.factors[0], self.bias)


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


def mogrify(x: Tensor, h: Tensor, maps: tuple[RoundMap, ...]) -> tuple[Tensor, Tensor]:
    """Run the mogrifier rounds. x: (B, I), h: (B, H) -> mogrified (x, h), same shapes."""
    for j, round_map in enumerate(maps, start=1):
        if j % 2:
            x = 2 * torch.sigmoid(round_map(h)) * x
        else:
            h = 2 * torch.sigmoid(round_map(x)) * h
    return x, h


def lstm_step(
    x: Tensor,
    h: Tensor,
    c: Tensor,
    w_ih: Tensor,
    w_hh: Tensor,
    b_ih: Tensor | None,
    b_hh: Tensor | None,
) -> tuple[Tensor, Tensor]:
    """One LSTM step, ``nn.LSTM``'s gate order (i, f, g, o). x: (B, I), h, c: (B, H) -> (h', c')."""
    gates = F.linear(x, w_ih, b_ih) + F.linear(h, w_hh, b_hh)
    i, f, g, o = gates.chunk(4, dim=-1)
    c_next = torch.sigmoid(f) * c + torch.sigmoid(i) * torch.tanh(g)
    h_next = torch.sigmoid(o) * torch.tanh(c_next)
    return h_next, c_next


def mogrifier_lstm_step(
    x: Tensor, h: Tensor, c: Tensor, params: LayerParams
) -> tuple[Tensor, Tensor]:
    """One Mogrifier LSTM step. x: (B, I), h, c: (B, H) -> (h', c'), each (B, H)."""
    x, h = mogrify(x, h, params.maps)
    return lstm_step(x, h, c, params.w_ih, params.w_hh, params.b_ih, params.b_hh)
