"""``MogrifierLSTM`` and ``MogrifierLSTMCell``: parameters, input checks and backend dispatch.

Parameter names follow ``nn.LSTM`` (``weight_ih_l0``, ``bias_hh_l1_reverse``, ...; the cell's
``weight_ih`` ...). Each round j's mogrifier map adds ``mogrifier_weight_r{j}{suffix}`` (dense)
or ``mogrifier_weight_a_r{j}{suffix}`` (out, k) and ``mogrifier_weight_b_r{j}{suffix}`` (k, in)
(low rank), and ``mogrifier_bias_r{j}{suffix}``, with the same suffix as the LSTM weights of that
layer and direction. With ``share_rounds=True`` only rounds 1 (the x map) and 2 (the h map) have
parameters, reused by every later round of the same parity.
"""

from __future__ import annotations

import math
import warnings
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn
from torch.nn.utils.rnn import PackedSequence

from mogrifier_fast import backends
from mogrifier_fast.backends import fused_chain
from mogrifier_fast.backends.fused import run_fused
from mogrifier_fast.backends.layout import StepRows
from mogrifier_fast.mogrify import LayerParams, RoundMap, Sequence, State, mogrifier_lstm_step

_LSTM_NAMES = ("weight_ih", "weight_hh", "bias_ih", "bias_hh")


def _check_int(name: str, value: Any, minimum: int) -> None:
    if isinstance(value, bool) or not isinstance(value, int):
        raise TypeError(f"{name}: expected an int, got {type(value).__name__} {value!r}")
    if value < minimum:
        raise ValueError(f"{name}: expected an int >= {minimum}, got {value}")


def _describe(t: Tensor) -> str:
    return f"shape {tuple(t.shape)}, dtype {t.dtype}, device {t.device}"


