"""The Mogrifier LSTM's math, once, in plain torch: the executable specification.

Mogrification, rounds j = 1..r, starting from the input x and the previous hidden state h::

    odd j:   x = 2 * sigmoid(W_j h + b_j) * x      W_j: (input_size, hidden_size)
    even j:  h = 2 * sigmoid(W_j x + b_j) * h      W_j: (hidden_size, input_size)

then one ordinary LSTM step (gate order i, f, g, o as in ``nn.LSTM``) on the mogrified (x, h)
with the previous cell state c. The new hidden state, not the mogrified h, is carried on.
``W_j`` may be low rank, ``W_j = A_j @ B_j``. With no rounds this is exactly an LSTM step.

The functions take plain tensors and lists, so the same definitions run in Python (backend
"reference"), under ``torch.jit.script`` (backend "script") and ``torch.compile`` (backend
"compile"). What every backend receives is defined here too: :class:`Sequence` (padded or
packed input), :class:`State` and :class:`LayerParams`.
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
    w_hr: Optional[Tensor] = None,
) -> Tuple[Tensor, Tensor]:
    """One LSTM step, ``nn.LSTM``'s gate order (i, f, g, o). x: (B, I), h: (B, P), c: (B, H) ->
    (h', c'); h' is projected by w_hr (P, H) when given (``nn.LSTM``'s proj_size), else P = H."""
    gates = F.linear(x, w_ih, b_ih) + F.linear(h, w_hh, b_hh)
    i, f, g, o = gates.chunk(4, dim=-1)
    c_next = torch.sigmoid(f) * c + torch.sigmoid(i) * torch.tanh(g)
    h_next = torch.sigmoid(o) * torch.tanh(c_next)
    if w_hr is not None:
        h_next = F.linear(h_next, w_hr)
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
    w_hr: Optional[Tensor] = None,
) -> Tuple[Tensor, Tensor]:
    """One Mogrifier LSTM step. x: (B, I), h: (B, P), c: (B, H) -> (h' (B, P), c' (B, H))."""
    x, h = mogrify(x, h, factors, biases)
    return lstm_step(x, h, c, w_ih, w_hh, b_ih, b_hh, w_hr)


def masked_state(h: Tensor, state_mask: Optional[Tensor]) -> Tensor:
    """The state a step reads: h (B_t, P) times the first B_t rows of ``state_mask`` (B, P)
    (variational dropout on the recurrent state, the same mask at every step); h itself when
    there is no mask."""
    if state_mask is None:
        return h
    return h * state_mask[: h.shape[0]]


def retire_ended(rows: int, state: Tensor, ended: List[Tensor]) -> Tensor:
    """The first ``rows`` rows of a per-sequence state (B', ·); the rows past them, whose
    sequences have ended (a packed batch's are sorted longest first), are appended to
    ``ended``."""
    if rows < state.shape[0]:
        ended.append(state[rows:])
        return state[:rows]
    return state


def final_state(state: Tensor, ended: List[Tensor]) -> Tensor:
    """Every sequence's last state (B, ·): the rows still running, then those retired by
    :func:`retire_ended`, latest first (each retirement took the highest rows left)."""
    pieces = [state]
    for k in range(len(ended) - 1, -1, -1):
        pieces.append(ended[k])
    return torch.cat(pieces) if len(pieces) > 1 else state


def mogrifier_lstm_sequence(
    xs: List[Tensor],
    h: Tensor,
    c: Tensor,
    w_ih: Tensor,
    w_hh: Tensor,
    b_ih: Optional[Tensor],
    b_hh: Optional[Tensor],
    factors: List[List[Tensor]],
    biases: List[Optional[Tensor]],
    w_hr: Optional[Tensor] = None,
    packed: bool = False,
    state_mask: Optional[Tensor] = None,
) -> Tuple[List[Tensor], Tensor, Tensor]:
    """The step looped over time. xs: one (B_t, I) input per step; h (B, P), c (B, H) -> the
    outputs, one (B_t, P) per step, and each sequence's h and c after its own last step. B_t is
    B unless ``packed``: then non-increasing, the sequences still running at step t being the
    first B_t rows. With ``state_mask`` (B, P), every step reads h times the mask
    (:func:`masked_state`); the outputs and the final h are not masked."""
    outputs: List[Tensor] = []
    ended_h: List[Tensor] = []
    ended_c: List[Tensor] = []
    for x_t in xs:
        if packed:
            h = retire_ended(x_t.shape[0], h, ended_h)
            c = retire_ended(x_t.shape[0], c, ended_c)
        h_in = masked_state(h, state_mask)
        h, c = mogrifier_lstm_step(x_t, h_in, c, w_ih, w_hh, b_ih, b_hh, factors, biases, w_hr)
        outputs.append(h)
    return outputs, final_state(h, ended_h), final_state(c, ended_c)


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

    w_ih: (4H, I), w_hh: (4H, P), b_ih and b_hh: (4H,) or None; ``maps`` holds each stored
    :class:`RoundMap` once and ``map_of_round[j - 1]`` the index of round j's map in it (with
    shared rounds one map serves several rounds); w_hr: (P, H), the projection of ``nn.LSTM``'s
    proj_size, or None (then P = H).
    """

    w_ih: Tensor
    w_hh: Tensor
    b_ih: Tensor | None
    b_hh: Tensor | None
    maps: tuple[RoundMap, ...]
    map_of_round: tuple[int, ...]
    w_hr: Tensor | None = None

    @property
    def rounds(self) -> int:
        return len(self.map_of_round)

    @property
    def round_maps(self) -> tuple[RoundMap, ...]:
        """Each round's map, in order (a shared map once per round it serves)."""
        return tuple(self.maps[m] for m in self.map_of_round)

    @property
    def cell_size(self) -> int:
        """H, the width of the cell state and of each gate."""
        return self.w_hh.shape[0] // 4

    @property
    def state_size(self) -> int:
        """P, the width of the hidden state carried and output (H without a projection)."""
        return self.w_hh.shape[1]

    def step_args(self) -> tuple:
        """The trailing arguments of :func:`mogrifier_lstm_step` and
        :func:`mogrifier_lstm_sequence`: (w_ih, w_hh, b_ih, b_hh, factors, biases, w_hr)."""
        maps = self.round_maps
        factors = [list(m.factors) for m in maps]
        biases = [m.bias for m in maps]
        return self.w_ih, self.w_hh, self.b_ih, self.b_hh, factors, biases, self.w_hr


class Sequence(NamedTuple):
    """The input of one layer-direction: padded, or a packed batch of variable lengths.

    ``data`` is (T, B, I) when ``batch_sizes`` is None. Otherwise it holds a packed batch's
    rows step after step, (R, I) with R = sum(batch_sizes): ``batch_sizes[t]`` sequences run at
    step t, and they are the first rows of the batch (sequences sorted longest first, as
    ``PackedSequence`` stores them), so step t's rows are a prefix of step t - 1's.

    ``state_mask`` (B, P), when given, multiplies the hidden state every step reads (step t
    reads h_{t-1} times its first B_t rows; h_0 included): variational dropout on the
    recurrent state, one mask per sequence. The outputs and the final state are not masked,
    and the mask is a constant (no gradient flows to it).
    """

    data: Tensor
    batch_sizes: tuple[int, ...] | None = None
    state_mask: Tensor | None = None

    @property
    def packed(self) -> bool:
        return self.batch_sizes is not None

    @property
    def steps(self) -> int:
        return self.data.shape[0] if self.batch_sizes is None else len(self.batch_sizes)

    @property
    def batch(self) -> int:
        """B, the number of sequences (the rows of the state)."""
        return self.data.shape[1] if self.batch_sizes is None else self.batch_sizes[0]

    def step_inputs(self) -> list[Tensor]:
        """One (B_t, I) input per step."""
        if self.batch_sizes is None:
            return list(self.data.unbind(0))
        return list(self.data.split(self.batch_sizes))

    def join(self, outputs: list[Tensor]) -> Tensor:
        """Per-step outputs (B_t, ·) laid out as the data: (T, B, ·) or (R, ·)."""
        return torch.stack(outputs) if self.batch_sizes is None else torch.cat(outputs)


class State(NamedTuple):
    """A layer-direction's recurrent state, one row per sequence: h (B, P) and c (B, H)."""

    h: Tensor
    c: Tensor
