"""Test helpers: an independent oracle, random configurations, and comparisons.

The oracle computes a MogrifierLSTM's output straight from the paper's equations and the
layer's *named* parameters, without any of the package's code paths (no RoundMap, no flip, no
backend), so agreeing with it checks both the math and the parameter layout.
"""

from __future__ import annotations

import copy
import dataclasses
import random
from dataclasses import dataclass, field
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor
from torch.nn.utils.rnn import pack_padded_sequence, pack_sequence

import mogrifier_fast as mf


def rel_err(a: Tensor, b: Tensor) -> float:
    """‖a − b‖ / ‖b‖ (the README's measure of agreement), in float64; 0 when both are zero."""
    a, b = a.detach().double(), b.detach().double()
    denominator = b.norm().item()
    return (a - b).norm().item() / denominator if denominator > 0 else (a - b).norm().item()


TOLERANCE = {torch.float64: 1e-9, torch.float32: 1e-4}


def _map_weight(params: dict[str, Tensor], stem: str, suffix: str) -> Tensor:
    if f"mogrifier_weight_{stem}{suffix}" in params:
        return params[f"mogrifier_weight_{stem}{suffix}"]
    return (
        params[f"mogrifier_weight_a_{stem}{suffix}"] @ params[f"mogrifier_weight_b_{stem}{suffix}"]
    )


def oracle_forward(
    layer: mf.MogrifierLSTM,
    input: Tensor,
    hx: tuple[Tensor, Tensor] | None = None,
    dropout_seed: int | None = None,
    state_mask: Tensor | None = None,
) -> tuple[Tensor, tuple[Tensor, Tensor]]:
    """An independent per-step computation of ``layer(input, hx, state_mask=state_mask)``.

    With ``dropout_seed``, inter-layer dropout is applied to the stacked (T, N, D*H) output of
    every layer but the last, after ``torch.manual_seed(dropout_seed)``. ``state_mask`` (shaped
    as h_0) multiplies the state h that every step of each layer-direction starts from.
    """
    p = dict(layer.named_parameters())
    state_size = layer.proj_size or layer.hidden_size
    big_h, dirs, n_layers, r = (
        layer.hidden_size,
        layer.num_directions,
        layer.num_layers,
        layer.rounds,
    )
    unbatched = input.dim() == 2
    x = input[:, None] if unbatched else (input.transpose(0, 1) if layer.batch_first else input)
    steps, batch = x.shape[0], x.shape[1]
    if hx is None:
        h0 = x.new_zeros(n_layers * dirs, batch, state_size)
        c0 = x.new_zeros(n_layers * dirs, batch, big_h)
    else:
        h0, c0 = (t[:, None] if unbatched else t for t in hx)
    if state_mask is not None and unbatched:
        state_mask = state_mask[:, None]
    if dropout_seed is not None:
        torch.manual_seed(dropout_seed)
    sequence = [x[t] for t in range(steps)]
    h_n, c_n = [], []
    for layer_index in range(n_layers):
        if layer_index > 0 and dropout_seed is not None and layer.dropout > 0:
            sequence = list(
                F.dropout(torch.stack(sequence), layer.dropout, training=True).unbind(0)
            )
        per_direction = []
        for d in range(dirs):
            suffix = f"_l{layer_index}" + ("_reverse" if d else "")
            k = layer_index * dirs + d
            h, c = h0[k], c0[k]
            outputs: list[Tensor | None] = [None] * steps
            for t in reversed(range(steps)) if d else range(steps):
                xt, ht = sequence[t], h if state_mask is None else h * state_mask[k]
                for j in range(1, r + 1):
                    stem = f"r{(1 if j % 2 else 2) if layer.share_rounds else j}"
                    weight = _map_weight(p, stem, suffix)
                    bias = p.get(f"mogrifier_bias_{stem}{suffix}")
                    if j % 2:
                        pre = ht @ weight.T + (0 if bias is None else bias)
                        xt = 2 * torch.sigmoid(pre) * xt
                    else:
                        pre = xt @ weight.T + (0 if bias is None else bias)
                        ht = 2 * torch.sigmoid(pre) * ht
                gates = xt @ p[f"weight_ih{suffix}"].T + ht @ p[f"weight_hh{suffix}"].T
                if layer.bias:
                    gates = gates + p[f"bias_ih{suffix}"] + p[f"bias_hh{suffix}"]
                i, f, g, o = (gates[:, q * big_h : (q + 1) * big_h] for q in range(4))
                c = torch.sigmoid(f) * c + torch.sigmoid(i) * torch.tanh(g)
                h = torch.sigmoid(o) * torch.tanh(c)
                if layer.proj_size:
                    h = h @ p[f"weight_hr{suffix}"].T
                outputs[t] = h
            per_direction.append(outputs)
            h_n.append(h)
            c_n.append(c)
        sequence = [torch.cat([out[t] for out in per_direction], dim=-1) for t in range(steps)]
    output = torch.stack(sequence)
    h_n, c_n = torch.stack(h_n), torch.stack(c_n)
    if unbatched:
        return output[:, 0], (h_n[:, 0], c_n[:, 0])
    return (output.transpose(0, 1) if layer.batch_first else output), (h_n, c_n)


