"""Backend "fused": each of its execution paths against the oracle, and autograd behaviour."""

from __future__ import annotations

import logging
import os
import shutil
import sysconfig
from fnmatch import fnmatch

import pytest
import torch

import mogrifier_fast as mf
import mogrifier_fast.layer as layer_module
from mogrifier_fast.backends import fused, fused_chain, resolve
from tests.helpers import Case, random_cases, rel_err, run_and_grad
from tests.test_backends import (
    FEATURE_CASES,
    check_against_oracle,
    check_inference_against_oracle,
)

PATH_CASES = FEATURE_CASES + random_cases(6, seed=7)


@pytest.mark.parametrize("pack", [False, True], ids=["onednn-plain", "onednn-packed"])
@pytest.mark.parametrize("case", PATH_CASES, ids=lambda c: c.name)
def test_onednn_products(monkeypatch, case: Case, pack: bool) -> None:
    """Every per-step product through oneDNN (packed or not), as large shapes run."""
    if not fused.onednn_linear_available():
        pytest.skip("oneDNN's linear does not run on this machine")
    monkeypatch.setattr(fused_chain, "usable", lambda x: False)  # the Python loops
    monkeypatch.setattr(fused, "ONEDNN_MIN_MACS", 0)
    monkeypatch.setattr(fused, "ONEDNN_PACK_MACS", 0 if pack else 1 << 62)
    check_against_oracle("fused", case, torch.float32)


@pytest.mark.parametrize("case", PATH_CASES, ids=lambda c: c.name)
def test_backward_in_many_chunks(monkeypatch, case: Case) -> None:
    """The backward prepares its factors chunk by chunk; one step per chunk must agree too."""
    monkeypatch.setattr(fused, "CHUNK_BYTES", 1)
    check_against_oracle("fused", case, torch.float64)


@pytest.mark.parametrize("case", PATH_CASES, ids=lambda c: c.name)
def test_python_loops_in_float32(monkeypatch, case: Case) -> None:
    """Where the C++ loops cannot be built, float32 runs the Python loops (plain addmm here)."""
    monkeypatch.setattr(fused_chain, "usable", lambda x: False)
    check_against_oracle("fused", case, torch.float32)
    check_inference_against_oracle("fused", case, torch.float32)


def test_cpp_loops_are_built_where_a_compiler_is() -> None:
    """On a machine with a C++ compiler, float32 on CPU runs the C++ loops (so the float32
    checks of test_backends.py test them); the build failing there is a defect."""
    compiler = shutil.which(os.environ.get("CXX", "c++"))
    if compiler is None:
        pytest.skip("no C++ compiler here: 'fused' runs its Python loops")
    assert fused_chain.unavailable_reason() is None
    assert fused_chain.usable(torch.zeros(1))
    assert not fused_chain.usable(torch.zeros(1, dtype=torch.float64))


def skip_without_cpp_loops() -> None:
    if not fused_chain.usable(torch.zeros(1)):
        pytest.skip(f"C++ loops not built here: {fused_chain.unavailable_reason()}")


def native_variants() -> list:
    """Every instruction-set variant of the C++ loops this CPU runs, as test parameters (one
    skipped parameter, with the reason, where the loops are not built)."""
    if not fused_chain.usable(torch.zeros(1)):
        reason = f"C++ loops not built here: {fused_chain.unavailable_reason()}"
        return [pytest.param("none", marks=pytest.mark.skip(reason=reason))]
    return fused_chain.runnable_isas()


VARIANTS = native_variants()


def test_every_compiled_variant_is_reported() -> None:
    """The variants this CPU cannot run are named, so the suite says what it did not test."""
    skip_without_cpp_loops()
    runnable, compiled = fused_chain.runnable_isas(), fused_chain.compiled_isas()
    assert runnable and set(runnable) <= set(compiled) and "generic" in runnable
    missing = [name for name in compiled if name not in runnable]
    assert fused_chain.unrunnable_isas() == missing
    assert fused_chain.variants() == [*runnable, "python"]
    refused = pytest.raises(ValueError, match=r"variant: 'sse9' does not run here; expected one")
    with refused, fused_chain.variant("sse9"):
        pass
    print(f"variants run here: {runnable}; compiled but not run (CPU lacks them): {missing}")


