"""The Triton kernels on their own, the launch layouts the backend tests do not reach, and the
``"cudnn"`` backend's code run on CPU tensors.

Without a GPU these run in Triton's interpreter (tests/conftest.py sets TRITON_INTERPRET=1).
"""

from __future__ import annotations

import pytest
import torch

pytest.importorskip("triton", reason="triton is not installed (pip install -e .[dev])")

import mogrifier_fast as mf
from mogrifier_fast import backends
from mogrifier_fast.backends import Backend
from mogrifier_fast.backends.cuda_graphs import _flatten, graphed
from mogrifier_fast.backends.cudnn_steps import run_cudnn
from mogrifier_fast.kernels import interpreted, lstm, mogrify
from mogrifier_fast.mogrify import Sequence, State, lstm_step
from tests.helpers import Case, oracle_and_grad, rel_err, run_and_grad
from tests.test_backends import check_against_oracle

DEVICE = "cpu" if interpreted(lstm._lstm_forward_kernel) else "cuda"


@pytest.mark.parametrize("dtype", [torch.float64, torch.float32])
def test_lstm_kernels_match_torch(dtype: torch.dtype) -> None:
    """Gates scaled so that some are tiny: tanh near zero must stay accurate in float32."""
    torch.manual_seed(0)
    rows, hidden = 5, 70  # more columns than one block
    gates = torch.randn(rows, 4 * hidden, dtype=torch.float64) * torch.logspace(-6, 1, 4 * hidden)
    c_prev = torch.randn(rows, hidden, dtype=torch.float64) * 1e-3
    dh, dh_carry, dc = (torch.randn(rows, hidden, dtype=torch.float64) for _ in range(3))

    leaves = [t.clone().requires_grad_() for t in (gates, c_prev)]
    i, f, g, o = leaves[0].chunk(4, 1)
    c_want = torch.sigmoid(f) * leaves[1] + torch.sigmoid(i) * torch.tanh(g)
    h_want = torch.sigmoid(o) * torch.tanh(c_want)
    grad_gates_want, grad_c_want = torch.autograd.grad(
        (h_want, c_want), leaves, (dh + dh_carry, dc)
    )

    def on_device(t: torch.Tensor) -> torch.Tensor:
        return t.to(device=DEVICE, dtype=dtype).contiguous()

    gates_d, c_prev_d = on_device(gates), on_device(c_prev)
    c_next, h_next, h_copy = (torch.empty_like(c_prev_d) for _ in range(3))
    lstm.lstm_forward(gates_d, c_prev_d, c_next, h_next, h_copy)
    grad_gates, grad_c = torch.empty_like(gates_d), on_device(dc)
    lstm.lstm_backward(
        gates_d, c_prev_d, c_next, on_device(dh), on_device(dh_carry), grad_c, grad_gates
    )
    tolerance = 1e-12 if dtype == torch.float64 else 1e-6
    for got, want in ((c_next, c_want), (h_next, h_want), (h_copy, h_want),
                      (grad_gates, grad_gates_want), (grad_c, grad_c_want)):  # fmt: skip
        assert rel_err(got.cpu(), want) <= tolerance


@pytest.mark.parametrize("rank", [None, 5])
def test_one_launch_per_round_matches_oracle(rank: int | None, monkeypatch) -> None:
    """Wide states run one launch per round with the columns split across programs."""
    monkeypatch.setattr(mogrify, "ONE_LAUNCH_MAX_WIDTH", 0)
    case = Case({"input_size": 40, "hidden_size": 70, "rounds": 4, "rank": rank}, steps=3, batch=18)
    check_against_oracle("triton", case, torch.float64)


