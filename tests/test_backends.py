"""Every backend, by name, against the independent oracle: forward and backward.

A backend is tested here by being registered: this module is parametrised over
``available_backends(device)``, device "cpu" unless ``MOGRIFIER_TEST_DEVICE`` names another
(the GPU check runs it with "cuda"). Tolerances are the README's: relative error <= 1e-9 in float64 and
<= 1e-4 in float32 (a backend may refuse float64 with a TypeError, none may refuse float32).
"""

from __future__ import annotations

import os

import pytest
import torch
from torch import nn
from torch.nn.utils.rnn import pack_padded_sequence

import mogrifier_fast as mf
from mogrifier_fast.backends import supported_features
from tests.helpers import (
    TOLERANCE,
    Case,
    features,
    grads,
    layer_input,
    oracle_and_grad,
    random_cases,
    rel_err,
    run_and_grad,
)

DEVICE = torch.device(os.environ.get("MOGRIFIER_TEST_DEVICE", "cpu"))
BACKENDS = mf.available_backends(DEVICE)

# Each feature on its own, then random mixtures of all of them.
FEATURE_CASES = [
    Case({"input_size": 5, "hidden_size": 7, "rounds": 0}, steps=4, batch=3),
    Case({"input_size": 5, "hidden_size": 7, "rounds": 5}, steps=4, batch=3),
    Case({"input_size": 6, "hidden_size": 4, "rounds": 6, "rank": 2}, steps=3, batch=2),
    Case({"input_size": 4, "hidden_size": 6, "rounds": 5, "share_rounds": True}, steps=3, batch=2),
    Case(
        {"input_size": 4, "hidden_size": 6, "rounds": 3, "bias": False, "mogrifier_bias": False},
        steps=3,
        batch=2,
    ),
    Case(
        {"input_size": 3, "hidden_size": 5, "rounds": 4, "num_layers": 3},
        steps=3,
        batch=2,
        with_hx=True,
    ),
    Case(
        {"input_size": 3, "hidden_size": 5, "rounds": 5, "bidirectional": True, "num_layers": 2},
        steps=4,
        batch=2,
    ),
    Case(
        {"input_size": 3, "hidden_size": 5, "rounds": 2, "batch_first": True},
        steps=4,
        batch=3,
        with_hx=True,
    ),
    Case(
        {"input_size": 3, "hidden_size": 5, "rounds": 5, "bidirectional": True},
        steps=4,
        batch=1,
        unbatched=True,
        with_hx=True,
    ),
    Case({"input_size": 8, "hidden_size": 8, "rounds": 1, "rank": 8}, steps=1, batch=5),
    # Packed batches of unsorted lengths (longest first inside), projections, both at once.
    Case(
        {"input_size": 3, "hidden_size": 5, "rounds": 5, "num_layers": 2, "bidirectional": True},
        steps=5,
        batch=4,
        with_hx=True,
        lengths=(3, 5, 1, 5),
    ),
    Case(
        {"input_size": 4, "hidden_size": 6, "rounds": 6, "rank": 2, "batch_first": True},
        steps=4,
        batch=5,
        lengths=(2, 4, 4, 1, 3),
    ),
    Case(
        {
            "input_size": 4,
            "hidden_size": 6,
            "proj_size": 3,
            "rounds": 5,
            "num_layers": 2,
            "bidirectional": True,
        },
        steps=3,
        batch=2,
        with_hx=True,
    ),
    Case(
        {"input_size": 3, "hidden_size": 5, "proj_size": 2, "rounds": 4, "share_rounds": True},
        steps=4,
        batch=3,
        with_hx=True,
        lengths=(4, 2, 3),
    ),
    # A dropout mask on the recurrent state: alone, packed both ways, projected, unbatched.
    Case({"input_size": 5, "hidden_size": 7, "rounds": 5}, steps=4, batch=3, masked=True),
    Case(
        {
            "input_size": 3,
            "hidden_size": 5,
            "rounds": 6,
            "rank": 2,
            "num_layers": 2,
            "bidirectional": True,
        },
        steps=5,
        batch=4,
        with_hx=True,
        lengths=(3, 5, 1, 5),
        masked=True,
    ),
    Case(
        {"input_size": 4, "hidden_size": 6, "proj_size": 3, "rounds": 1, "batch_first": True},
        steps=3,
        batch=2,
        with_hx=True,
        masked=True,
    ),
    Case(
        {"input_size": 3, "hidden_size": 4, "rounds": 0},
        steps=3,
        batch=1,
        unbatched=True,
        with_hx=True,
        masked=True,
    ),
]
CASES = FEATURE_CASES + random_cases(24, seed=1)