class _MogrifierBase(nn.Module):
    """What the layer and the cell share: checking the mogrifier options, creating,
    initialising and gathering the parameters of one direction of one layer."""

    proj_size = 0  # the cell has no projection; the layer sets its own

    def _init_options(
        self,
        input_size: int,
        hidden_size: int,
        bias: bool,
        rounds: int,
        rank: int | None,
        share_rounds: bool,
        mogrifier_bias: bool,
    ) -> None:
        _check_int("input_size", input_size, 1)
        _check_int("hidden_size", hidden_size, 1)
        _check_int("rounds", rounds, 0)
        if rank is not None:
            _check_int("rank", rank, 1)
            if rank > min(input_size, hidden_size):
                raise ValueError(
                    f"rank: expected None (full rank) or an int in 1..min(input_size, hidden_size)"
                    f" = 1..{min(input_size, hidden_size)}, got {rank}"
                )
        self.input_size = input_size
        self.hidden_size = hidden_size
        self.bias = bool(bias)
        self.rounds = rounds
        self.rank = rank
        self.share_rounds = bool(share_rounds)
        self.mogrifier_bias = bool(mogrifier_bias)

    def _stored_rounds(self) -> range:
        """The rounds j (1-based) that own parameters."""
        return range(1, (min(self.rounds, 2) if self.share_rounds else self.rounds) + 1)

    @property
    def _state_size(self) -> int:
        """P, the width of the hidden state: proj_size with a projection, else hidden_size."""
        return self.proj_size or self.hidden_size

    def _add_direction(self, suffix: str, x_size: int, factory: dict[str, Any]) -> None:
        """Register the LSTM and mogrifier parameters of one direction of one layer."""
        h_size, gates = self._state_size, 4 * self.hidden_size
        shapes = [(gates, x_size), (gates, h_size)] + ([(gates,), (gates,)] if self.bias else [])
        for name, shape in zip(_LSTM_NAMES, shapes, strict=False):
            self.register_parameter(name + suffix, nn.Parameter(torch.empty(shape, **factory)))
        if self.proj_size:
            projection = torch.empty(self.proj_size, self.hidden_size, **factory)
            self.register_parameter("weight_hr" + suffix, nn.Parameter(projection))
        for j in self._stored_rounds():
            out_size, in_size = (x_size, h_size) if j % 2 else (h_size, x_size)
            if self.rank is None:
                factors = {"mogrifier_weight": (out_size, in_size)}
            else:
                factors = {
                    "mogrifier_weight_a": (out_size, self.rank),
                    "mogrifier_weight_b": (self.rank, in_size),
                }
            if self.mogrifier_bias:
                factors["mogrifier_bias"] = (out_size,)
            for name, shape in factors.items():
                param = nn.Parameter(torch.empty(shape, **factory))
                self.register_parameter(f"{name}_r{j}{suffix}", param)

    def _direction_params(self, suffix: str) -> LayerParams:
        """Gather one direction's parameters in the form every backend takes. Read through
        attribute access, so parametrizations (``torch.nn.utils.parametrize``) apply."""

        def get(name: str) -> Tensor | None:
            return getattr(self, name, None)

        stored: list[RoundMap] = []
        for j in self._stored_rounds():
            if self.rank is None:
                factors = (get(f"mogrifier_weight_r{j}{suffix}"),)
            else:
                factors = (
                    get(f"mogrifier_weight_a_r{j}{suffix}"),
                    get(f"mogrifier_weight_b_r{j}{suffix}"),
                )
            stored.append(RoundMap(factors, get(f"mogrifier_bias_r{j}{suffix}")))
        map_of_round = tuple((j - 1) % len(stored) for j in range(1, self.rounds + 1))
        w_ih, w_hh, b_ih, b_hh = (get(name + suffix) for name in _LSTM_NAMES)
        return LayerParams(
            w_ih, w_hh, b_ih, b_hh, tuple(stored), map_of_round, get("weight_hr" + suffix)
        )

    @torch.no_grad()
    def reset_parameters(self) -> None:
        """LSTM weights as ``nn.LSTM`` (uniform in ±1/sqrt(hidden_size)); mogrifier maps as the
        official code: fan_in = the map's input size, full rank normal with std 1/sqrt(fan_in)
        truncated at two standard deviations, low-rank factors each with std (1/(fan_in k))^(1/4)
        so their product has variance 1/fan_in; mogrifier biases zero."""
        bound = 1.0 / math.sqrt(self.hidden_size)
        for name, param in self.named_parameters(recurse=False):
            if name.startswith("mogrifier_bias"):
                nn.init.zeros_(param)
            elif name.startswith("mogrifier_weight_a"):
                pass  # initialised with its partner b below, which knows fan_in
            elif name.startswith("mogrifier_weight_b"):
                rank, fan_in = param.shape
                std = (1.0 / (fan_in * rank)) ** 0.25
                for factor in (param, self.get_parameter(name.replace("_b_", "_a_", 1))):
                    nn.init.trunc_normal_(factor, std=std, a=-2 * std, b=2 * std)
            elif name.startswith("mogrifier_weight"):
                std = 1.0 / math.sqrt(param.shape[1])
                nn.init.trunc_normal_(param, std=std, a=-2 * std, b=2 * std)
            else:
                nn.init.uniform_(param, -bound, bound)

    def _mogrifier_extra_repr(self) -> str:
        s = f"rounds={self.rounds}"
        if self.rank is not None:
            s += f", rank={self.rank}"
        if self.share_rounds:
            s += ", share_rounds=True"
        if not self.mogrifier_bias:
            s += ", mogrifier_bias=False"
        return s

    @staticmethod
    def _effective_maps(params: LayerParams) -> list[tuple[Tensor, Tensor | None]]:
        return [(m.weight(), m.bias) for m in params.round_maps]

    def _check_state(
        self, hx: Any, shape: tuple[int, ...], h_shape: tuple[int, ...] | None = None
    ) -> tuple[Tensor, Tensor]:
        """``hx`` must be a pair (h_0, c_0) of tensors matching the parameters, c_0 of ``shape``
        and h_0 of ``h_shape`` (``shape`` when None)."""
        if not isinstance(hx, tuple | list) or len(hx) != 2:
            raise TypeError(
                f"hx: expected a tuple (h_0, c_0) of two tensors, got {type(hx).__name__}"
            )
        shapes = (h_shape or shape, shape)
        for name, t, expected in zip(("hx[0] (h_0)", "hx[1] (c_0)"), hx, shapes, strict=True):
            self._check_tensor_matches(name, t)
            if tuple(t.shape) != expected:
                raise ValueError(f"{name}: expected shape {expected}, got {tuple(t.shape)}")
        return hx[0], hx[1]

    def _check_tensor_matches(self, name: str, t: Tensor) -> None:
        """dtype and device of ``t`` must be the parameters'."""
        reference = self.weight_ih_l0 if hasattr(self, "weight_ih_l0") else self.weight_ih
        if not isinstance(t, Tensor):
            raise TypeError(f"{name}: expected a Tensor, got {type(t).__name__}")
        if t.dtype != reference.dtype:
            raise TypeError(
                f"{name}: dtype {t.dtype} does not match the parameters' dtype {reference.dtype}; "
                f"convert the module with .to({t.dtype}) or the tensor with .to({reference.dtype})"
            )
        if t.device != reference.device:
            raise ValueError(
                f"{name}: device {t.device} does not match the parameters' device "
                f"{reference.device}; move one of them with .to(...)"
            )


