"""Backend "fused": each of its execution paths against the oracle, and autograd behaviour."""

from __future__ import annotations

import pytest
import torch

import mogrifier_fast as mf
from mogrifier_fast.backends import fused, resolve
from tests.helpers import Case, random_cases
from tests.test_backends import FEATURE_CASES, check_against_oracle

PATH_CASES = FEATURE_CASES + random_cases(6, seed=7)


@pytest.mark.parametrize("pack", [False, True], ids=["onednn-plain", "onednn-packed"])
@pytest.mark.parametrize("case", PATH_CASES, ids=lambda c: c.name)
def test_onednn_products(monkeypatch, case: Case, pack: bool) -> None:
    """Every per-step product through oneDNN (packed or not), as large shapes run."""
    if not fused.onednn_linear_available():
        pytest.skip("oneDNN's linear does not run on this machine")
    monkeypatch.setattr(fused, "ONEDNN_MIN_MACS", 0)
    monkeypatch.setattr(fused, "ONEDNN_PACK_MACS", 0 if pack else 1 << 62)
    check_against_oracle("fused", case, torch.float32)


@pytest.mark.parametrize("case", PATH_CASES, ids=lambda c: c.name)
def test_backward_in_many_chunks(monkeypatch, case: Case) -> None:
    """The backward prepares its factors chunk by chunk; one step per chunk must agree too."""
    monkeypatch.setattr(fused, "CHUNK_BYTES", 1)
    check_against_oracle("fused", case, torch.float64)


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
