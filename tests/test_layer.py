"""The public contract of MogrifierLSTM and MogrifierLSTMCell (the README's "Contract")."""

from __future__ import annotations

import math
import warnings

import pytest
import torch
from torch import nn

import mogrifier_fast as mf
from mogrifier_fast.backends import BackendUnavailableError
from tests.helpers import Case, oracle_forward, random_cases, rel_err


def lstm_and_mogrifier(**kwargs):
    torch.manual_seed(0)
    lstm = nn.LSTM(**kwargs, dtype=torch.float64)
    layer = mf.MogrifierLSTM(**kwargs, rounds=0, dtype=torch.float64)
    return lstm, layer


@pytest.mark.parametrize(
    "kwargs",
    [
        {"input_size": 3, "hidden_size": 5},
        {"input_size": 3, "hidden_size": 5, "num_layers": 3, "bidirectional": True},
        {"input_size": 4, "hidden_size": 2, "num_layers": 2, "bias": False, "batch_first": True},
        {"input_size": 3, "hidden_size": 5, "num_layers": 2, "bidirectional": True, "proj_size": 2},
    ],
)
def test_rounds_zero_is_nn_lstm(kwargs) -> None:
    """Same parameter names, shapes and order; an nn.LSTM state_dict loads strictly and gives
    nn.LSTM's output and state."""
    lstm, layer = lstm_and_mogrifier(**kwargs)
    lstm_shapes = [(n, p.shape) for n, p in lstm.named_parameters()]
    assert [(n, p.shape) for n, p in layer.named_parameters()] == lstm_shapes
    layer.load_state_dict(lstm.state_dict(), strict=True)
    batch_dims = (4, 6) if kwargs.get("batch_first") else (6, 4)
    x = torch.randn(*batch_dims, kwargs["input_size"], dtype=torch.float64)
    states = lstm.num_layers * (2 if lstm.bidirectional else 1)
    widths = (kwargs.get("proj_size") or kwargs["hidden_size"], kwargs["hidden_size"])
    hx = tuple(torch.randn(states, 4, w, dtype=torch.float64) for w in widths)
    for h in (None, hx):
        want_out, (want_h, want_c) = lstm(x, h)
        out, (h_n, c_n) = layer(x, h)
        assert rel_err(out, want_out) < 1e-12
        assert rel_err(h_n, want_h) < 1e-12 and rel_err(c_n, want_c) < 1e-12


def test_lstm_state_dict_loads_non_strictly_into_a_mogrifier() -> None:
    lstm = nn.LSTM(3, 5, num_layers=2)
    layer = mf.MogrifierLSTM(3, 5, num_layers=2, rounds=4, rank=2)
    result = layer.load_state_dict(lstm.state_dict(), strict=False)
    assert result.unexpected_keys == []
    assert result.missing_keys and all(k.startswith("mogrifier_") for k in result.missing_keys)
    assert torch.equal(layer.weight_hh_l1, lstm.weight_hh_l1)


def test_mogrifier_parameter_names_and_shapes() -> None:
    layer = mf.MogrifierLSTM(3, 5, num_layers=2, bidirectional=True, rounds=3, rank=2)
    shapes = {n: tuple(p.shape) for n, p in layer.named_parameters()}
    assert shapes["mogrifier_weight_a_r1_l0"] == (3, 2)  # odd round: h (5) -> x (3)
    assert shapes["mogrifier_weight_b_r1_l0"] == (2, 5)
    assert shapes["mogrifier_weight_a_r2_l0_reverse"] == (5, 2)  # even round: x (3) -> h (5)
    assert shapes["mogrifier_weight_b_r2_l0_reverse"] == (2, 3)
    assert shapes["mogrifier_weight_b_r1_l1"] == (2, 5)  # layer 1's input is 2 * 5
    assert shapes["mogrifier_weight_a_r1_l1_reverse"] == (10, 2)
    assert shapes["mogrifier_bias_r3_l1"] == (10,)
    shared = mf.MogrifierLSTM(3, 5, rounds=6, share_rounds=True, mogrifier_bias=False)
    assert [n for n, _ in shared.named_parameters() if n.startswith("mogrifier")] == [
        "mogrifier_weight_r1_l0",
        "mogrifier_weight_r2_l0",
    ]


