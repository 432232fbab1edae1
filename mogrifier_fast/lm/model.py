"""A word- or character-level language model on a stack of ``MogrifierLSTM`` layers."""

from __future__ import annotations

import torch
from torch import Tensor, nn

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


class LanguageModel(nn.Module):
    """Embedding -> ``layers`` MogrifierLSTM layers -> optional down-projection -> decoder.

    ``rounds=0`` is a plain LSTM through the same code. With ``tie`` the decoder shares the
    embedding's weight; when ``hidden != emb`` a linear down-projection (hidden -> emb) makes
    that possible. Dropouts, all variational (one mask per sequence): ``dropout_input`` on the
    embeddings, ``dropout_layer`` between layers, ``dropout_output`` before the decoder, and
    ``dropout_state`` on the hidden state each layer starts a segment from (the state carried
    across truncated-BPTT segments; the layers run whole segments, so the mask is applied
    there rather than at every step).

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
    ) -> None:
        super().__init__()
        for name, p in (
            ("dropout_input", dropout_input),
            ("dropout_layer", dropout_layer),
            ("dropout_state", dropout_state),
            ("dropout_output", dropout_output),
        ):
            if not 0 <= p < 1:
                raise ValueError(f"{name}: expected a probability in [0, 1), got {p}")
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
        self.projection = nn.Linear(hidden, emb, bias=False) if tie and hidden != emb else None
        self.decoder = nn.Linear(emb if tie else hidden, vocab_size)
        if tie:
            self.decoder.weight = self.embedding.weight
        self.dropout_input, self.dropout_layer = dropout_input, dropout_layer
        self.dropout_state, self.dropout_output = dropout_state, dropout_output
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
            h = locked_dropout(h, self.dropout_state, self.training)
            x, (h, c) = layer(x, (h, c))
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
