"""Dynamic evaluation (Krause et al. 2018, "Dynamic Evaluation of Neural Sequence Models"):
the model keeps learning from the text it is scored on, each segment scored before the model
takes a gradient step on it. The variant is "RMS with a global prior", the one the Mogrifier
paper (Melis et al., ICLR 2020) reports, as its official TensorFlow code (``lamb/dyneval.py``
in google-deepmind/lamb) implements it.

Statistics, once per trained model (:func:`gradient_statistics`), on the training split
batchified as the model trained, segment by segment, state carried, dropout off: with
``g_n`` the gradient of the mean cross-entropy of training segment ``n`` (of ``N``),

    MS = (1/N) Σ_n g_n²                      (per parameter entry)
    r = sqrt(MS),   r̄ = mean of r over every entry of every parameter.

Evaluation (:func:`dynamic_evaluate`) of a stream cut into segments ``s_1, s_2, ...`` of
``bptt`` tokens (batch 1, hidden state carried), starting from the trained weights θ0: score
segment ``s_t`` with θ, then, with ``g`` the gradient of its mean cross-entropy at θ,

    θ ← θ − η · g / (r + ε) + min(1, λ · r / r̄) ⊙ (θ0 − θ)

(elementwise; η = ``lr``, λ = ``decay``, ε = ``epsilon``). The decay toward θ0 is the global
prior; each entry's decay rate is λ scaled by its RMS relative to the mean RMS, clipped at 1 so
that no entry overshoots θ0. Krause et al.'s PyTorch code (benkrause/dynamic-evaluation) is the
same rule except that it normalises by the mean over parameter tensors of each tensor's mean
RMS instead of the mean over all entries (r̄ above, as the paper and the TensorFlow code).

Segment length: 5 tokens (:data:`DEFAULT_SEGMENT`), the default of Krause et al.'s code, whose
defaults are tuned for word-level PTB. Shorter segments adapt more often (better, slower); the
default learning rate, decay and grid are given per 5-token segment and scale with the segment
length as in that code's grid search (``segment / 5``), since longer segments take
proportionally fewer steps. Krause et al.'s defaults (η 5e-5, λ 2e-3, ε 2e-5) were tuned for a
well-trained AWD-LSTM; the best η depends on the model (a small PTB model trained briefly here
did best at η 1e-5 and worse than static evaluation at 5e-5), so prefer
:func:`choose_dynamic` on the validation split.
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from mogrifier_fast.progress import progress_bar

Stats = dict[str, Tensor]

DEFAULT_SEGMENT = 5
DEFAULT_LR = 5e-5  # Krause et al.'s defaults (word-level PTB), per 5-token segment
DEFAULT_DECAY = 2e-3
DEFAULT_EPSILON = 2e-5
GRID_LRS = (3e-6, 1e-5, 3e-5, 1e-4, 3e-4)  # per 5-token segment
GRID_DECAYS = (1e-3, 3e-3, 1e-2)
DEFAULT_VALID_TOKENS = 30_000  # Krause et al.'s fast grid search: the first 30k validation tokens
PROGRESS_MIN_SEGMENTS = 200  # shorter streams get no progress bar


def default_hyperparameters(segment: int = DEFAULT_SEGMENT) -> tuple[float, float]:
    """(lr, decay) defaults for ``segment``-token segments: Krause et al.'s, times segment / 5."""
    return DEFAULT_LR * segment / 5, DEFAULT_DECAY * segment / 5


def default_grid(segment: int = DEFAULT_SEGMENT) -> tuple[list[float], list[float]]:
    """(lrs, decays) that :func:`choose_dynamic` searches by default, times segment / 5."""
    return [lr * segment / 5 for lr in GRID_LRS], [d * segment / 5 for d in GRID_DECAYS]


def _parameters(model: nn.Module) -> list[tuple[str, nn.Parameter]]:
    """Named parameters that require grad (a tied weight once, under its first name)."""
    return [(name, p) for name, p in model.named_parameters() if p.requires_grad]


def _segments(data: Tensor, bptt: int):
    """(inputs (L, B), targets (L, B)) over batchified data (T, B), the last one shorter."""
    for position in range(0, data.shape[0] - 1, bptt):
        length = min(bptt, data.shape[0] - 1 - position)
        yield data[position : position + length], data[position + 1 : position + 1 + length]


def _check_data(data: Tensor, name: str) -> None:
    if data.dim() != 2 or data.shape[0] < 2:
        raise ValueError(
            f"{name}: expected batchified ids (T, B) with T >= 2, got shape {tuple(data.shape)}"
        )