@pytest.mark.parametrize("rank", [None, 2])
@pytest.mark.parametrize("share_rounds", [False, True])
def test_mogrifier_weights(rank, share_rounds) -> None:
    layer = mf.MogrifierLSTM(
        3, 4, num_layers=2, bidirectional=True, rounds=5, rank=rank, share_rounds=share_rounds
    )
    for k in range(4):
        maps = layer.mogrifier_weights(k)
        x_size = 3 if k < 2 else 8
        assert len(maps) == 5
        for j, (weight, bias) in enumerate(maps, start=1):
            expected = (x_size, 4) if j % 2 else (4, x_size)
            assert weight.shape == expected and bias.shape == expected[:1]
            assert weight.requires_grad
            if share_rounds and j > 2:
                assert torch.equal(weight, maps[j - 3][0])
        if rank is not None:
            a = layer.get_parameter("mogrifier_weight_a_r1_l1_reverse")
            b = layer.get_parameter("mogrifier_weight_b_r1_l1_reverse")
            torch.testing.assert_close(layer.mogrifier_weights(3)[0][0], a @ b)
    # Differentiable in the layer's own parameters.
    layer.mogrifier_weights(0)[0][0].sum().backward()
    name = "mogrifier_weight_r1_l0" if rank is None else "mogrifier_weight_a_r1_l0"
    assert layer.get_parameter(name).grad is not None
    assert mf.MogrifierLSTM(3, 4, mogrifier_bias=False).mogrifier_weights(0)[1][1] is None
    with pytest.raises(ValueError, match=r"k: expected a layer index in 0\.\.3"):
        layer.mogrifier_weights(4)


def test_initialisation() -> None:
    torch.manual_seed(0)
    fan_in, hidden = 400, 300
    layer = mf.MogrifierLSTM(hidden, fan_in, rounds=2)
    weight = layer.mogrifier_weight_r1_l0  # (300, 400): fan_in 400
    std = 1 / math.sqrt(fan_in)
    truncated_std = 0.8796 * std  # std of a normal truncated at two standard deviations
    assert weight.abs().max() <= 2 * std
    assert abs(weight.std().item() / truncated_std - 1) < 0.02
    assert torch.count_nonzero(layer.mogrifier_bias_r1_l0) == 0
    bound = 1 / math.sqrt(fan_in)
    assert layer.weight_ih_l0.abs().max() <= bound and layer.weight_ih_l0.abs().max() > 0.99 * bound
    low = mf.MogrifierLSTM(hidden, fan_in, rounds=2, rank=50)
    factor_std = (1 / (fan_in * 50)) ** 0.25
    for factor in (low.mogrifier_weight_a_r1_l0, low.mogrifier_weight_b_r1_l0):
        assert factor.abs().max() <= 2 * factor_std
        assert abs(factor.std().item() / (0.8796 * factor_std) - 1) < 0.03
    product = low.mogrifier_weights(0)[0][0]
    assert abs(product.var().item() * fan_in / 0.8796**4 - 1) < 0.1


def test_reset_parameters_and_flatten_parameters() -> None:
    torch.manual_seed(3)
    layer = mf.MogrifierLSTM(3, 4, rounds=3, rank=2)
    before = {n: p.clone() for n, p in layer.named_parameters()}
    layer.flatten_parameters()
    assert all(torch.equal(p, before[n]) for n, p in layer.named_parameters())
    with torch.no_grad():
        layer.weight_ih_l0.zero_()
    torch.manual_seed(3)
    layer.reset_parameters()
    # Construction is reset_parameters on the same random stream: same seed, same values.
    torch.manual_seed(3)
    fresh = dict(mf.MogrifierLSTM(3, 4, rounds=3, rank=2).named_parameters())
    assert all(torch.equal(p, fresh[n]) for n, p in layer.named_parameters())


def test_cell_matches_one_step_of_the_layer() -> None:
    for case in random_cases(12, seed=5):
        kwargs = {
            k: case.kwargs[k]
            for k in (
                "input_size",
                "hidden_size",
                "bias",
                "rounds",
                "rank",
                "share_rounds",
                "mogrifier_bias",
            )
        }
        torch.manual_seed(case.seed)
        layer = mf.MogrifierLSTM(**kwargs, dtype=torch.float64)
        cell = mf.MogrifierLSTMCell(**kwargs, dtype=torch.float64)
        cell.load_state_dict(
            {n.removesuffix("_l0"): p for n, p in layer.state_dict().items()}, strict=True
        )
        x = torch.randn(case.batch, kwargs["input_size"], dtype=torch.float64)
        h0, c0 = (
            torch.randn(case.batch, kwargs["hidden_size"], dtype=torch.float64) for _ in range(2)
        )
        out, (h_n, c_n) = layer(x[None], (h0[None], c0[None]))
        h1, c1 = cell(x, (h0, c0))
        assert (
            rel_err(h1, out[0]) < 1e-12
            and rel_err(h1, h_n[0]) < 1e-12
            and rel_err(c1, c_n[0]) < 1e-12
        )
        assert [w.shape for w, _ in cell.mogrifier_weights()] == [
            w.shape for w, _ in layer.mogrifier_weights(0)
        ]
        h1_unbatched, _ = cell(x[0], (h0[0], c0[0]))
        assert h1_unbatched.shape == (kwargs["hidden_size"],)
        torch.testing.assert_close(h1_unbatched, h1[0])
        torch.testing.assert_close(
            cell(x)[1], cell(x, (torch.zeros_like(h0), torch.zeros_like(c0)))[1]
        )


