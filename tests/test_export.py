"""Tracing, exporting and compiling models that hold ``MogrifierLSTM`` layers.

* ``torch.jit.trace``: under backend "auto" a traced call runs the reference (plain torch ops,
  which the tracer records); "reference" and "compile" (its plain step while traced) trace too.
  "fused" (its C++ ops take ``Tensor?[]`` arguments, which the tracer cannot record) and
  "script" (a TorchScript function called with lists of tensors) do not: the README says so.
* ONNX: the C++ ops cannot be lowered, so an export runs the reference ("auto" picks it under
  both exporters and ``torch.export``), and any exported graph holds the Python time loop
  unrolled: its time axis is fixed at the export length. The recipe (README, "Tracing and ONNX
  export") therefore exports ONE step of the language model, state in and state out, with a
  dynamic batch axis, through ``torch.onnx.export(..., dynamo=True)`` (this torch's default and
  not deprecated; the TorchScript-based exporter also works but warns that it is deprecated),
  and drives it over a sequence of any length in a Python loop with ONNX Runtime.
* Fake kernels: the C++ ops run under fake tensors and AOT dispatch (``torch.library.opcheck``).
* No stray warnings: ``torch.compile`` of the language model, forward and backward, in a fresh
  process that records every warning (why not ``-W error``: see ``COMPILED_LM``); one
  compiled training step in that process gives eager's gradients.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import textwrap

import pytest
import torch
import torch.utils._pytree as pytree
from torch.utils._python_dispatch import TorchDispatchMode

import mogrifier_fast as mf
from mogrifier_fast import backends
from mogrifier_fast.backends import fused_chain
from mogrifier_fast.lm.model import LanguageModel

CPU = torch.device("cpu")
ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def small_lm(backend: str = "auto", seed: int = 0) -> LanguageModel:
    """A two-layer LM small enough to compile in seconds; a random decoder bias gives logits of
    order one, so the tolerance relative to max|logit| means something."""
    torch.manual_seed(seed)
    model = LanguageModel(31, emb=8, hidden=12, layers=2, rounds=4, backend=backend)
    torch.nn.init.normal_(model.decoder.bias)
    return model


def skip_unless_backend(name: str) -> None:
    reason = None if name == "auto" else backends.unavailable_reason(name, CPU)
    if reason is not None:
        pytest.skip(f"backend {name!r} does not run here: {reason}")


def skip_without_cpp_loops() -> None:
    if not fused_chain.usable(torch.zeros(1)):
        pytest.skip(f"C++ loops not built here: {fused_chain.unavailable_reason()}")


# --- torch.jit.trace --------------------------------------------------------------------------


class _Tagger(torch.nn.Module):
    """A model holding the layer: embedding, two MogrifierLSTM layers, a linear decoder."""

    def __init__(self, backend: str) -> None:
        super().__init__()
        torch.manual_seed(0)
        self.embedding = torch.nn.Embedding(31, 8)
        self.rnn = mf.MogrifierLSTM(8, 12, num_layers=2, rounds=4, backend=backend)
        self.decoder = torch.nn.Linear(12, 31)

    def forward(self, tokens: torch.Tensor):
        output, (h_n, c_n) = self.rnn(self.embedding(tokens))
        return self.decoder(output), h_n, c_n


@pytest.mark.filterwarnings("ignore::torch.jit.TracerWarning")
@pytest.mark.filterwarnings("ignore:`torch.jit.trace:DeprecationWarning")
@pytest.mark.parametrize("backend", ["auto", "reference", "compile"])
def test_trace_matches_eager(backend: str) -> None:
    """A traced model gives eager's outputs (logits, h_n, c_n) on a new input of the traced
    shape; the traced graph holds no op of this package (it runs wherever torch runs)."""
    skip_unless_backend(backend)
    model = _Tagger(backend).eval()
    tokens, other = torch.randint(0, 31, (5, 3)), torch.randint(0, 31, (5, 3))
    traced = torch.jit.trace(model, (tokens,), check_trace=False)
    kinds = {node.kind() for node in traced.inlined_graph.nodes()}
    assert not [k for k in kinds if "mogrifier" in k or k == "prim::PythonOp"], kinds
    model.rnn.backend = "reference"  # eager's ground truth, without compiling the step
    with torch.no_grad():
        for got, want in zip(traced(other), model(other), strict=True):
            torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-6)


# --- torch.export -----------------------------------------------------------------------------


def test_torch_export_runs_reference_under_auto() -> None:
    """torch.export.export of a layer under "auto" records plain torch ops (no C++ op), and the
    exported program gives eager's output."""
    torch.manual_seed(0)
    layer = mf.MogrifierLSTM(4, 6, num_layers=2, rounds=3).eval()
    x = torch.randn(5, 2, 4)
    program = torch.export.export(layer, (x,))
    targets = {str(node.target) for node in program.graph.nodes if node.op == "call_function"}
    assert not [t for t in targets if "mogrifier_fast" in t], targets
    other = torch.randn(5, 2, 4)
    with torch.no_grad():
        torch.testing.assert_close(program.module()(other)[0], layer(other)[0])