def test_both_layouts_give_identical_results(monkeypatch) -> None:
    case = Case({"input_size": 20, "hidden_size": 33, "rounds": 5}, steps=3, batch=3)
    layer, x, hx = case.build(dtype=torch.float32, backend="triton")
    one_launch = run_and_grad(layer, x, hx)
    monkeypatch.setattr(mogrify, "ONE_LAUNCH_MAX_WIDTH", 0)
    per_round = run_and_grad(layer, x, hx)
    for a, b in zip(one_launch[0] + tuple(one_launch[1]), per_round[0] + tuple(per_round[1]), strict=True):  # fmt: skip
        assert torch.allclose(a, b, rtol=1e-6, atol=1e-7)


@pytest.fixture
def cudnn_on_cpu(monkeypatch) -> str:
    """The "cudnn" backend's run function registered for CPU tensors under a test name."""
    name = "cudnn-test"
    monkeypatch.setitem(backends._registered, name, Backend(name=name, run=run_cudnn))
    backends._loaded.clear()
    yield name
    backends._loaded.clear()


@pytest.mark.parametrize(
    "case",
    [
        Case({"input_size": 5, "hidden_size": 7, "rounds": 5}, steps=4, batch=3, with_hx=True),
        Case({"input_size": 6, "hidden_size": 4, "rounds": 6, "rank": 2, "num_layers": 2}, 3, 2),
        Case(
            {
                "input_size": 4,
                "hidden_size": 6,
                "rounds": 3,
                "bias": False,
                "mogrifier_bias": False,
                "share_rounds": True,
                "bidirectional": True,
            },
            3,
            2,
        ),
        Case({"input_size": 3, "hidden_size": 5, "rounds": 0}, steps=2, batch=2),
    ],
    ids=lambda case: case.name,
)
def test_cudnn_backend_code_matches_oracle(case: Case, cudnn_on_cpu: str) -> None:
    if DEVICE != "cpu":
        pytest.skip("compiled Triton kernels: the GPU check runs the cudnn backend itself")
    check_against_oracle(cudnn_on_cpu, case, torch.float64)
    layer, x, hx = case.build(dtype=torch.float64, backend=cudnn_on_cpu)
    with torch.no_grad():
        output = layer(x, hx)[0]
    assert rel_err(output, oracle_and_grad(layer, x, hx)[0][0]) <= 1e-9


def test_availability_and_reasons() -> None:
    if DEVICE == "cpu":
        assert "triton" in mf.available_backends("cpu")
        assert "cudnn" not in mf.available_backends("cpu")
        reason = backends.unavailable_reason("cudnn", torch.device("cpu"))
        assert "CUDA" in reason
        assert "interpreter" in backends.unavailable_reason("triton", torch.device("cuda"))
    layer = mf.MogrifierLSTM(3, 4, rounds=2, backend="cudnn")
    if "cudnn" not in mf.available_backends("cpu"):
        with pytest.raises(backends.BackendUnavailableError, match="cudnn"):
            layer(torch.randn(2, 1, 3))


def test_graphed_runs_plainly_off_cuda() -> None:
    """On CPU tensors the CUDA-graph wrapper is the plain function."""
    calls = []

    def run(seq, state, params):
        calls.append(seq.data)
        return seq.data, state

    layer = mf.MogrifierLSTM(3, 4, rounds=3, share_rounds=True)
    x, h = torch.randn(2, 1, 3), torch.zeros(1, 4)
    output, _ = graphed("test", run)(Sequence(x), State(h, h), layer.layer_params(0))
    assert output is x and calls == [x]


def test_graph_inputs_flatten_and_rebuild() -> None:
    """A shared map is one graph input; rebuilding restores every round, in order."""
    layer = mf.MogrifierLSTM(3, 4, rounds=5, share_rounds=True, rank=2)
    params = layer.layer_params(0)
    flat, rebuild = _flatten(params)
    assert len(flat) == 4 + 2 * 3  # LSTM weights and biases, then two shared maps (a, b, bias)
    rebuilt = rebuild(list(flat))
    for got, want in zip(rebuilt.maps, params.maps, strict=True):
        assert all(a is b for a, b in zip(got.factors, want.factors, strict=True))
        assert got.bias is want.bias
    assert rebuilt.w_ih is params.w_ih and rebuilt.b_hh is params.b_hh