NATIVE_CASES = [
    *PATH_CASES,
    # Rows past a register tile with a tail, widths past one and two panels with tails, a low
    # rank past one panel, and a batch of one.
    Case({"input_size": 37, "hidden_size": 50, "rounds": 5, "rank": 19}, steps=4, batch=19),
    Case({"input_size": 33, "hidden_size": 16, "rounds": 4}, steps=3, batch=8),
    Case({"input_size": 64, "hidden_size": 48, "rounds": 1}, steps=5, batch=1),
    # A packed batch whose rows run from 1 to 6 steps: row blocks shared out by their steps.
    Case(
        {"input_size": 21, "hidden_size": 30, "rounds": 4, "bidirectional": True},
        steps=6,
        batch=17,
        with_hx=True,
        lengths=(6, 1, 3, 6, 2, 5, 4, 6, 1, 1, 2, 3, 6, 5, 4, 2, 6),
    ),
]


# (threads, split_rows): columns shared by 1-3 threads, or rows split over 2-3.
PLANS = [(1, False), (2, False), (3, False), (2, True), (3, True)]


def force_variant(monkeypatch, isa: str, packed: bool | None = None) -> None:
    monkeypatch.setattr(fused_chain, "isa", lambda: isa)
    if packed is not None:  # packed panels, or weights read in place, whatever the sizes
        monkeypatch.setattr(fused_chain, "packs", lambda *sizes: packed)


def force_plan(monkeypatch, threads: int, split_rows: bool) -> None:
    monkeypatch.setattr(fused_chain, "plan", lambda *sizes: (threads, split_rows))
    monkeypatch.setattr(fused_chain, "threads_for", lambda macs: threads)


@pytest.mark.parametrize("packed", [True, False], ids=["packed", "in-place"])
@pytest.mark.parametrize("isa", VARIANTS)
@pytest.mark.parametrize("case", NATIVE_CASES, ids=lambda c: c.name)
def test_cpp_loops_match_the_oracle(monkeypatch, case: Case, isa: str, packed: bool) -> None:
    """Every variant, with packed weights or weights read where they are, training and the
    no_grad path that keeps one block of buffers."""
    force_variant(monkeypatch, isa, packed)
    check_against_oracle("fused", case, torch.float32)
    check_inference_against_oracle("fused", case, torch.float32)


@pytest.mark.parametrize("packed", [True, False], ids=["packed", "in-place"])
@pytest.mark.parametrize("isa", VARIANTS)
@pytest.mark.parametrize(("threads", "split_rows"), PLANS, ids=lambda p: str(p))
@pytest.mark.parametrize("case", NATIVE_CASES[-3:], ids=lambda c: c.name)
def test_cpp_loops_on_any_number_of_threads(
    monkeypatch, case: Case, threads: int, split_rows: bool, isa: str, packed: bool
) -> None:
    """Every product's columns split over a team, or the batch rows (some threads get no
    columns, or no rows: barriers still meet)."""
    force_variant(monkeypatch, isa, packed)
    force_plan(monkeypatch, threads, split_rows)
    check_against_oracle("fused", case, torch.float32)
    check_inference_against_oracle("fused", case, torch.float32)


@pytest.mark.parametrize("packed", [True, False], ids=["packed", "in-place"])
@pytest.mark.parametrize("isa", VARIANTS)
def test_cpp_loops_give_the_same_bits_on_any_number_of_threads(
    monkeypatch, isa: str, packed: bool
) -> None:
    """Each output element is computed by one thread in a fixed order: no dependence on the
    team size (torch.set_num_threads) or on how work is split, forward or backward."""
    force_variant(monkeypatch, isa, packed)
    case = Case({"input_size": 37, "hidden_size": 50, "rounds": 5, "rank": 19}, steps=4, batch=19)
    results = []
    for threads, split_rows in PLANS:
        force_plan(monkeypatch, threads, split_rows)
        layer, x, hx = case.build(dtype=torch.float32, backend="fused", device="cpu")
        outputs, gradients = run_and_grad(layer, x, hx)
        results.append([*outputs, *gradients])
    for other in results[1:]:
        for a, b in zip(results[0], other, strict=True):
            assert torch.equal(a, b)


