"""The pure-Python reference: a time loop over :mod:`mogrifier_fast.mogrify`, and ``NaiveLSTM``.

Backend ``"reference"`` is the ground truth every other backend is checked against, and the
baseline the benchmark measures speed-ups from.
"""

from __future__ import annotations

import math

import torch
from torch import Tensor, nn

from mogrifier_fast.backends import Backend
from mogrifier_fast.mogrify import LayerParams, Sequence, State, mogrifier_lstm_sequence


def run_reference(seq: Sequence, state: State, params: LayerParams) -> tuple[Tensor, State]:
    """One layer, one direction (see :mod:`mogrifier_fast.backends` for the contract)."""
    outputs, h, c = mogrifier_lstm_sequence(
        seq.step_inputs(), state.h, state.c, *params.step_args(), seq.packed, seq.state_mask
    )
    return seq.join(outputs), State(h, c)


BACKEND = Backend(name="reference", run=run_reference)


class NaiveLSTM(nn.Module):
    """A from-scratch single-layer LSTM with one weight per gate and a Python loop over time.

    The teaching baseline the original notebook started from, kept to show what ``nn.LSTM``
    computes. Input (T, B, input_size) -> output (T, B, hidden_size), (h_T, c_T) each
    (B, hidden_size). Gates i, f, g, o each have ``weight_i{gate}`` (hidden, input),
    ``weight_h{gate}`` (hidden, hidden) and ``bias_{gate}`` (hidden,).
    """

    gate_names = ("i", "f", "g", "o")

    def __init__(self, input_size: int, hidden_size: int) -> None:
        super().__init__()
        self.input_size = input_size
        self.hidden_size = hidden_size
        for gate in self.gate_names:
            self.register_parameter(
                f"weight_i{gate}", nn.Parameter(torch.empty(hidden_size, input_size))
            )
            self.register_parameter(
                f"weight_h{gate}", nn.Parameter(torch.empty(hidden_size, hidden_size))
            )
            self.register_parameter(f"bias_{gate}", nn.Parameter(torch.empty(hidden_size)))
        self.reset_parameters()

    def reset_parameters(self) -> None:
        bound = 1.0 / math.sqrt(self.hidden_size)
        for parameter in self.parameters():
            nn.init.uniform_(parameter, -bound, bound)

    @torch.no_grad()
    def load_from_lstm(self, lstm: nn.LSTM) -> NaiveLSTM:
        """Copy a single-layer, one-direction ``nn.LSTM``'s weights, splitting them per gate."""
        if lstm.num_layers != 1 or lstm.bidirectional or lstm.proj_size:
            raise ValueError(
                "lstm: expected a single-layer, one-direction nn.LSTM without proj_size"
            )
        w_ih, w_hh = lstm.weight_ih_l0.chunk(4), lstm.weight_hh_l0.chunk(4)
        b = (
            (lstm.bias_ih_l0 + lstm.bias_hh_l0).chunk(4)
            if lstm.bias
            else [torch.zeros(self.hidden_size)] * 4
        )
        for k, gate in enumerate(self.gate_names):
            getattr(self, f"weight_i{gate}").copy_(w_ih[k])
            getattr(self, f"weight_h{gate}").copy_(w_hh[k])
            getattr(self, f"bias_{gate}").copy_(b[k])
        return self

    def _gate(self, gate: str, x: Tensor, h: Tensor) -> Tensor:
        weight_i, weight_h = getattr(self, f"weight_i{gate}"), getattr(self, f"weight_h{gate}")
        return x @ weight_i.T + h @ weight_h.T + getattr(self, f"bias_{gate}")

    def forward(
        self, x: Tensor, hx: tuple[Tensor, Tensor] | None = None
    ) -> tuple[Tensor, tuple[Tensor, Tensor]]:
        if hx is None:
            zeros = x.new_zeros(x.size(1), self.hidden_size)
            hx = (zeros, zeros)
        h, c = hx
        outputs = []
        for x_t in x.unbind(0):
            i = torch.sigmoid(self._gate("i", x_t, h))
            f = torch.sigmoid(self._gate("f", x_t, h))
            g = torch.tanh(self._gate("g", x_t, h))
            o = torch.sigmoid(self._gate("o", x_t, h))
            c = f * c + i * g
            h = o * torch.tanh(c)
            outputs.append(h)
        return torch.stack(outputs), (h, c)