def test_lstm_step_is_the_spec() -> None:
    """The kernels' gate order is mogrify.lstm_step's (and so nn.LSTM's)."""
    torch.manual_seed(1)
    x, h, c = torch.randn(2, 3, dtype=torch.float64), torch.randn(2, 4, dtype=torch.float64), torch.randn(2, 4, dtype=torch.float64)  # fmt: skip
    w_ih, w_hh = torch.randn(16, 3, dtype=torch.float64), torch.randn(16, 4, dtype=torch.float64)
    gates = (x @ w_ih.T + h @ w_hh.T).contiguous()
    c_next, h_next = (torch.empty_like(c, device=DEVICE) for _ in range(2))
    lstm.lstm_forward(gates.to(DEVICE), c.to(DEVICE), c_next, h_next)
    h_want, c_want = lstm_step(x, h, c, w_ih, w_hh, None, None)
    assert rel_err(h_next.cpu(), h_want) <= 1e-12 and rel_err(c_next.cpu(), c_want) <= 1e-12


def test_persistent_falls_back_to_step_by_step_once(monkeypatch, caplog) -> None:
    """A layer over the weight budget runs backend "triton"'s steps, said once in the log."""
    from mogrifier_fast.backends import persistent

    monkeypatch.setattr(persistent, "MAX_WEIGHT_BYTES", 0)
    monkeypatch.setattr(persistent, "_fallbacks_logged", set())
    case = Case({"input_size": 5, "hidden_size": 6, "rounds": 4, "rank": 2}, steps=3, batch=2)
    with caplog.at_level("WARNING", logger="mogrifier_fast"):
        check_against_oracle("persistent", case, torch.float64)
        check_against_oracle("persistent", case, torch.float64)
    fallbacks = [r for r in caplog.records if "runs step by step" in r.getMessage()]
    assert len(fallbacks) == 1 and "MAX_WEIGHT_BYTES" in fallbacks[0].getMessage()


PLAN_CASES = [
    Case({"input_size": 6, "hidden_size": 20, "rounds": 5}, steps=3, batch=18, with_hx=True),
    Case(
        {"input_size": 5, "hidden_size": 7, "rounds": 4, "rank": 3},
        steps=4,
        batch=3,
        lengths=(4, 1, 3),
    ),
]


@pytest.mark.parametrize("case", PLAN_CASES, ids=lambda case: case.name)
@pytest.mark.parametrize("plan", ["rows", "grid"])
def test_persistent_plans_match_oracle(plan: str, case: Case, monkeypatch) -> None:
    """Both plans of the persistent kernels: rows (a program per row block; batch 18 makes two)
    and grid (tiles spread over the programs; interpreted, one launch per step and phase), at
    the tile sizes compiled for a GPU (the interpreter's own are wider)."""
    from mogrifier_fast.kernels import persistent

    monkeypatch.setenv("MOGRIFIER_PERSISTENT_PLAN", plan)
    monkeypatch.setattr(persistent, "INTERPRETER_BLOCK_N", persistent.BLOCK_N)
    monkeypatch.setattr(persistent, "INTERPRETER_BLOCK_K", persistent.BLOCK_K)
    check_against_oracle("persistent", case, torch.float64)


def test_persistent_plan_is_checked(monkeypatch) -> None:
    from mogrifier_fast.backends.persistent import choose_plan

    monkeypatch.setenv("MOGRIFIER_PERSISTENT_PLAN", "columns")
    layer = mf.MogrifierLSTM(3, 4, backend="reference")
    seq = Sequence(torch.zeros(2, 1, 3))
    with pytest.raises(ValueError, match=r"MOGRIFIER_PERSISTENT_PLAN: expected one of \['rows', 'grid'\], got 'columns'"):  # fmt: skip
        choose_plan(seq, layer.layer_params(0))
    monkeypatch.delenv("MOGRIFIER_PERSISTENT_PLAN")
    assert choose_plan(seq, layer.layer_params(0)) == "grid"  # the interpreter checks "grid"