def test_interlayer_dropout() -> None:
    """Dropout acts on each layer's output except the last, only in training."""
    case = Case(
        {
            "input_size": 3,
            "hidden_size": 6,
            "rounds": 3,
            "num_layers": 3,
            "dropout": 0.4,
            "bidirectional": True,
        },
        steps=5,
        batch=4,
    )
    layer, x, _ = case.build()
    torch.manual_seed(11)
    out, _ = layer(x)
    want, _ = oracle_forward(layer, x, dropout_seed=11)
    assert rel_err(out, want) < 1e-12
    layer.eval()
    assert rel_err(layer(x)[0], oracle_forward(layer, x)[0]) < 1e-12
    assert rel_err(out, layer(x)[0]) > 1e-3


def test_dropout_with_one_layer_warns_like_nn_lstm() -> None:
    with pytest.warns(UserWarning, match="non-zero dropout expects num_layers greater than 1"):
        mf.MogrifierLSTM(3, 4, dropout=0.5)


def test_default_path_emits_no_warnings() -> None:
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        layer = mf.MogrifierLSTM(3, 4, num_layers=2, dropout=0.1)
        out, _ = layer(torch.randn(5, 2, 3))
        out.sum().backward()


def test_module_conversions() -> None:
    layer = mf.MogrifierLSTM(3, 4, rounds=2).double()
    assert layer(torch.randn(2, 1, 3, dtype=torch.float64))[0].dtype == torch.float64
    layer = mf.MogrifierLSTM(3, 4, rounds=2, device="cpu", dtype=torch.float64)
    assert layer.weight_ih_l0.dtype == torch.float64
    assert "rounds=2" in repr(layer) and "backend='auto'" in repr(layer)


def test_available_backends() -> None:
    names = mf.available_backends("cpu")
    assert "reference" in names and "auto" not in names
    assert mf.available_backends(torch.device("cpu")) == names
    assert all(isinstance(n, str) for n in names)
    if not torch.cuda.is_available():
        assert "cudnn" not in mf.available_backends("cuda")


def test_backend_that_cannot_run_here_is_refused_at_first_forward() -> None:
    layer = mf.MogrifierLSTM(3, 4, backend="cudnn")  # constructing is fine (it may move to CUDA)
    with pytest.raises(
        BackendUnavailableError, match=r"backend='cudnn' cannot run on device cpu: .+"
    ):
        layer(torch.randn(2, 1, 3))


def test_backend_can_be_switched_and_is_validated() -> None:
    layer = mf.MogrifierLSTM(3, 4)
    layer.backend = "reference"
    assert layer.backend == "reference"
    with pytest.raises(
        ValueError, match=r"backend: unknown backend 'fast'; expected one of \['auto', 'reference'"
    ):
        layer.backend = "fast"


BAD_CONSTRUCTION = [
    ({"input_size": 0, "hidden_size": 4}, ValueError, r"input_size: expected an int >= 1, got 0"),
    (
        {"input_size": 3, "hidden_size": 2.5},
        TypeError,
        r"hidden_size: expected an int, got float 2.5",
    ),
    (
        {"input_size": 3, "hidden_size": 4, "rounds": -1},
        ValueError,
        r"rounds: expected an int >= 0, got -1",
    ),
    (
        {"input_size": 3, "hidden_size": 4, "rank": 4},
        ValueError,
        r"rank: expected None \(full rank\) or an int in 1\.\.min\(input_size, hidden_size\) = 1\.\.3, got 4",
    ),
    (
        {"input_size": 3, "hidden_size": 4, "rank": 0},
        ValueError,
        r"rank: expected an int >= 1, got 0",
    ),
    (
        {"input_size": 3, "hidden_size": 4, "num_layers": 0},
        ValueError,
        r"num_layers: expected an int >= 1, got 0",
    ),
    (
        {"input_size": 3, "hidden_size": 4, "dropout": 1.5},
        ValueError,
        r"dropout: expected a number in \[0, 1\], got 1.5",
    ),
    (
        {"input_size": 3, "hidden_size": 4, "backend": "cuda"},
        ValueError,
        r"backend: unknown backend 'cuda'",
    ),
    (
        {"input_size": 3, "hidden_size": 4, "backend": None},
        TypeError,
        r"backend: expected a str, got NoneType",
    ),
    (
        {"input_size": 3, "hidden_size": 4, "proj_size": 4},
        ValueError,
        r"proj_size: expected 0 \(no projection\) or an int in 1..hidden_size - 1 = 1..3, got 4",
    ),
    (
        {"input_size": 3, "hidden_size": 4, "proj_size": 2, "rank": 3},
        ValueError,
        r"rank: .*1..min\(input_size, proj_size\) = 1..2, got 3",
    ),
]


