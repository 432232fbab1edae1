"""A word- or character-level language model on a stack of ``MogrifierLSTM`` layers."""

from __future__ import annotations

import re
from numbers import Real

import torch
import torch.nn.functional as F
from torch import Tensor, nn
from torch.nn.utils import parametrize

from mogrifier_fast.layer import MogrifierLSTM

State = list[tuple[Tensor, Tensor]]


def locked_dropout(x: Tensor, p: float, training: bool) -> Tensor:
    """Variational dropout: one mask per sequence and feature, the same at every step.
    x: (T, B, F) or (B, F)."""
    if not training or p == 0:
        return x
    shape = (1, *x.shape[1:]) if x.dim() == 3 else x.shape
    mask = x.new_empty(shape).bernoulli_(1 - p).div_(1 - p)
    return x * mask


class WeightDrop(nn.Module):
    """DropConnect on a weight (Wan et al. 2013), as a parametrization: AWD-LSTM (Merity et al.
    2018) applies it to the hidden-to-hidden weights of an LSTM.

    In training mode each evaluation returns ``F.dropout(weight, p, training=True)``: every entry
    zeroed with probability ``p``, the others scaled by 1 / (1 - p), a fresh mask each time; in
    eval mode the weight unchanged. Registered with
    ``torch.nn.utils.parametrize.register_parametrization`` (see :func:`apply_weight_drop`), it
    is evaluated on every access of the parametrized attribute, so one mask per access.

    Shapes: weight (any shape) -> the same shape, dtype and device.
    """

    def __init__(self, p: float) -> None:
        super().__init__()
        if isinstance(p, bool) or not isinstance(p, Real) or not 0 <= p < 1:
            raise ValueError(f"p: expected a dropout probability in [0, 1), got {p!r}")
        self.p = float(p)

    def forward(self, weight: Tensor) -> Tensor:
        if not self.training or self.p == 0:
            return weight
        return F.dropout(weight, self.p, training=True)

    def extra_repr(self) -> str:
        return f"p={self.p}"


_WEIGHT_HH = re.compile(r"weight_hh_l\d+(_reverse)?")


def apply_weight_drop(rnn: nn.Module, p: float) -> None:
    """Register a :class:`WeightDrop` ``p`` on every hidden-to-hidden weight of ``rnn`` (a
    ``MogrifierLSTM`` or ``nn.LSTM``): ``weight_hh_l{k}`` and ``weight_hh_l{k}_reverse``, each
    (4 * hidden_size, hidden_size). ``p == 0`` changes nothing.

    ``MogrifierLSTM`` reads each weight once per forward per layer-direction, so each forward in
    training mode draws one mask per layer-direction, shared by all time steps (as AWD-LSTM).
    ``nn.LSTM`` reads the attribute a few times per forward (its flat-weight bookkeeping) and
    runs with the last value: still one mask per forward in effect. The module's state_dict
    then holds ``parametrizations.weight_hh_l{k}.original`` in place of ``weight_hh_l{k}``.
    Raises ValueError for ``p`` outside [0, 1) or a module without such weights.
    """
    WeightDrop(p)  # checks p
    names = [name for name, _ in rnn.named_parameters(recurse=False) if _WEIGHT_HH.fullmatch(name)]
    if parametrize.is_parametrized(rnn):  # already parametrized ones (weight norm, ...) as well
        names += [name for name in rnn.parametrizations if _WEIGHT_HH.fullmatch(name)]
    if not names:
        raise ValueError(
            f"rnn: expected a module with weight_hh_l* parameters (nn.LSTM, MogrifierLSTM), "
            f"got {type(rnn).__name__}"
        )
    if p == 0:
        return
    for name in names:
        # unsafe=True skips the check-evaluation at registration (dropout keeps shape and
        # dtype), which would draw a mask and shift the random stream the model is built from.
        parametrize.register_parametrization(rnn, name, WeightDrop(p), unsafe=True)


