"""NaiveLSTM, the per-gate teaching baseline, computes what nn.LSTM computes."""

from __future__ import annotations

import pytest
import torch
from torch import nn

import mogrifier_fast as mf
from tests.helpers import rel_err


@pytest.mark.parametrize("bias", [True, False])
@pytest.mark.parametrize(
    ("input_size", "hidden_size", "steps", "batch"), [(3, 5, 7, 2), (8, 4, 1, 1)]
)
def test_naive_lstm_matches_nn_lstm(bias, input_size, hidden_size, steps, batch) -> None:
    torch.manual_seed(0)
    lstm = nn.LSTM(input_size, hidden_size, bias=bias, dtype=torch.float64)
    naive = mf.NaiveLSTM(input_size, hidden_size).double().load_from_lstm(lstm)
    x = torch.randn(steps, batch, input_size, dtype=torch.float64, requires_grad=True)
    h0, c0 = (torch.randn(batch, hidden_size, dtype=torch.float64) for _ in range(2))
    for hx in (None, (h0, c0)):
        want, (want_h, want_c) = lstm(x, None if hx is None else (h0[None], c0[None]))
        got, (h, c) = naive(x, hx)
        assert rel_err(got, want) < 1e-12
        assert rel_err(h, want_h[0]) < 1e-12 and rel_err(c, want_c[0]) < 1e-12
    (grad_naive,) = torch.autograd.grad(naive(x)[0].sum(), x)
    (grad_lstm,) = torch.autograd.grad(lstm(x)[0].sum(), x)
    assert rel_err(grad_naive, grad_lstm) < 1e-12


def test_naive_lstm_parameters_are_per_gate() -> None:
    naive = mf.NaiveLSTM(3, 5)
    names = {n: tuple(p.shape) for n, p in naive.named_parameters()}
    assert names["weight_ig"] == (5, 3) and names["weight_ho"] == (5, 5) and names["bias_f"] == (5,)
    assert len(names) == 12


def test_load_from_lstm_refuses_stacked_lstm() -> None:
    with pytest.raises(ValueError, match=r"lstm: expected a single-layer, one-direction nn\.LSTM"):
        mf.NaiveLSTM(3, 5).load_from_lstm(nn.LSTM(3, 5, num_layers=2))