# Backends that compile code per layer configuration (seconds each) or run Triton kernels in its
# CPU interpreter (a Python call per program) run the feature cases and a few random mixtures,
# and gradcheck on a smaller layer, so the suite stays within a few minutes on a 2-core machine.
SLOW_BACKENDS = {"compile", "triton", "persistent"}
# (The Triton backends take one packed feature case: the other adds low rank and batch_first,
# which they run on other cases, at about 10 s per backend in the interpreter.)
FEW_CASES = [c for c in FEATURE_CASES if c is not FEATURE_CASES[11]] + CASES[
    len(FEATURE_CASES) :: 8
]
# "compile" compiles the step from mogrify.py (the reference's own step, checked on every case)
# anew for each layer structure and dtype, about 20 s each on these 2-core machines with a cold
# cache: it runs three feature cases, low rank with an even round count, shared dense maps
# with a projection on a packed batch (its own loop retires ended sequences), and a state mask
# on a packed batch (low rank again: the first one's compiled step serves it), and is left out
# of the size, determinism and double-backward checks (the step it compiles has no
# size-dependent code of its own; its autograd is torch's).
COMPILE_CASES = [FEATURE_CASES[i] for i in (2, 13, 15)]
LIGHT_BACKENDS = [b for b in BACKENDS if b != "compile"]


def cases_for(dtype_stride: int = 1) -> list:
    """(backend, case) pairs for every available backend and every ``dtype_stride``-th case
    whose features (packed input, projections) it supports."""
    chosen = {"compile": COMPILE_CASES, **dict.fromkeys(SLOW_BACKENDS - {"compile"}, FEW_CASES)}
    return [
        pytest.param(backend, case, id=f"{backend}-{case.name}")
        for backend in BACKENDS
        for case in chosen.get(backend, CASES)[::dtype_stride]
        if features(case) <= supported_features(backend)
    ]


@pytest.mark.parametrize("backend", BACKENDS)
def test_unsupported_features_are_refused_clearly(backend: str) -> None:
    """A backend without a feature refuses it: projections at construction, packed input and a
    state mask at the first forward; each error names the feature and the backends that have
    it."""
    missing = mf.backends.FEATURES - supported_features(backend)
    if not missing:
        pytest.skip(f"backend {backend!r} supports every feature")
    if "proj" in missing:
        with pytest.raises(ValueError, match=r"does not support proj.*backends that do: \["):
            mf.MogrifierLSTM(3, 4, proj_size=2, backend=backend)
    if "packed" in missing:
        layer = mf.MogrifierLSTM(3, 4, backend=backend).to(DEVICE)
        packed = torch.nn.utils.rnn.pack_sequence([torch.randn(3, 3), torch.randn(2, 3)])
        with pytest.raises(ValueError, match=r"does not support packed.*backends that do: \["):
            layer(packed.to(DEVICE))
    if "state_mask" in missing:
        layer = mf.MogrifierLSTM(3, 4, backend=backend).to(DEVICE)
        x, mask = torch.randn(2, 1, 3, device=DEVICE), torch.ones(1, 1, 4, device=DEVICE)
        with pytest.raises(ValueError, match=r"does not support state_mask.*backends that do: \["):
            layer(x, state_mask=mask)