@dataclass
class Case:
    """A layer configuration and the input to run it on."""

    kwargs: dict[str, Any]
    steps: int
    batch: int
    unbatched: bool = False
    with_hx: bool = False
    seed: int = 0
    name: str = field(default="")
    # Set: a packed batch of sequences of these lengths (unsorted; steps = the longest).
    lengths: tuple[int, ...] | None = None
    # Set: the layer runs with a dropout mask on the recurrent state (see :meth:`mask`).
    masked: bool = False

    def __post_init__(self) -> None:
        if not self.name:
            shown = {k: v for k, v in self.kwargs.items() if k not in ("input_size", "hidden_size")}
            size = f"I{self.kwargs['input_size']}H{self.kwargs['hidden_size']}"
            flags = "-unbatched" if self.unbatched else f"-N{self.batch}"
            if self.lengths:
                flags = "-packed" + "_".join(map(str, self.lengths))
            flags += "-hx" if self.with_hx else ""
            flags += "-masked" if self.masked else ""
            self.name = f"{size}-T{self.steps}{flags}-" + "-".join(
                f"{k}={v}" for k, v in shown.items()
            )

    def build(
        self,
        dtype: torch.dtype = torch.float64,
        backend: str = "reference",
        device: torch.device | str = "cpu",
    ):
        """(layer, input, hx or None) on ``device``, deterministic in ``seed`` (drawn on CPU);
        input and hx require grad. A packed case's input is the padded (T, N, input_size)
        leaf; :func:`layer_input` packs it."""
        torch.manual_seed(self.seed)
        layer = mf.MogrifierLSTM(**self.kwargs, backend=backend, dtype=dtype).to(device)
        size = (self.steps, self.kwargs["input_size"])
        if not self.unbatched:
            batch_dims = (
                (self.batch, self.steps)
                if self.kwargs.get("batch_first")
                else (self.steps, self.batch)
            )
            size = (*batch_dims, self.kwargs["input_size"])
        x = torch.randn(size, dtype=dtype, requires_grad=True)
        hx = None
        if self.with_hx:
            states = self.kwargs.get("num_layers", 1) * (
                2 if self.kwargs.get("bidirectional") else 1
            )
            widths = (self.kwargs.get("proj_size") or self.kwargs["hidden_size"],)
            widths += (self.kwargs["hidden_size"],)
            hx = tuple(
                torch.randn(
                    (states, w) if self.unbatched else (states, self.batch, w),
                    dtype=dtype,
                    requires_grad=True,
                )
                for w in widths
            )
        if torch.device(device).type != "cpu":
            x = x.detach().to(device).requires_grad_()
            hx = None if hx is None else tuple(t.detach().to(device).requires_grad_() for t in hx)
        return layer, x, hx

    def mask(
        self, dtype: torch.dtype = torch.float64, device: torch.device | str = "cpu"
    ) -> Tensor | None:
        """The state mask of a masked case (None otherwise), shaped as h_0: a Bernoulli(0.6)
        mask divided by 0.6, deterministic in ``seed`` (drawn on CPU)."""
        if not self.masked:
            return None
        states = self.kwargs.get("num_layers", 1) * (2 if self.kwargs.get("bidirectional") else 1)
        width = self.kwargs.get("proj_size") or self.kwargs["hidden_size"]
        shape = (states, width) if self.unbatched else (states, self.batch, width)
        generator = torch.Generator().manual_seed(self.seed + 1)
        mask = torch.bernoulli(torch.full(shape, 0.6, dtype=torch.float64), generator=generator)
        return (mask / 0.6).to(dtype=dtype, device=device)