@pytest.mark.parametrize(
    ("kwargs", "error", "message"), BAD_CONSTRUCTION, ids=lambda v: str(v)[:40]
)
def test_bad_construction(kwargs, error, message) -> None:
    with pytest.raises(error, match=message):
        mf.MogrifierLSTM(**kwargs)


def test_bad_cell_construction() -> None:
    with pytest.raises(ValueError, match=r"rank: expected None .* = 1\.\.2, got 5"):
        mf.MogrifierLSTMCell(2, 4, rank=5)


def _bad_inputs():
    x = torch.randn(5, 2, 3)
    h = torch.zeros(2, 2, 4)
    return [
        (
            (torch.randn(5, 2, 6),),
            ValueError,
            r"input: expected a 3-D tensor \(T, N, input_size\), an unbatched 2-D tensor \(T, input_size\) with input_size=3, or a PackedSequence, got shape \(5, 2, 6\)",
        ),
        ((torch.randn(5, 2, 1, 3),), ValueError, r"input: .* got shape \(5, 2, 1, 3\)"),
        (
            (torch.randn(0, 2, 3),),
            ValueError,
            r"input: expected a sequence length >= 1, got shape \(0, 2, 3\)",
        ),
        (
            (x.double(),),
            TypeError,
            r"input: dtype torch.float64 does not match the parameters' dtype torch.float32",
        ),
        ((x.long(),), TypeError, r"input: dtype torch.int64 does not match"),
        ((x.tolist(),), TypeError, r"input: expected a Tensor, got list"),
        (
            (x, (h, h[:1])),
            ValueError,
            r"hx\[1\] \(c_0\): expected shape \(2, 2, 4\), got \(1, 2, 4\)",
        ),
        (
            (x, (torch.zeros(2, 3, 4), h)),
            ValueError,
            r"hx\[0\] \(h_0\): expected shape \(2, 2, 4\), got \(2, 3, 4\)",
        ),
        ((x, (h, h.double())), TypeError, r"hx\[1\] \(c_0\): dtype torch.float64 does not match"),
        ((x, h), TypeError, r"hx: expected a tuple \(h_0, c_0\) of two tensors, got Tensor"),
        (
            (x[:, 0], (h, h)),
            ValueError,
            r"hx\[0\] \(h_0\): expected shape \(2, 4\), got \(2, 2, 4\)",
        ),
        (
            (x, (h[:, 0], h[:, 0])),
            ValueError,
            r"hx\[0\] \(h_0\): expected shape \(2, 2, 4\), got \(2, 4\)",
        ),
    ]


@pytest.mark.parametrize(("args", "error", "message"), _bad_inputs(), ids=lambda v: str(v)[:30])
def test_bad_input(args, error, message) -> None:
    layer = mf.MogrifierLSTM(3, 4, num_layers=2, rounds=2)
    with pytest.raises(error, match=message):
        layer(*args)


def test_batch_first_error_names_the_layout() -> None:
    layer = mf.MogrifierLSTM(3, 4, batch_first=True)
    with pytest.raises(ValueError, match=r"\(N, T, input_size\)"):
        layer(torch.randn(2, 5, 4))


def test_meta_device_mismatch_is_refused() -> None:
    layer = mf.MogrifierLSTM(3, 4, device="meta")
    with pytest.raises(
        ValueError, match=r"input: device cpu does not match the parameters' device meta"
    ):
        layer(torch.randn(2, 1, 3))


def test_bad_cell_input() -> None:
    cell = mf.MogrifierLSTMCell(3, 4)
    with pytest.raises(
        ValueError,
        match=r"input: expected \(N, input_size\) or unbatched \(input_size,\) with input_size=3, got shape \(2, 5\)",
    ):
        cell(torch.randn(2, 5))
    with pytest.raises(ValueError, match=r"hx\[0\] \(h_0\): expected shape \(2, 4\), got \(4,\)"):
        cell(torch.randn(2, 3), (torch.zeros(4), torch.zeros(4)))