def float64_refused(error: TypeError) -> bool:
    """Whether ``error`` is the one refusal the contract allows: float64 in the Triton kernels on a
    GPU whose Triton cannot run a float64 ``tl.dot`` (any other TypeError is a bug)."""
    return DEVICE.type == "cuda" and "float64 needs tl.dot" in str(error)


def skip_if_float64_refused(backend: str) -> None:
    """Skip (with the backend's reason) where a backend refuses float64, as the contract allows."""
    layer, x, _ = Case({"input_size": 2, "hidden_size": 2, "rounds": 1}, 1, 1).build(
        dtype=torch.float64, backend=backend, device=DEVICE
    )
    try:
        with torch.no_grad():
            layer(x)
    except TypeError as error:
        if not float64_refused(error):
            raise
        pytest.skip(f"backend {backend!r} refuses float64: {error}")


def check_against_oracle(backend: str, case: Case, dtype: torch.dtype) -> None:
    layer, x, hx = case.build(dtype=dtype, backend=backend, device=DEVICE)
    mask = case.mask(dtype, DEVICE)
    try:
        outputs, gradients = run_and_grad(layer, x, hx, lengths=case.lengths, state_mask=mask)
    except TypeError as error:
        if dtype != torch.float64 or not float64_refused(error):
            raise
        pytest.skip(f"backend {backend!r} refuses float64: {error}")
    expected_outputs, expected_gradients = oracle_and_grad(
        layer, x, hx, lengths=case.lengths, state_mask=mask
    )
    tolerance = TOLERANCE[dtype]
    for name, got, want in zip(("output", "h_n", "c_n"), outputs, expected_outputs, strict=True):
        assert got.dtype == dtype and got.shape == want.shape, name
        assert rel_err(got, want) <= tolerance, f"{name}: relative error {rel_err(got, want):.2e}"
    names = ["input", *(["h_0", "c_0"] if hx else []), *(n for n, _ in layer.named_parameters())]
    for name, got, want in zip(names, gradients, expected_gradients, strict=True):
        assert rel_err(got, want) <= tolerance, (
            f"grad of {name}: relative error {rel_err(got, want):.2e}"
        )


@pytest.mark.parametrize(("backend", "case"), cases_for())
def test_matches_oracle_float64(backend: str, case: Case) -> None:
    check_against_oracle(backend, case, torch.float64)


@pytest.mark.parametrize(("backend", "case"), cases_for(dtype_stride=3))
def test_matches_oracle_float32(backend: str, case: Case) -> None:
    check_against_oracle(backend, case, torch.float32)


@pytest.mark.parametrize("backend", LIGHT_BACKENDS)
def test_larger_sizes_float32(backend: str) -> None:
    """Sizes past any small-size special case (vector widths, blocks), low rank included."""
    slow = backend in SLOW_BACKENDS  # one layer: stacking is the layer's code, checked elsewhere
    for rank in (None, 16):
        case = Case(
            {"input_size": 40, "hidden_size": 72, "rounds": 5, "rank": rank,
             "num_layers": 1 if slow else 2},
            steps=3 if slow else 9,
            batch=17,
        )  # fmt: skip
        check_against_oracle(backend, case, torch.float32)