def random_cases(count: int, seed: int) -> list[Case]:
    """``count`` random configurations covering rounds 0..6, low rank, shared rounds, no bias,
    1-3 layers, bidirectional, batch_first, unbatched, projections, packed batches of unsorted
    lengths, with and without hx."""
    rng = random.Random(seed)
    cases = []
    for index in range(count):
        input_size, hidden_size = rng.randint(1, 9), rng.randint(1, 9)
        kwargs: dict[str, Any] = {
            "input_size": input_size,
            "hidden_size": hidden_size,
            "rounds": index % 7,
            "num_layers": rng.choice([1, 1, 2, 3]),
            "bidirectional": rng.random() < 0.4,
            "batch_first": rng.random() < 0.4,
            "bias": rng.random() < 0.8,
            "mogrifier_bias": rng.random() < 0.7,
            "share_rounds": rng.random() < 0.3,
            "rank": rng.choice([None, None, rng.randint(1, min(input_size, hidden_size))]),
        }
        if hidden_size > 1 and rng.random() < 0.25:
            kwargs["proj_size"] = rng.randint(1, hidden_size - 1)
            if kwargs["rank"] is not None:
                kwargs["rank"] = min(kwargs["rank"], kwargs["proj_size"])
        case = Case(
            kwargs,
            steps=rng.randint(1, 7),
            batch=rng.randint(1, 4),
            unbatched=rng.random() < 0.2,
            with_hx=rng.random() < 0.5,
            seed=1000 * seed + index,
        )
        if not case.unbatched and rng.random() < 0.3:
            lengths = tuple(rng.randint(1, case.steps) for _ in range(case.batch))
            case = Case(kwargs, case.steps, case.batch, False, case.with_hx, case.seed, "", lengths)
        if rng.random() < 0.25:
            case = dataclasses.replace(case, name="", masked=True)
        cases.append(case)
    return cases


def features(case: Case) -> set[str]:
    """The optional backend features (``mogrifier_fast.backends.FEATURES``) a case uses."""
    used = {"packed"} if case.lengths else set()
    used |= {"state_mask"} if case.masked else set()
    return used | ({"proj"} if case.kwargs.get("proj_size") else set())


def layer_input(x: Tensor, lengths: tuple[int, ...] | None, batch_first: bool = False):
    """The layer's input: ``x`` itself, or for a packed case the padded leaf ``x`` packed."""
    if lengths is None:
        return x
    return pack_padded_sequence(x, list(lengths), batch_first=batch_first, enforce_sorted=False)


def flat_output(output) -> Tensor:
    """The output tensor: a PackedSequence's rows."""
    return output.data if isinstance(output, torch.nn.utils.rnn.PackedSequence) else output


def grads(outputs: tuple[Tensor, ...], inputs: list[Tensor], seed: int) -> list[Tensor]:
    """Gradients of a fixed random projection of ``outputs`` with respect to ``inputs``."""
    generator = torch.Generator().manual_seed(seed)
    weights = [torch.randn(o.shape, generator=generator, dtype=torch.float64) for o in outputs]
    loss = sum((o * w.to(o.dtype)).sum() for o, w in zip(outputs, weights, strict=True))
    found = torch.autograd.grad(loss, inputs, allow_unused=True)
    return [torch.zeros_like(i) if g is None else g for i, g in zip(inputs, found, strict=True)]


def run_and_grad(
    layer, x, hx, seed: int = 7, lengths: tuple[int, ...] | None = None, state_mask=None
):
    """Flattened (output, h_n, c_n) of ``layer(x, hx)`` and gradients w.r.t. x, hx, parameters;
    with ``lengths``, of the layer on x packed (output: the packed rows); with ``state_mask``,
    of the layer run with it."""
    masked = {} if state_mask is None else {"state_mask": state_mask}
    output, (h_n, c_n) = layer(layer_input(x, lengths, layer.batch_first), hx, **masked)
    output = flat_output(output)
    leaves = [x, *(hx or ()), *layer.parameters()]
    return (output, h_n, c_n), grads((output, h_n, c_n), leaves, seed)


def oracle_and_grad(
    layer, x, hx, seed: int = 7, lengths: tuple[int, ...] | None = None, state_mask=None
):
    """As :func:`run_and_grad`, computed by :func:`oracle_forward` in float64; a packed batch
    sequence by sequence (each alone, its own length), packed by torch's own utility."""
    layer64 = copy.deepcopy(layer).double()
    x64 = x.detach().double().requires_grad_()
    hx64 = None if hx is None else tuple(t.detach().double().requires_grad_() for t in hx)
    mask64 = None if state_mask is None else state_mask.detach().double()
    if lengths is None:
        output, (h_n, c_n) = oracle_forward(layer64, x64, hx64, state_mask=mask64)
    else:
        steps_first = x64.transpose(0, 1) if layer.batch_first else x64
        alone = copy.deepcopy(layer64)
        alone.batch_first = False
        runs = [
            oracle_forward(
                alone,
                steps_first[:length, b : b + 1],
                None if hx64 is None else tuple(t[:, b : b + 1] for t in hx64),
                state_mask=None if mask64 is None else mask64[:, b : b + 1],
            )
            for b, length in enumerate(lengths)
        ]
        output = pack_sequence([out[:, 0] for out, _ in runs], enforce_sorted=False).data
        h_n = torch.cat([h for _, (h, _) in runs], dim=1)
        c_n = torch.cat([c for _, (_, c) in runs], dim=1)
        layer64 = alone
    leaves = [x64, *(hx64 or ()), *layer64.parameters()]
    return (output, h_n, c_n), grads((output, h_n, c_n), leaves, seed)