class MogrifierLSTM(_MogrifierBase):
    """A multi-layer Mogrifier LSTM with ``nn.LSTM``'s interface, parameters and semantics.

    Before each LSTM step the input x_t and previous hidden state h gate each other for
    ``rounds`` rounds (see :mod:`mogrifier_fast.mogrify`); ``rounds=0`` is exactly ``nn.LSTM``.

    Args:
        input_size, hidden_size, num_layers, bias, batch_first, dropout, bidirectional,
            proj_size, device, dtype: as ``nn.LSTM``.
        rounds: mogrifier rounds r >= 0 (the paper tunes 5 or 6).
        rank: None for full-rank maps, else k in 1..min(input_size, hidden_size): each map is
            the product of an (out, k) and a (k, in) factor.
        share_rounds: one map for all x-rounds and one for all h-rounds.
        mogrifier_bias: a bias in each map (the official code's; the paper's equations have none).
        backend: "auto" or a name from :func:`mogrifier_fast.available_backends`.

    Shapes (L = num_layers, D = 2 if bidirectional else 1, N = batch, P = proj_size or
    hidden_size):
        input: (T, N, input_size), (N, T, input_size) if batch_first, unbatched
            (T, input_size), or a PackedSequence.
        hx: optional (h_0, c_0): h_0 (D*L, N, P), c_0 (D*L, N, hidden_size), without N
            unbatched; zeros when omitted.
        state_mask: optional keyword, shaped as h_0: every step of layer-direction k reads its
            hidden state times ``state_mask[k]`` (h_0 included): variational dropout on the
            recurrent state inside the recurrence, e.g. a Bernoulli(1 - p) mask divided by
            1 - p, drawn once per sequence. Outputs and h_n are not masked; the mask is a
            constant (no gradient flows to it). Backends "reference", "fused", "compile" and
            "script" support it ("auto" picks one that does).
        Returns output (T, N, D*P) (batch first if batch_first; a PackedSequence for one),
        and (h_n, c_n) shaped as (h_0, c_0).
    """

    def __init__(
        self,
        input_size: int,
        hidden_size: int,
        num_layers: int = 1,
        bias: bool = True,
        batch_first: bool = False,
        dropout: float = 0.0,
        bidirectional: bool = False,
        rounds: int = 5,
        rank: int | None = None,
        share_rounds: bool = False,
        mogrifier_bias: bool = True,
        backend: str = "auto",
        device: torch.device | str | None = None,
        dtype: torch.dtype | None = None,
        proj_size: int = 0,
    ) -> None:
        super().__init__()
        self._init_options(
            input_size, hidden_size, bias, rounds, rank, share_rounds, mogrifier_bias
        )
        _check_int("num_layers", num_layers, 1)
        if (
            isinstance(dropout, bool)
            or not isinstance(dropout, int | float)
            or not 0 <= dropout <= 1
        ):
            raise ValueError(f"dropout: expected a number in [0, 1], got {dropout!r}")
        _check_int("proj_size", proj_size, 0)
        if proj_size >= hidden_size:
            raise ValueError(
                f"proj_size: expected 0 (no projection) or an int in 1..hidden_size - 1 = "
                f"1..{hidden_size - 1}, got {proj_size}"
            )
        if proj_size and rank is not None and rank > min(input_size, proj_size):
            raise ValueError(
                f"rank: with proj_size the maps are (input_size, proj_size) and back: expected "
                f"None or an int in 1..min(input_size, proj_size) = "
                f"1..{min(input_size, proj_size)}, got {rank}"
            )
        if dropout > 0 and num_layers == 1:
            warnings.warn(
                "dropout option adds dropout after all but last recurrent layer, so non-zero "
                f"dropout expects num_layers greater than 1, but got dropout={dropout} and "
                f"num_layers={num_layers}",
                stacklevel=2,
            )
        self.num_layers = num_layers
        self.batch_first = bool(batch_first)
        self.dropout = float(dropout)
        self.bidirectional = bool(bidirectional)
        self.proj_size = proj_size
        self.backend = backend
        factory = {"device": device, "dtype": dtype}
        for layer in range(num_layers):
            x_size = input_size if layer == 0 else self._state_size * self.num_directions
            for suffix in self._suffixes(layer):
                self._add_direction(suffix, x_size, factory)
        self.reset_parameters()

    @property
    def backend(self) -> str:
        """The requested backend name ("auto" or a name from ``available_backends``)."""
        return self._backend

    @backend.setter
    def backend(self, name: str) -> None:
        backends.check_backend_name(name)
        backends.check_features(name, {"proj"} if self.proj_size else set())
        self._backend = name

    @property
    def num_directions(self) -> int:
        return 2 if self.bidirectional else 1

    def _suffixes(self, layer: int) -> list[str]:
        return [f"_l{layer}", f"_l{layer}_reverse"][: self.num_directions]

    def _check_layer_index(self, k: int) -> str:
        count = self.num_layers * self.num_directions
        if isinstance(k, bool) or not isinstance(k, int) or not 0 <= k < count:
            raise ValueError(
                f"k: expected a layer index in 0..{count - 1} (directions count), got {k!r}"
            )
        return self._suffixes(k // self.num_directions)[k % self.num_directions]

    def layer_params(self, k: int) -> LayerParams:
        """The parameters of layer-direction ``k`` (layer i reverse is 2i+1 when bidirectional)."""
        return self._direction_params(self._check_layer_index(k))

    def mogrifier_weights(self, k: int = 0) -> list[tuple[Tensor, Tensor | None]]:
        """One (weight, bias or None) per round of layer-direction ``k``, in order: the effective
        dense map (A @ B when low rank), computed differentiably from the parameters."""
        return self._effective_maps(self.layer_params(k))

    def flatten_parameters(self) -> None:
        """A no-op, so code written for ``nn.LSTM`` runs unchanged."""

    def extra_repr(self) -> str:
        s = f"{self.input_size}, {self.hidden_size}"
        if self.num_layers != 1:
            s += f", num_layers={self.num_layers}"
        if not self.bias:
            s += ", bias=False"
        if self.batch_first:
            s += ", batch_first=True"
        if self.dropout:
            s += f", dropout={self.dropout}"
        if self.bidirectional:
            s += ", bidirectional=True"
        if self.proj_size:
            s += f", proj_size={self.proj_size}"
        return f"{s}, {self._mogrifier_extra_repr()}, backend={self.backend!r}"

    def _check_input(self, input: Tensor | PackedSequence) -> tuple[Sequence, bool]:
        """The input as a :class:`Sequence` ((T, N, input_size), or a packed batch's rows) and
        whether it was batched."""
        if isinstance(input, PackedSequence):
            self._check_tensor_matches("input.data", input.data)
            if input.data.dim() != 2 or input.data.shape[-1] != self.input_size:
                raise ValueError(
                    f"input.data: expected a packed (sum of lengths, input_size) tensor with "
                    f"input_size={self.input_size}, got shape {tuple(input.data.shape)}"
                )
            return Sequence(input.data, tuple(input.batch_sizes.tolist())), True
        self._check_tensor_matches("input", input)
        layout = "(N, T, input_size)" if self.batch_first else "(T, N, input_size)"
        if input.dim() not in (2, 3) or input.shape[-1] != self.input_size:
            raise ValueError(
                f"input: expected a 3-D tensor {layout}, an unbatched 2-D tensor "
                f"(T, input_size) with input_size={self.input_size}, or a PackedSequence, got "
                f"shape {tuple(input.shape)}"
            )
        batched = input.dim() == 3
        x = input if batched else input.unsqueeze(1)
        if batched and self.batch_first:
            x = x.transpose(0, 1)
        if x.shape[0] == 0:
            raise ValueError(
                f"input: expected a sequence length >= 1, got shape {tuple(input.shape)}"
            )
        return Sequence(x), batched

    def _check_hx(self, hx: Any, seq: Sequence, batched: bool) -> tuple[Tensor, Tensor]:
        """Return (h_0, c_0), (D*L, N, P) and (D*L, N, H), zeros when ``hx`` is None."""
        states, batch = self.num_layers * self.num_directions, seq.batch
        shape = (states, batch, self.hidden_size) if batched else (states, self.hidden_size)
        h_shape = (*shape[:-1], self._state_size)
        if hx is None:
            data = seq.data
            return data.new_zeros(states, batch, self._state_size), data.new_zeros(
                states, batch, self.hidden_size
            )
        h0, c0 = self._check_state(hx, shape, h_shape)
        return (h0, c0) if batched else (h0.unsqueeze(1), c0.unsqueeze(1))

    def _check_state_mask(self, state_mask: Any, seq: Sequence, batched: bool) -> Tensor | None:
        """``state_mask`` as (D*L, N, P), detached; None stays None."""
        if state_mask is None:
            return None
        self._check_tensor_matches("state_mask", state_mask)
        states = self.num_layers * self.num_directions
        expected = (states, seq.batch, self._state_size) if batched else (states, self._state_size)
        if tuple(state_mask.shape) != expected:
            raise ValueError(
                f"state_mask: expected shape {expected} (as h_0), got {tuple(state_mask.shape)}"
            )
        state_mask = state_mask.detach()
        return state_mask if batched else state_mask.unsqueeze(1)

    def forward(
        self,
        input: Tensor | PackedSequence,
        hx: tuple[Tensor, Tensor] | None = None,
        *,
        state_mask: Tensor | None = None,
    ) -> tuple[Tensor | PackedSequence, tuple[Tensor, Tensor]]:
        seq, batched = self._check_input(input)
        h0, c0 = self._check_hx(hx, seq, batched)
        mask = self._check_state_mask(state_mask, seq, batched)
        packed = input if isinstance(input, PackedSequence) else None
        if packed is not None and packed.sorted_indices is not None:
            # hx and the mask come in the caller's batch order, the packed rows longest first.
            h0, c0 = (
                h0.index_select(1, packed.sorted_indices),
                c0.index_select(1, packed.sorted_indices),
            )
            if mask is not None:
                mask = mask.index_select(1, packed.sorted_indices)
        used = (("packed", seq.packed), ("proj", self.proj_size), ("state_mask", mask is not None))
        features = {name for name, on in used if on}
        backend = backends.resolve(self.backend, seq.data.device, features)
        reversal = None
        if self.bidirectional and seq.packed:
            reversal = StepRows(seq).reversed_rows.to(seq.data.device)
        data, h_n, c_n = seq.data, [], []
        for layer in range(self.num_layers):
            if layer > 0 and self.dropout > 0 and self.training:
                data = F.dropout(data, self.dropout, training=True)
            outputs = []
            for direction, suffix in enumerate(self._suffixes(layer)):
                k = layer * self.num_directions + direction
                reverse = direction == 1
                if reverse:  # each sequence reversed within its own length
                    data_in = data.flip(0) if reversal is None else data.index_select(0, reversal)
                else:
                    data_in = data
                output, (h, c) = backend.run(
                    Sequence(data_in, seq.batch_sizes, None if mask is None else mask[k]),
                    State(h0[k], c0[k]),
                    self._direction_params(suffix),
                )
                if reverse:
                    output = (
                        output.flip(0) if reversal is None else output.index_select(0, reversal)
                    )
                outputs.append(output)
                h_n.append(h)
                c_n.append(c)
            data = torch.cat(outputs, dim=-1) if len(outputs) > 1 else outputs[0]
        h_n, c_n = torch.stack(h_n), torch.stack(c_n)
        if packed is not None:
            if packed.unsorted_indices is not None:
                h_n = h_n.index_select(1, packed.unsorted_indices)
                c_n = c_n.index_select(1, packed.unsorted_indices)
            output = PackedSequence(
                data, packed.batch_sizes, packed.sorted_indices, packed.unsorted_indices
            )
            return output, (h_n, c_n)
        if not batched:
            return data.squeeze(1), (h_n.squeeze(1), c_n.squeeze(1))
        return (data.transpose(0, 1) if self.batch_first else data), (h_n, c_n)


class MogrifierLSTMCell(_MogrifierBase):
    """One Mogrifier LSTM step with ``nn.LSTMCell``'s interface and parameter names.

    Shapes: input (N, input_size) or unbatched (input_size,); hx optional (h_0, c_0), each
    (N, hidden_size) or (hidden_size,), zeros when omitted. Returns (h_1, c_1) shaped as h_0.
    In float32 on CPU the step runs in the C++ loops of backend ``"fused"`` (reading the weights
    where they are); elsewhere :func:`mogrifier_fast.mogrify.mogrifier_lstm_step` runs directly.
    """

    def __init__(
        self,
        input_size: int,
        hidden_size: int,
        bias: bool = True,
        rounds: int = 5,
        rank: int | None = None,
        share_rounds: bool = False,
        mogrifier_bias: bool = True,
        device: torch.device | str | None = None,
        dtype: torch.dtype | None = None,
    ) -> None:
        super().__init__()
        self._init_options(
            input_size, hidden_size, bias, rounds, rank, share_rounds, mogrifier_bias
        )
        self._add_direction("", input_size, {"device": device, "dtype": dtype})
        self.reset_parameters()

    def mogrifier_weights(self) -> list[tuple[Tensor, Tensor | None]]:
        """One (weight, bias or None) per round, in order; A @ B when low rank."""
        return self._effective_maps(self._direction_params(""))

    def extra_repr(self) -> str:
        s = f"{self.input_size}, {self.hidden_size}" + ("" if self.bias else ", bias=False")
        return f"{s}, {self._mogrifier_extra_repr()}"

    def forward(
        self, input: Tensor, hx: tuple[Tensor, Tensor] | None = None
    ) -> tuple[Tensor, Tensor]:
        self._check_tensor_matches("input", input)
        if input.dim() not in (1, 2) or input.shape[-1] != self.input_size:
            raise ValueError(
                f"input: expected (N, input_size) or unbatched (input_size,) with "
                f"input_size={self.input_size}, got shape {tuple(input.shape)}"
            )
        batched = input.dim() == 2
        x = input if batched else input.unsqueeze(0)
        shape = (x.shape[0], self.hidden_size) if batched else (self.hidden_size,)
        if hx is None:
            zeros = x.new_zeros(x.shape[0], self.hidden_size)
            hx = (zeros, zeros)
        else:
            hx = tuple(t if batched else t.unsqueeze(0) for t in self._check_state(hx, shape))
        params = self._direction_params("")
        if fused_chain.usable(x):
            _, (h1, c1) = run_fused(Sequence(x.unsqueeze(0)), State(*hx), params)
        else:
            h1, c1 = mogrifier_lstm_step(x, hx[0], hx[1], *params.step_args())
        return (h1, c1) if batched else (h1.squeeze(0), c1.squeeze(0))