@pytest.mark.parametrize("isa", VARIANTS)
@pytest.mark.parametrize("threads", [1, 3])
@pytest.mark.parametrize(("rows", "m", "n"), [(1, 3, 5), (300, 37, 13), (257, 16, 32), (40, 9, 84)])
def test_cpp_weight_gradient_product(rows: int, m: int, n: int, threads: int, isa: str) -> None:
    """scale · a^T b over all rows, b read in place as a view that ends where its storage does
    (a width that is not a multiple of the vector width must not read past it), against
    float64 torch."""
    a = torch.randn(rows, m)
    b = torch.randn(rows, n + 7)[:, 7:]  # rows n + 7 apart, the last one at the end
    got = torch.ops.mogrifier_fast.rows_product(isa, a, b, 0.25, threads)
    want = 0.25 * a.double().t() @ b.double()
    assert got.shape == (m, n)
    assert rel_err(got.double(), want) <= 1e-6


def test_isa_variable_selects_and_refuses(monkeypatch) -> None:
    """MOGRIFIER_ISA picks a variant this CPU runs; one it cannot run, or an unknown name, is
    refused with the choices named."""
    skip_without_cpp_loops()
    runnable, compiled = fused_chain.runnable_isas(), fused_chain.compiled_isas()
    monkeypatch.delenv(fused_chain.ISA_VARIABLE, raising=False)
    assert fused_chain.isa() == runnable[0]
    monkeypatch.setenv(fused_chain.ISA_VARIABLE, "generic")
    assert fused_chain.isa() == "generic"
    monkeypatch.setenv(fused_chain.ISA_VARIABLE, "sse9")
    with pytest.raises(ValueError, match=r"MOGRIFIER_ISA='sse9': no such variant; expected one of"):
        fused_chain.isa()
    for name in compiled:
        if name not in runnable:
            monkeypatch.setenv(fused_chain.ISA_VARIABLE, name)
            with pytest.raises(ValueError, match="this CPU lacks its instructions"):
                fused_chain.isa()


def test_ninja_found_among_this_interpreters_scripts(monkeypatch, tmp_path) -> None:
    """In a virtual environment that was not activated, the ninja package's binary is not on
    PATH; the build looks for it beside the interpreter's other scripts."""
    scripts = tmp_path / "scripts"
    scripts.mkdir()
    (scripts / "ninja").write_text("#!/bin/sh\n")
    (scripts / "ninja").chmod(0o755)
    monkeypatch.setattr(sysconfig, "get_path", lambda name: str(scripts))
    monkeypatch.setenv("PATH", str(tmp_path / "elsewhere"))
    fused_chain._ninja_on_path()
    assert shutil.which("ninja") == str(scripts / "ninja")


def test_failed_build_falls_back_with_one_warning(monkeypatch, caplog) -> None:
    monkeypatch.setattr(fused_chain, "SOURCES", ["missing.cpp"])
    fused_chain.unavailable_reason.cache_clear()
    try:
        with caplog.at_level(logging.WARNING, logger="mogrifier_fast"):
            reason = fused_chain.unavailable_reason()
            assert fused_chain.unavailable_reason() == reason  # decided once
        assert reason is not None and "could not build" in reason and "missing.cpp" in reason
        assert not fused_chain.usable(torch.zeros(1))
        assert [r.getMessage() for r in caplog.records] == [
            f"backend 'fused' runs its Python loops: {reason}"
        ]
        check_against_oracle("fused", PATH_CASES[1], torch.float32)
    finally:
        fused_chain.unavailable_reason.cache_clear()


def test_auto_is_fused_on_cpu() -> None:
    assert resolve("auto", torch.device("cpu")).name == "fused"


def test_backward_twice_with_retain_graph() -> None:
    layer = mf.MogrifierLSTM(3, 4, rounds=3, backend="fused", dtype=torch.float64)
    out, _ = layer(torch.randn(5, 2, 3, dtype=torch.float64))
    out.sum().backward(retain_graph=True)
    once = layer.weight_hh_l0.grad.clone()
    out.sum().backward()
    torch.testing.assert_close(layer.weight_hh_l0.grad, 2 * once)


def test_weight_modified_in_place_after_forward_is_detected() -> None:
    layer = mf.MogrifierLSTM(3, 4, rounds=3, backend="fused")
    out, _ = layer(torch.randn(5, 2, 3))
    with torch.no_grad():
        layer.mogrifier_weight_r1_l0.mul_(2)
    with pytest.raises(RuntimeError, match="modified by an inplace operation"):
        out.sum().backward()