def gradient_statistics(
    model: nn.Module,
    train_data: Tensor,
    bptt: int,
    max_tokens: int | None = None,
    progress: bool = False,
) -> Stats:
    """Mean squared gradient ("MS") per parameter entry, over the segments of ``train_data``.

    ``train_data``: (T, B) training ids batchified as the model trained; segments of ``bptt``
    rows, the hidden state carried (detached) across them, the model in eval mode (no dropout),
    each gradient that of the segment's mean cross-entropy. ``max_tokens``: stop once this many
    target tokens are used (default: the whole split). Returns {name: MS, shaped as the
    parameter} for each named parameter that requires grad, on the parameter's device. The
    model's gradients and training flag are left as they were.
    """
    _check_data(train_data, "train_data")
    if bptt < 1:
        raise ValueError(f"bptt: expected >= 1, got {bptt}")
    if max_tokens is not None and max_tokens < 1:
        raise ValueError(f"max_tokens: expected >= 1 or None, got {max_tokens}")
    params = _parameters(model)
    sums = {name: torch.zeros_like(p, memory_format=torch.preserve_format) for name, p in params}
    saved_grads = {name: p.grad for name, p in params}
    was_training = model.training
    total = math.ceil((train_data.shape[0] - 1) / bptt)
    bar = (
        progress_bar(total=total, desc="gradient statistics", unit="segment") if progress else None
    )
    state, count, tokens = None, 0, 0
    try:
        model.eval()
        with torch.enable_grad():
            for inputs, targets in _segments(train_data, bptt):
                state = None if state is None else [(h.detach(), c.detach()) for h, c in state]
                for _, p in params:
                    p.grad = None
                logits, state = model(inputs, state)
                F.cross_entropy(
                    logits.reshape(-1, logits.shape[-1]), targets.reshape(-1)
                ).backward()
                with torch.no_grad():
                    for name, p in params:
                        if p.grad is not None:
                            sums[name].addcmul_(p.grad, p.grad)
                count += 1
                tokens += targets.numel()
                if bar is not None:
                    bar.update(1)
                if max_tokens is not None and tokens >= max_tokens:
                    break
    finally:
        for name, p in params:
            p.grad = saved_grads[name]
        model.train(was_training)
        if bar is not None:
            bar.close()
    return {name: s / count for name, s in sums.items()}


def _rates(
    params: list[tuple[str, nn.Parameter]], stats: Stats, lr: float, decay: float, epsilon: float
) -> tuple[dict[str, Tensor], dict[str, Tensor]]:
    """Per entry: the gradient scale η / (r + ε) and the decay rate min(1, λ r / r̄)."""
    names = [name for name, _ in params]
    missing = sorted(set(names) - set(stats))
    if missing:
        raise ValueError(f"stats: no statistics for parameters {missing}")
    for name, p in params:
        if stats[name].shape != p.shape:
            raise ValueError(
                f"stats: {name} has shape {tuple(stats[name].shape)}, the parameter {tuple(p.shape)}"
            )
    rms = {name: stats[name].to(device=p.device, dtype=p.dtype).sqrt() for name, p in params}
    mean_rms = sum(r.sum() for r in rms.values()) / sum(r.numel() for r in rms.values())
    if not torch.isfinite(mean_rms) or mean_rms <= 0:
        raise ValueError(
            f"stats: expected finite, not all zero statistics, got mean RMS {mean_rms}"
        )
    scale = {name: lr / (r + epsilon) for name, r in rms.items()}
    rate = {name: (decay * r / mean_rms).clamp_(max=1.0) for name, r in rms.items()}
    return scale, rate


def _check_hyperparameters(bptt: int, lr: float, decay: float, epsilon: float) -> None:
    if bptt < 1:
        raise ValueError(f"bptt: expected >= 1, got {bptt}")
    if not lr > 0 or not math.isfinite(lr):
        raise ValueError(f"lr: expected a finite value > 0, got {lr}")
    if not 0 <= decay <= 1:
        raise ValueError(f"decay: expected a value in [0, 1], got {decay}")
    if not epsilon > 0 or not math.isfinite(epsilon):
        raise ValueError(f"epsilon: expected a finite value > 0, got {epsilon}")