class LanguageModel(nn.Module):
    """Embedding -> ``layers`` MogrifierLSTM layers -> optional down-projection -> decoder.

    ``rounds=0`` is a plain LSTM through the same code. With ``tie`` the decoder shares the
    embedding's weight; when ``hidden != emb`` a linear down-projection (hidden -> emb) makes
    that possible. Dropouts, all variational (one mask per sequence): ``dropout_input`` on the
    embeddings, ``dropout_layer`` between layers, ``dropout_output`` before the decoder, and
    ``dropout_state`` on the recurrent state inside each layer's recurrence: one mask per
    sequence and layer for each forward (segment), applied to the h every step reads
    (``MogrifierLSTM``'s ``state_mask``). ``weight_drop``: DropConnect on each layer's
    hidden-to-hidden weight (:func:`apply_weight_drop`; one mask per forward, shared by all
    steps); with it the state_dict holds ``layers.{i}.parametrizations.weight_hh_l0.original``
    in place of ``layers.{i}.weight_hh_l0``.

    Shapes: tokens (T, B) -> logits (T, B, vocab_size), and the new state: per layer (h, c),
    each (1, B, hidden).
    """

    def __init__(
        self,
        vocab_size: int,
        emb: int = 128,
        hidden: int = 256,
        layers: int = 1,
        rounds: int = 5,
        rank: int | None = None,
        share_rounds: bool = False,
        tie: bool = True,
        dropout_input: float = 0.0,
        dropout_layer: float = 0.0,
        dropout_state: float = 0.0,
        dropout_output: float = 0.0,
        backend: str = "auto",
        weight_drop: float = 0.0,
    ) -> None:
        super().__init__()
        for name, p in (
            ("dropout_input", dropout_input),
            ("dropout_layer", dropout_layer),
            ("dropout_state", dropout_state),
            ("dropout_output", dropout_output),
            ("weight_drop", weight_drop),
        ):
            if isinstance(p, bool) or not isinstance(p, Real) or not 0 <= p < 1:
                raise ValueError(f"{name}: expected a probability in [0, 1), got {p!r}")
        self.embedding = nn.Embedding(vocab_size, emb)
        self.layers = nn.ModuleList(
            MogrifierLSTM(
                emb if i == 0 else hidden,
                hidden,
                rounds=rounds,
                rank=rank,
                share_rounds=share_rounds,
                backend=backend,
            )
            for i in range(layers)
        )
        for layer in self.layers:
            apply_weight_drop(layer, weight_drop)
        self.projection = nn.Linear(hidden, emb, bias=False) if tie and hidden != emb else None
        self.decoder = nn.Linear(emb if tie else hidden, vocab_size)
        if tie:
            self.decoder.weight = self.embedding.weight
        self.dropout_input, self.dropout_layer = dropout_input, dropout_layer
        self.dropout_state, self.dropout_output = dropout_state, dropout_output
        self.weight_drop = weight_drop
        self.hidden = hidden
        nn.init.uniform_(self.embedding.weight, -0.1, 0.1)
        nn.init.zeros_(self.decoder.bias)

    def init_state(self, batch: int) -> State:
        weight = self.embedding.weight
        return [
            (weight.new_zeros(1, batch, self.hidden), weight.new_zeros(1, batch, self.hidden))
            for _ in self.layers
        ]

    def forward(self, tokens: Tensor, state: State | None = None) -> tuple[Tensor, State]:
        state = self.init_state(tokens.shape[1]) if state is None else state
        x = locked_dropout(self.embedding(tokens), self.dropout_input, self.training)
        new_state = []
        for i, (layer, (h, c)) in enumerate(zip(self.layers, state, strict=True)):
            if i > 0:
                x = locked_dropout(x, self.dropout_layer, self.training)
            mask = None
            if self.training and self.dropout_state > 0:
                keep = 1 - self.dropout_state
                mask = h.new_empty(h.shape).bernoulli_(keep).div_(keep)
            x, (h, c) = layer(x, (h, c), state_mask=mask)
            new_state.append((h, c))
        if self.projection is not None:
            x = self.projection(x)
        x = locked_dropout(x, self.dropout_output, self.training)
        return self.decoder(x), new_state

    @torch.no_grad()
    def sample(
        self,
        prime: Tensor,
        length: int,
        temperature: float = 1.0,
        generator: torch.Generator | None = None,
    ) -> Tensor:
        """Continue the ids ``prime`` (P,) by ``length`` sampled ids; returns them (length,)."""
        if temperature <= 0:
            raise ValueError(f"temperature: expected > 0, got {temperature}")
        was_training = self.training
        self.eval()
        logits, state = self(prime.view(-1, 1))
        out = []
        for _ in range(length):
            probs = torch.softmax(logits[-1, 0].float() / temperature, dim=-1)
            token = torch.multinomial(probs, 1, generator=generator)
            out.append(token)
            logits, state = self(token.view(1, 1), state)
        self.train(was_training)
        return torch.cat(out)