def test_only_outputs_that_are_used_need_gradients() -> None:
    """Gradients flowing only from h_n (or only from c_n) match the oracle's."""
    case = Case({"input_size": 3, "hidden_size": 4, "rounds": 4, "num_layers": 2}, steps=4, batch=2)
    for pick in (lambda out, h, c: h.sum(), lambda out, h, c: c.sum()):
        grads = []
        for backend in ("fused", "reference"):
            layer, x, _ = case.build(backend=backend)
            out, (h, c) = layer(x)
            grads.append(torch.autograd.grad(pick(out, h, c), [x, *layer.parameters()]))
        for got, want in zip(*grads, strict=True):
            torch.testing.assert_close(got, want, rtol=1e-10, atol=1e-12)


CELL_OPTIONS = [
    {"rounds": 0},
    {"rounds": 1},
    {"rounds": 4, "rank": 3},
    {"rounds": 5},
    {"rounds": 5, "share_rounds": True, "bias": False, "mogrifier_bias": False},
]


@pytest.mark.parametrize("isa", VARIANTS)
@pytest.mark.parametrize("options", CELL_OPTIONS, ids=str)
def test_cell_runs_the_cpp_step(monkeypatch, options: dict, isa: str) -> None:
    """MogrifierLSTMCell in float32 on CPU runs the C++ step; outputs and every gradient match
    the plain-torch step in float64, batched and unbatched."""
    force_variant(monkeypatch, isa)
    calls = []
    monkeypatch.setattr(
        layer_module, "run_fused", lambda *args: calls.append(1) or fused.run_fused(*args)
    )
    torch.manual_seed(3)
    cell = mf.MogrifierLSTMCell(7, 10, **options)
    exact = mf.MogrifierLSTMCell(7, 10, **options, dtype=torch.float64)
    exact.load_state_dict({k: v.double() for k, v in cell.state_dict().items()})
    for shape in [(5,), ()]:
        x, h0, c0 = torch.randn(*shape, 7), torch.randn(*shape, 10), torch.randn(*shape, 10)
        inputs = [t.requires_grad_() for t in (x, h0, c0)]
        exact_inputs = [t.detach().double().requires_grad_() for t in (x, h0, c0)]
        want = exact(exact_inputs[0], tuple(exact_inputs[1:]))  # float64: plain torch
        got = cell(inputs[0], tuple(inputs[1:]))
        weights = [torch.randn_like(w) for w in want]
        got_grads = torch.autograd.grad(got, [*inputs, *cell.parameters()], weights)
        want_grads = torch.autograd.grad(
            want, [*exact_inputs, *exact.parameters()], [w.double() for w in weights]
        )
        for a, b in zip([*got, *got_grads], [*want, *want_grads], strict=True):
            assert a.shape == b.shape and rel_err(a.double(), b) <= 1e-4
    assert len(calls) == 2


def test_build_command_reports_the_variants(capsys) -> None:
    skip_without_cpp_loops()
    from mogrifier_fast import build

    assert build.main() == 0
    out = capsys.readouterr().out
    assert "C++ loops already built" in out
    assert f"this CPU runs: {', '.join(fused_chain.runnable_isas())}" in out


def test_first_build_says_so_once_on_stderr(monkeypatch, tmp_path, capsys) -> None:
    """A build (not a load from the cache) starts with one line on stderr, not a warning."""
    from torch.utils import cpp_extension

    monkeypatch.setattr(cpp_extension, "_get_build_directory", lambda name, verbose: str(tmp_path))
    monkeypatch.setattr(cpp_extension, "load", lambda **kwargs: None)
    assert fused_chain.build() is not None
    err = capsys.readouterr().err.splitlines()
    assert len(err) == 1 and "building the C++ loops" in err[0]
    assert "python -m mogrifier_fast.build" in err[0]
    (tmp_path / f"{fused_chain._build_name()}.so").touch()
    assert fused_chain.build() is None
    assert capsys.readouterr().err == ""


def test_every_cpp_file_is_shipped_in_the_package() -> None:
    """The sources and headers the build reads are package data (a wheel without a header could
    never build the loops), and nothing in csrc/ is left out of the build's name."""
    tomllib = pytest.importorskip("tomllib", reason="reading pyproject.toml needs Python 3.11")
    root = fused_chain.SOURCE_DIR.parent.parent
    with open(root / "pyproject.toml", "rb") as file:
        patterns = tomllib.load(file)["tool"]["setuptools"]["package-data"]["mogrifier_fast"]
    names = fused_chain.SOURCES + fused_chain.HEADERS
    assert sorted(names) == sorted(p.name for p in fused_chain.SOURCE_DIR.iterdir())
    for name in names:
        assert any(fnmatch(f"csrc/{name}", pattern) for pattern in patterns), name