def dynamic_evaluate(
    model: nn.Module,
    data: Tensor,
    bptt: int,
    lr: float,
    decay: float,
    stats: Stats,
    *,
    epsilon: float = DEFAULT_EPSILON,
    max_tokens: int | None = None,
    progress: bool = True,
) -> float:
    """Mean cross-entropy (nats per token) of a stream under dynamic evaluation (module doc).

    ``data``: (T, 1) ids, i.e. ``batchify(ids, 1)``; ``bptt``: the segment length (Krause et
    al.'s 5 for word level: :data:`DEFAULT_SEGMENT`); each segment is scored before the update
    on it. ``lr`` η > 0, ``decay`` λ in [0, 1], ``stats``: :func:`gradient_statistics` of this
    model. ``max_tokens``: stop after the segment that reaches this many scored tokens.
    ``progress``: a progress bar on stderr for streams of at least
    :data:`PROGRESS_MIN_SEGMENTS` segments. The model stays in eval mode (no dropout) while
    it runs; its parameters (bit for bit), gradients and training flag are restored afterwards,
    also when an exception interrupts it. A too large ``lr`` can make the result inf or nan
    (it stops at the first non-finite segment).
    """
    _check_hyperparameters(bptt, lr, decay, epsilon)
    _check_data(data, "data")
    if data.shape[1] != 1:
        raise ValueError(
            f"data: expected one column (T, 1), i.e. batchify(ids, 1), got shape {tuple(data.shape)}"
        )
    params = _parameters(model)
    scale, rate = _rates(params, stats, lr, decay, epsilon)
    theta0 = {name: p.detach().clone() for name, p in params}
    saved_grads = {name: p.grad for name, p in params}
    was_training = model.training
    total = math.ceil((data.shape[0] - 1) / bptt)
    bar = None
    if progress and total >= PROGRESS_MIN_SEGMENTS:
        bar = progress_bar(total=total, desc="dynamic evaluation", unit="segment")
    state, loss_sum, count = None, 0.0, 0
    try:
        model.eval()
        with torch.enable_grad():
            for inputs, targets in _segments(data, bptt):
                state = None if state is None else [(h.detach(), c.detach()) for h, c in state]
                for _, p in params:
                    p.grad = None
                logits, state = model(inputs, state)
                loss = F.cross_entropy(
                    logits.reshape(-1, logits.shape[-1]), targets.reshape(-1), reduction="sum"
                )
                loss_sum += loss.item()  # scored with θ before the update on this segment
                count += targets.numel()
                (loss / targets.numel()).backward()
                with torch.no_grad():
                    for name, p in params:
                        step = rate[name] * (theta0[name] - p)
                        if p.grad is not None:
                            step.sub_(scale[name] * p.grad)
                        p.add_(step)
                if bar is not None:
                    bar.update(1)
                if not math.isfinite(loss_sum):  # diverged: the mean stays non-finite
                    break
                if max_tokens is not None and count >= max_tokens:
                    break
    finally:
        with torch.no_grad():
            for name, p in params:
                p.copy_(theta0[name])
                p.grad = saved_grads[name]
        model.train(was_training)
        if bar is not None:
            bar.close()
    return loss_sum / count


def choose_dynamic(
    model: nn.Module,
    valid_data: Tensor,
    bptt: int,
    stats: Stats,
    *,
    lrs: Sequence[float] | None = None,
    decays: Sequence[float] | None = None,
    max_tokens: int | None = DEFAULT_VALID_TOKENS,
    epsilon: float = DEFAULT_EPSILON,
    progress: bool = True,
) -> tuple[float, float, float]:
    """Grid search of (lr, decay) by :func:`dynamic_evaluate` on the validation split only.

    ``valid_data``: (T, 1) validation ids (``batchify(corpus.valid, 1)``), of which the first
    ``max_tokens`` targets are used (None: all). ``lrs``, ``decays``: the grid (default
    :func:`default_grid` for ``bptt``). Returns (lr, decay, loss) with the lowest mean
    cross-entropy; settings whose loss is not finite lose. The model is left as it was.
    """
    if max_tokens is not None and max_tokens < 1:
        raise ValueError(f"max_tokens: expected >= 1 or None, got {max_tokens}")
    default_lrs, default_decays = default_grid(bptt)
    lrs = list(default_lrs if lrs is None else lrs)
    decays = list(default_decays if decays is None else decays)
    if not lrs or not decays:
        raise ValueError(f"grid: expected at least one lr and one decay, got {lrs} and {decays}")
    for lr in lrs:
        for decay in decays:
            _check_hyperparameters(bptt, lr, decay, epsilon)
    prefix = valid_data if max_tokens is None else valid_data[: max_tokens + 1]
    bar = None
    if progress:
        bar = progress_bar(total=len(lrs) * len(decays), desc="choosing lr, decay", unit="setting")
    best: tuple[float, float, float] | None = None
    try:
        for decay in decays:
            for lr in lrs:
                loss = dynamic_evaluate(
                    model, prefix, bptt, lr, decay, stats, epsilon=epsilon, progress=False
                )
                if math.isfinite(loss) and (best is None or loss < best[2]):
                    best = (lr, decay, loss)
                if bar is not None:
                    bar.update(1)
                    bar.set_postfix(best=f"{best[2]:.4f}" if best else "none")
    finally:
        if bar is not None:
            bar.close()
    if best is None:
        raise ValueError(
            f"grid: every setting made the validation loss non-finite (lrs {lrs}); try smaller lrs"
        )
    return best