# Every backend but "persistent": it runs "triton"'s autograd function, and its kernels'
# gradients meet the oracle (itself gradchecked, as "reference") in float64 on every feature case;
# finite differences through its interpreted kernels took 45 s of the suite's budget.
@pytest.mark.parametrize("backend", [b for b in BACKENDS if b != "persistent"])
def test_gradcheck(backend: str) -> None:
    """torch.autograd.gradcheck in float64 on small sizes: finite differences, no oracle."""
    skip_if_float64_refused(backend)
    case = Case(
        {"input_size": 3, "hidden_size": 4, "rounds": 5, "rank": 2, "bidirectional": True},
        steps=3,
        batch=2,
        with_hx=True,
    )
    slow = backend in SLOW_BACKENDS
    if slow:
        case = Case({"input_size": 2, "hidden_size": 3, "rounds": 3, "rank": 1}, 2, 2, with_hx=True)
    layer, x, hx = case.build(dtype=torch.float64, backend=backend, device=DEVICE)
    names = [name for name, _ in layer.named_parameters()]

    def function(x, h0, c0, *params):
        parameters = dict(zip(names, params, strict=True))
        out, (h_n, c_n) = torch.func.functional_call(layer, parameters, (x, (h0, c0)))
        return out, h_n, c_n

    inputs = (x, *hx, *(p.detach().clone().requires_grad_() for p in layer.parameters()))
    # The slow backends use gradcheck's fast mode: random projections u^T J v checked against
    # finite differences, a few calls instead of one per input and output element (a Triton
    # interpreter call takes about half a second); a wrong gradient still fails it.
    assert torch.autograd.gradcheck(
        function, inputs, eps=1e-6, atol=1e-7, rtol=1e-5, fast_mode=slow
    )


@pytest.mark.parametrize("backend", LIGHT_BACKENDS)
def test_double_backward_works_or_raises_clearly(backend: str) -> None:
    skip_if_float64_refused(backend)
    case = Case({"input_size": 2, "hidden_size": 3, "rounds": 3}, steps=2, batch=2)
    layer, x, _ = case.build(dtype=torch.float64, backend=backend, device=DEVICE)

    def function(x):
        return layer(x)[0]

    try:
        assert torch.autograd.gradgradcheck(function, (x,), eps=1e-6, atol=1e-6, rtol=1e-4)
    except RuntimeError as error:
        assert "twice" in str(error) or "double backward" in str(error), str(error)


@pytest.mark.parametrize("backend", LIGHT_BACKENDS)
def test_backend_is_deterministic(backend: str) -> None:
    case = Case({"input_size": 4, "hidden_size": 5, "rounds": 5, "num_layers": 2}, steps=5, batch=3)
    layer, x, hx = case.build(dtype=torch.float32, backend=backend, device=DEVICE)
    first = run_and_grad(layer, x, hx)
    second = run_and_grad(layer, x, hx)
    for a, b in zip(first[0] + tuple(first[1]), second[0] + tuple(second[1]), strict=True):
        assert torch.equal(a, b)


@pytest.mark.parametrize(("backend", "case"), cases_for(dtype_stride=2))
def test_inference_matches_oracle(backend: str, case: Case) -> None:
    """Under no_grad a backend may take a path that keeps nothing for a backward."""
    skip_if_float64_refused(backend)
    check_inference_against_oracle(backend, case, torch.float64)


def check_inference_against_oracle(backend: str, case: Case, dtype: torch.dtype) -> None:
    layer, x, hx = case.build(dtype=dtype, backend=backend, device=DEVICE)
    with torch.no_grad():
        output, (h_n, c_n) = layer(layer_input(x, case.lengths, layer.batch_first), hx)
    output = output.data if case.lengths else output
    (want_output, want_h, want_c), _ = oracle_and_grad(layer, x, hx, lengths=case.lengths)
    for got, want in ((output, want_output), (h_n, want_h), (c_n, want_c)):
        assert rel_err(got, want) <= TOLERANCE[dtype]