# --- ONNX -------------------------------------------------------------------------------------


@pytest.mark.filterwarnings("ignore::FutureWarning")
def test_onnx_one_step_graph_matches_eager(tmp_path) -> None:
    """The README's recipe. Export: one step of the LM (tokens (1, B) and each layer's (h, c)
    in; logits and the new state out) with a dynamic batch axis, by the dynamo-based exporter.
    Run: ONNX Runtime over sequences of two lengths (neither is the export length, 1) and a
    batch size other than the export's; logits within 1e-4 · max|logit| of eager (float32).

    Why one step: the C++ loops cannot be lowered, so the export runs the reference, whose
    Python time loop any exported graph holds unrolled, with the time axis fixed at the export
    length; one step, driven in a loop, serves every length (and generation)."""
    np = pytest.importorskip("numpy", reason="numpy is needed to feed ONNX Runtime")
    pytest.importorskip("onnx", reason="onnx is not installed (pip install -e '.[dev]')")
    pytest.importorskip("onnxscript", reason="onnxscript is not installed (the dev extra)")
    ort = pytest.importorskip("onnxruntime", reason="onnxruntime is not installed (dev extra)")
    model = small_lm().eval()
    layers = len(model.layers)
    path = tmp_path / "lm_step.onnx"
    batch = torch.export.Dim.DYNAMIC
    state_names = [f"{hc}{i}" for i in range(layers) for hc in ("h", "c")]
    torch.onnx.export(
        model,
        (torch.zeros(1, 2, dtype=torch.long), model.init_state(2)),
        path,
        dynamo=True,
        input_names=["tokens", *state_names],
        output_names=["logits", *(f"{n}_next" for n in state_names)],
        dynamic_shapes=({1: batch}, [({1: batch}, {1: batch})] * layers),
    )
    session = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    assert [i.name for i in session.get_inputs()] == ["tokens", *state_names]
    for steps, rows in ((6, 3), (17, 3)):
        tokens = torch.randint(0, 31, (steps, rows))
        with torch.no_grad():
            expected = model(tokens)[0].numpy()
        state = [np.zeros((1, rows, model.hidden), np.float32) for _ in state_names]
        logits = []
        for t in range(steps):
            step_logits, *state = session.run(
                None,
                dict(
                    zip(["tokens", *state_names], [tokens[t : t + 1].numpy(), *state], strict=True)
                ),
            )
            logits.append(step_logits)
        got = np.concatenate(logits)
        assert got.shape == expected.shape
        assert np.abs(got - expected).max() <= 1e-4 * np.abs(expected).max()


# --- fake kernels -----------------------------------------------------------------------------


class _RecordOps(TorchDispatchMode):
    """Records each call of an op of this package, with copies of its tensor arguments."""

    def __init__(self) -> None:
        super().__init__()
        self.calls: dict = {}

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        if func.namespace == "mogrifier_fast" and func not in self.calls:
            self.calls[func] = pytree.tree_map_only(torch.Tensor, torch.clone, args)
        return func(*args, **(kwargs or {}))