def test_grid_barrier_self_test() -> None:
    """The barrier's self-test kernel and its expected sums (under the interpreter one program:
    programs run one after another there, so a spin barrier over several would never open)."""
    from mogrifier_fast.kernels.persistent import barrier_check

    if DEVICE == "cpu":
        assert barrier_check(1, 9, DEVICE)
    else:
        assert barrier_check(torch.cuda.get_device_properties(0).multi_processor_count, 50)


def fake_make_graphed_callables(function, sample):
    """``torch.cuda.make_graphed_callables``'s contract on CPU: static input, output and
    gradient buffers, one set of saved activations (a replay overwrites the last one's)."""
    static_outputs = [o.detach().clone() for o in function(*sample)]
    static_grads = [torch.zeros_like(t) if t.requires_grad else None for t in sample]
    last = {}

    class Graphed(torch.autograd.Function):
        @staticmethod
        def forward(ctx, *inputs):
            for static, given in zip(sample, inputs, strict=True):
                if static.data_ptr() != given.data_ptr():
                    static.detach().copy_(given)
            with torch.enable_grad():
                last["leaves"] = [s.detach().requires_grad_(s.requires_grad) for s in sample]
                last["outputs"] = function(*last["leaves"])
            for static, output in zip(static_outputs, last["outputs"], strict=True):
                static.copy_(output.detach())
            return tuple(o.detach() for o in static_outputs)

        @staticmethod
        def backward(ctx, *grads):
            wanted = [leaf for leaf in last["leaves"] if leaf.requires_grad]
            found = iter(torch.autograd.grad(last["outputs"], wanted, grads, allow_unused=True))
            for buffer in static_grads:
                if buffer is not None:
                    result = next(found)
                    buffer.copy_(0 if result is None else result)
            return tuple(None if b is None else b.detach() for b in static_grads)

    return lambda *inputs: Graphed.apply(*inputs)


def test_graph_replay_contract_on_cpu(monkeypatch) -> None:
    """The wrapper's own logic, with CUDA graphs emulated on CPU: outputs outlive the next
    replay, a call made while a backward is pending runs plainly, gradients accumulate into
    .grad without aliasing the graph's buffers."""
    from mogrifier_fast.backends import cuda_graphs
    from mogrifier_fast.reference import run_reference

    monkeypatch.setattr(cuda_graphs, "_uses_graphs", lambda x: True)
    monkeypatch.setattr(torch.cuda, "make_graphed_callables", fake_make_graphed_callables)
    run = graphed("emulated", run_reference)
    layer = mf.MogrifierLSTM(3, 4, rounds=3, rank=2, dtype=torch.float64)
    params = layer.layer_params(0)
    h0 = c0 = torch.zeros(2, 4, dtype=torch.float64)
    xs = [torch.randn(5, 2, 3, dtype=torch.float64) for _ in range(2)]

    def loss(run_fn):
        first = run_fn(Sequence(xs[0]), State(h0, c0), params)[0]
        kept = first.detach().clone()
        # replays while the first backward is pending
        second = run_fn(Sequence(xs[1]), State(h0, c0), params)[0]
        assert torch.equal(first, kept)
        return (first * 2).sum() + (second * 3).sum()

    def one_call_loss(index: int):
        return lambda run_fn: run_fn(Sequence(xs[index]), State(h0, c0), params)[0].sum()

    def grads_after(run_fn, losses) -> list[torch.Tensor]:
        layer.zero_grad(set_to_none=True)
        for make_loss in losses:
            make_loss(run_fn).backward()
        return [p.grad.clone() for p in layer.parameters()]

    for losses in ([loss], [loss, loss], [one_call_loss(0), one_call_loss(1)]):
        got, want = grads_after(run, losses), grads_after(run_reference, losses)
        for a, b in zip(got, want, strict=True):
            assert torch.allclose(a, b, rtol=1e-12, atol=1e-12)