@pytest.mark.parametrize("precision", ["bfloat16", "tf32"])
@pytest.mark.parametrize("backend", BACKENDS)
def test_reduced_precision_no_worse_than_reference(backend: str, precision: str) -> None:
    """bf16, and float32 with TF32 products: a backend's error against the float64 oracle is
    at most twice the reference loop's own error in the same precision (outputs and gradients)."""
    if DEVICE.type != "cuda":
        pytest.skip("bf16 and TF32 are checked on a GPU (MOGRIFIER_TEST_DEVICE=cuda)")
    case = Case({"input_size": 48, "hidden_size": 80, "rounds": 5, "rank": 16}, steps=6, batch=8)
    dtype = torch.bfloat16 if precision == "bfloat16" else torch.float32
    previous = torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32
    torch.backends.cuda.matmul.allow_tf32 = torch.backends.cudnn.allow_tf32 = precision == "tf32"
    try:
        errors = {}
        for name in {backend, "reference"}:
            layer, x, hx = case.build(dtype=dtype, backend=name, device=DEVICE)
            outputs, gradients = run_and_grad(layer, x, hx)
            expected_outputs, expected_gradients = oracle_and_grad(layer, x, hx)
            got = outputs + tuple(gradients)
            want = expected_outputs + tuple(expected_gradients)
            errors[name] = [rel_err(a, b) for a, b in zip(got, want, strict=True)]
    finally:
        torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32 = previous
    for got, reference in zip(errors[backend], errors["reference"], strict=True):
        assert got <= max(2 * reference, 1e-3), (got, reference)


# The Triton backends (slow in the interpreter) take the stacked bidirectional configuration.
PACKED_CONFIGS = [
    pytest.param(backend, *config, id=f"{backend}-{'-'.join(map(str, config))}")
    for backend in LIGHT_BACKENDS
    if "packed" in supported_features(backend)
    # (layers, bidirectional, proj_size, with_hx)
    for config in [
        (1, False, 0, False),
        (2, True, 0, True),
        (3, False, 2, True),
        (2, True, 3, False),
    ]
    if not config[2] or "proj" in supported_features(backend)
    if backend not in SLOW_BACKENDS or config == (2, True, 0, True)
]


@pytest.mark.parametrize(
    ("backend", "layers", "bidirectional", "proj_size", "with_hx"), PACKED_CONFIGS
)
def test_packed_rounds_zero_is_nn_lstm(
    backend: str, layers: int, bidirectional: bool, proj_size: int, with_hx: bool
) -> None:
    """rounds=0 with an nn.LSTM state dict (strict) on a packed batch of unsorted lengths gives
    nn.LSTM's packed output, h_n, c_n and every gradient."""
    skip_if_float64_refused(backend)
    torch.manual_seed(3)
    kwargs = {"input_size": 4, "hidden_size": 6, "num_layers": layers}
    kwargs.update(bidirectional=bidirectional, proj_size=proj_size)
    lstm = nn.LSTM(**kwargs, dtype=torch.float64)
    layer = mf.MogrifierLSTM(**kwargs, rounds=0, backend=backend, dtype=torch.float64)
    layer.load_state_dict(lstm.state_dict(), strict=True)
    lengths = [3, 5, 1, 5, 2]
    x = torch.randn(max(lengths), len(lengths), 4, dtype=torch.float64)
    states = layers * (2 if bidirectional else 1)
    widths = (proj_size or 6, 6)
    hx = tuple(torch.randn(states, len(lengths), w, dtype=torch.float64) for w in widths)
    results = []
    for module in (lstm, layer):
        x_leaf = x.clone().requires_grad_()
        hx_leaves = tuple(t.clone().requires_grad_() for t in hx) if with_hx else None
        packed = pack_padded_sequence(x_leaf, lengths, enforce_sorted=False)
        output, (h_n, c_n) = module(packed, hx_leaves)
        assert torch.equal(output.batch_sizes, packed.batch_sizes)
        assert torch.equal(output.unsorted_indices, packed.unsorted_indices)
        leaves = [x_leaf, *(hx_leaves or ()), *module.parameters()]
        results.append([output.data, h_n, c_n, *grads((output.data, h_n, c_n), leaves, 5)])
    for got, want in zip(*reversed(results), strict=True):
        assert rel_err(got, want) <= TOLERANCE[torch.float64]