@pytest.mark.parametrize("rank", [2, None], ids=["low_rank", "dense"])
def test_cpp_ops_pass_opcheck(rank: int | None) -> None:
    """torch.library.opcheck of each C++ op on the arguments of a real call: the schema's
    mutation annotations, the fake kernels (rows_product's registered, the others derived by
    torch) against the real results' shapes and strides, and AOT dispatch (what torch.compile
    runs). Dense rounds pass None entries in chain_backward's ``Tensor(e!)?[] grad_inners``,
    which torch's auto-functionalization cannot take (AttributeError in torch 2.13): its AOT
    check runs with low-rank rounds only."""
    skip_without_cpp_loops()
    torch.manual_seed(0)
    layer = mf.MogrifierLSTM(5, 12, rounds=4, rank=rank, backend="fused")
    x = torch.randn(6, 20, 5, requires_grad=True)
    recorder = _RecordOps()
    with recorder:
        output, (_, c) = layer(x)
        (output.square().sum() + c.sum()).backward()
    ops = torch.ops.mogrifier_fast
    assert {ops.chain_forward.default, ops.chain_backward.default, ops.rows_product.default} <= set(
        recorder.calls
    )
    for op in (ops.chain_forward.default, ops.chain_backward.default, ops.rows_product.default):
        checks = ("test_schema", "test_autograd_registration", "test_faketensor")
        if rank is not None or op is not ops.chain_backward.default:
            checks = (*checks, "test_aot_dispatch_dynamic")
        torch.library.opcheck(op, recorder.calls[op], test_utils=checks)


# --- torch.compile: a training step, and warnings ------------------------------------------
#
# One fresh process (so import-time warnings count) compiles the LM on the default backend and
# runs one training step, then the same step in eager on a copy; both tests below read its
# report, so the slow part (compiling) runs once. Every warning from interpreter start, whatever
# its category (DeprecationWarning included), is recorded rather than raised: under -W error,
# torch 2.13's Dynamo fails (InternalTorchDynamoError) at any graph break that leaves a non-leaf
# tensor live, even in a model of plain torch layers, because it hides a warning of its own ("The
# .grad attribute of a Tensor that is not a leaf Tensor is being accessed") through
# warnings.showwarning, which an error filter preempts. Recording sees what would be shown: it
# catches every warning -W error would raise, save those torch hides on purpose.
COMPILED_LM = textwrap.dedent(
    """
    import json
    import warnings

    warnings.simplefilter("always")
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        import copy

        import torch
        from mogrifier_fast.lm.model import LanguageModel

        torch.manual_seed(0)
        model = LanguageModel(31, emb=8, hidden=12, layers=2, rounds=4)
        eager = copy.deepcopy(model)
        tokens, targets = torch.randint(0, 31, (5, 3)), torch.randint(0, 31, (5, 3))

        def train_step(module, params):
            optimizer = torch.optim.SGD(params, lr=0.5)
            logits, _ = module(tokens)
            loss = torch.nn.functional.cross_entropy(logits.flatten(0, 1), targets.flatten())
            loss.backward()
            optimizer.step()
            return loss.detach()

        # Compiled first, in a process where nothing ran yet: the harder case.
        loss = train_step(torch.compile(model), model.parameters())
        expected = train_step(eager, eager.parameters())
        mismatches = []
        for name, got, want in [("loss", loss, expected)] + [
            (f"{kind} of {name}", getattr(p, attr), getattr(q, attr))
            for (name, p), q in zip(model.named_parameters(), eager.parameters())
            for kind, attr in (("grad", "grad"), ("updated value", "data"))
        ]:
            try:
                torch.testing.assert_close(got, want)
            except AssertionError as error:
                mismatches.append(f"{name}: {error}")
    print(json.dumps({
        "mismatches": mismatches,
        "warnings": [f"{w.category.__name__} at {w.filename}:{w.lineno}: {w.message}"
                     for w in caught],
    }))
    """
)


@pytest.fixture(scope="module")
def compiled_lm_report() -> dict:
    skip_unless_backend("compile")  # torch.compile's own needs: a C++ compiler on CPU
    result = subprocess.run(
        [sys.executable, "-c", COMPILED_LM],
        capture_output=True,
        text=True,
        cwd=ROOT,
        timeout=300,
    )
    assert result.returncode == 0, result.stderr[-3000:]
    return json.loads(result.stdout.strip().splitlines()[-1])


def test_compiled_training_step_matches_eager(compiled_lm_report: dict) -> None:
    """torch.compile of the LM on the default backend ("auto": "fused", with its C++ loops in
    float32 on CPU where they build), one training step (forward, cross-entropy, backward, SGD
    step): eager's loss, gradients and updated parameters."""
    assert compiled_lm_report["mismatches"] == []


def test_compiled_lm_warns_nothing(compiled_lm_report: dict) -> None:
    """The same process issued not one warning, of any category: importing the package,
    compiling the LM, the compiled and the eager training step."""
    assert compiled_lm_report["warnings"] == []
