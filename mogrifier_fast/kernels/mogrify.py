"""The mogrifier rounds of one step as Triton kernels, forward and backward.

States are kept by kind, each with the step's input at index 0: x-states ``xs[m]`` (B, I), m = 0
the input and m >= 1 the x after its m-th update (round 2m − 1); h-states ``hs[m]`` (B, H) alike
(round 2m). Round j of :mod:`mogrifier_fast.mogrify` is then

    odd j = 2m + 1:   xs[m+1] = 2 σ(hs[m] Wx_m^T + bx_m) ⊙ xs[m]
    even j = 2m + 2:  hs[m+1] = 2 σ(xs[m+1] Wh_m^T + bh_m) ⊙ hs[m]

with the maps stacked by kind (:class:`StackedMaps`). A program owns a block of batch rows and
computes each round's product tile by tile with its epilogue fused, storing the new state and
σ(z) (kept for the backward). With one program per row block, every round of the step runs in
one launch (a barrier between rounds); for wide states each round is its own launch with the
output columns split across programs. A low-rank map W = A B runs as two chained products, the
inner (rows, k) value held on chip (and stored for the weight gradients).

The backward walks the rounds in reverse, carrying only data gradients: for round j with new
state u, gated state u_old and map input v, ``dz = du ⊙ 2 u_old ⊙ σ'(z)`` (stored for the weight
gradients), ``du_old = 2σ(z) ⊙ du`` and ``dv += dz W``; weight gradients are left to the caller,
one product over all rows of a sequence.
"""

from __future__ import annotations

from typing import NamedTuple

import torch
import triton
import triton.language as tl
from torch import Tensor

from mogrifier_fast.kernels import accumulator, block, dot_precision
from mogrifier_fast.mogrify import LayerParams

# All rounds of a step run in one launch (one program per block of batch rows, walking every
# column, a barrier between rounds) when no state is wider than this; wider states run one launch
# per round with the columns split across programs. A starting point, not a GPU measurement.
ONE_LAUNCH_MAX_WIDTH = 256
BLOCK_B = 16


@triton.jit
def _load_tile(base, rows, cols, width, row_ok):
    """base[rows, cols] of a row-major (·, width) matrix, zero outside."""
    return tl.load(
        base + rows[:, None] * width + cols[None, :],
        mask=row_ok[:, None] & (cols[None, :] < width),
        other=0.0,
    )


@triton.jit
def _round_forward(
    src, old, new, sig, inner, w, v, b, rows, n_rows, pid_n, n_programs,
    OUT: tl.constexpr, IN: tl.constexpr, RANK: tl.constexpr, HAS_BIAS: tl.constexpr,
    ACC: tl.constexpr, BLOCK_B: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr,
    BLOCK_R: tl.constexpr, PRECISION: tl.constexpr,
):  # fmt: skip
    """new = 2 σ(src W^T + b) ⊙ old, σ(·) into sig, for this program's columns of OUT.

    W is w (OUT, IN), or w (OUT, RANK) @ v (RANK, IN); the inner src v^T goes to ``inner``."""
    row_ok = rows < n_rows
    dtype = new.dtype.element_ty
    if RANK > 0:
        ranks = tl.arange(0, BLOCK_R)
        acc_inner = tl.zeros((BLOCK_B, BLOCK_R), ACC)
        for k0 in range(0, IN, BLOCK_K):
            k = k0 + tl.arange(0, BLOCK_K)
            a = _load_tile(src, rows, k, IN, row_ok)
            vt = tl.load(
                v + ranks[None, :] * IN + k[:, None],
                mask=(ranks[None, :] < RANK) & (k[:, None] < IN),
                other=0.0,
            )
            # out_dtype: Triton (3.6) requires it to be acc's dtype, float64 included.
            acc_inner = tl.dot(a, vt, acc_inner, input_precision=PRECISION, out_dtype=ACC)
        inner_value = acc_inner.to(dtype)
        tl.store(
            inner + rows[:, None] * RANK + ranks[None, :],
            inner_value,
            mask=row_ok[:, None] & (ranks[None, :] < RANK * (pid_n == 0).to(tl.int32)),
        )
    for n0 in range(pid_n * BLOCK_N, OUT, n_programs * BLOCK_N):
        n = n0 + tl.arange(0, BLOCK_N)
        z = tl.zeros((BLOCK_B, BLOCK_N), ACC)
        if RANK > 0:
            at = tl.load(
                w + n[None, :] * RANK + ranks[:, None],
                mask=(ranks[:, None] < RANK) & (n[None, :] < OUT),
                other=0.0,
            )
            z = tl.dot(inner_value, at, z, input_precision=PRECISION, out_dtype=ACC)
        else:
            for k0 in range(0, IN, BLOCK_K):
                k = k0 + tl.arange(0, BLOCK_K)
                a = _load_tile(src, rows, k, IN, row_ok)
                wt = tl.load(
                    w + n[None, :] * IN + k[:, None],
                    mask=(k[:, None] < IN) & (n[None, :] < OUT),
                    other=0.0,
                )
                z = tl.dot(a, wt, z, input_precision=PRECISION, out_dtype=ACC)
        if HAS_BIAS:
            z += tl.load(b + n, mask=n < OUT, other=0.0).to(ACC)[None, :]
        s = tl.sigmoid(z)
        offsets = rows[:, None] * OUT + n[None, :]
        ok = row_ok[:, None] & (n[None, :] < OUT)
        gated = tl.load(old + offsets, mask=ok, other=0.0).to(ACC)
        tl.store(sig + offsets, s.to(dtype), mask=ok)
        tl.store(new + offsets, (2 * s * gated).to(dtype), mask=ok)


@triton.jit
def _mogrify_forward_kernel(
    xs, hs, sig_x, sig_h, inner, maps_x, maps_h, factors_x, factors_h, bias_x, bias_h,
    xs_stride, hs_stride, sig_x_stride, sig_h_stride, inner_stride,
    maps_x_stride, maps_h_stride, factors_x_stride, factors_h_stride, n_rows,
    X_SIZE: tl.constexpr, H_SIZE: tl.constexpr, RANK: tl.constexpr, FIRST: tl.constexpr,
    LAST: tl.constexpr, HAS_BIAS: tl.constexpr, ACC: tl.constexpr, BLOCK_B: tl.constexpr,
    BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr, BLOCK_R: tl.constexpr,
    PRECISION: tl.constexpr,
):  # fmt: skip
    """Rounds FIRST..LAST (1-based) of one step: a block of rows per program along axis 0, the
    columns split across programs along axis 1 (the persistent kernel calls this with a 1-D
    grid: every column); the ``*_stride`` arguments step between rounds. A barrier follows each
    round."""
    rows = tl.program_id(0) * BLOCK_B + tl.arange(0, BLOCK_B)
    pid_n, n_programs = tl.program_id(1), tl.num_programs(1)
    for j in tl.static_range(FIRST, LAST + 1):
        if j % 2 == 1:
            m = (j - 1) // 2
            _round_forward(
                hs + m * hs_stride, xs + m * xs_stride, xs + (m + 1) * xs_stride,
                sig_x + m * sig_x_stride, inner + (j - 1) * inner_stride,
                maps_x + m * maps_x_stride, factors_x + m * factors_x_stride, bias_x + m * X_SIZE,
                rows, n_rows, pid_n, n_programs, X_SIZE, H_SIZE, RANK, HAS_BIAS, ACC,
                BLOCK_B, BLOCK_N, BLOCK_K, BLOCK_R, PRECISION,
            )  # fmt: skip
        else:
            m = j // 2 - 1
            _round_forward(
                xs + (m + 1) * xs_stride, hs + m * hs_stride, hs + (m + 1) * hs_stride,
                sig_h + m * sig_h_stride, inner + (j - 1) * inner_stride,
                maps_h + m * maps_h_stride, factors_h + m * factors_h_stride, bias_h + m * H_SIZE,
                rows, n_rows, pid_n, n_programs, H_SIZE, X_SIZE, RANK, HAS_BIAS, ACC,
                BLOCK_B, BLOCK_N, BLOCK_K, BLOCK_R, PRECISION,
            )  # fmt: skip
        tl.debug_barrier()


@triton.jit
def _dz_tile(g_new, g_old, old, sig, dz, rows, n, row_ok, OUT, stored, ACC: tl.constexpr):
    """dz = du ⊙ 2 u_old ⊙ σ(1 − σ) for columns n (returned); dz and du_old = 2σ ⊙ du are
    written for the columns below ``stored`` (OUT or 0: a scalar mask would not broadcast in
    Triton's interpreter)."""
    offsets = rows[:, None] * OUT + n[None, :]
    ok = row_ok[:, None] & (n[None, :] < OUT)
    g = tl.load(g_new + offsets, mask=ok, other=0.0).to(ACC)
    s = tl.load(sig + offsets, mask=ok, other=0.0).to(ACC)
    u = tl.load(old + offsets, mask=ok, other=0.0).to(ACC)
    d = 2 * g * u * s * (1 - s)
    store = ok & (n[None, :] < stored)
    tl.store(dz + offsets, d.to(dz.dtype.element_ty), mask=store)
    tl.store(g_old + offsets, (2 * s * g).to(g_old.dtype.element_ty), mask=store)
    return d


@triton.jit
def _round_backward(
    g_new, g_old, g_src, old, sig, dz, dinner, w, v, rows, n_rows, pid_n, n_programs,
    OUT: tl.constexpr, IN: tl.constexpr, RANK: tl.constexpr, ACC: tl.constexpr,
    BLOCK_B: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr,
    BLOCK_R: tl.constexpr, PRECISION: tl.constexpr,
):  # fmt: skip
    """g_src += dz W for this program's columns of IN; program 0 stores dz, g_old (and dz A)."""
    row_ok = rows < n_rows
    dtype = g_src.dtype.element_ty
    first = (pid_n == 0).to(tl.int32)  # program 0 stores what every program computes
    if RANK > 0:
        ranks = tl.arange(0, BLOCK_R)
        acc_inner = tl.zeros((BLOCK_B, BLOCK_R), ACC)
        for n0 in range(0, OUT, BLOCK_N):
            n = n0 + tl.arange(0, BLOCK_N)
            d = _dz_tile(g_new, g_old, old, sig, dz, rows, n, row_ok, OUT, OUT * first, ACC)
            a = tl.load(
                w + n[:, None] * RANK + ranks[None, :],
                mask=(n[:, None] < OUT) & (ranks[None, :] < RANK),
                other=0.0,
            )
            acc_inner = tl.dot(d.to(dtype), a, acc_inner, input_precision=PRECISION, out_dtype=ACC)
        inner_grad = acc_inner.to(dtype)
        tl.store(
            dinner + rows[:, None] * RANK + ranks[None, :],
            inner_grad,
            mask=row_ok[:, None] & (ranks[None, :] < RANK * first),
        )
        for k0 in range(pid_n * BLOCK_K, IN, n_programs * BLOCK_K):
            k = k0 + tl.arange(0, BLOCK_K)
            vt = tl.load(
                v + ranks[:, None] * IN + k[None, :],
                mask=(ranks[:, None] < RANK) & (k[None, :] < IN),
                other=0.0,
            )
            acc = _load_tile(g_src, rows, k, IN, row_ok).to(ACC)
            acc = tl.dot(inner_grad, vt, acc, input_precision=PRECISION, out_dtype=ACC)
            tl.store(
                g_src + rows[:, None] * IN + k[None, :],
                acc.to(dtype),
                mask=row_ok[:, None] & (k[None, :] < IN),
            )
    else:
        for k0 in range(pid_n * BLOCK_K, IN, n_programs * BLOCK_K):
            k = k0 + tl.arange(0, BLOCK_K)
            acc = _load_tile(g_src, rows, k, IN, row_ok).to(ACC)
            stored = OUT * ((k0 + pid_n) == 0).to(tl.int32)
            for n0 in range(0, OUT, BLOCK_N):
                n = n0 + tl.arange(0, BLOCK_N)
                d = _dz_tile(g_new, g_old, old, sig, dz, rows, n, row_ok, OUT, stored, ACC)
                wk = tl.load(
                    w + n[:, None] * IN + k[None, :],
                    mask=(n[:, None] < OUT) & (k[None, :] < IN),
                    other=0.0,
                )
                acc = tl.dot(d.to(dtype), wk, acc, input_precision=PRECISION, out_dtype=ACC)
            tl.store(
                g_src + rows[:, None] * IN + k[None, :],
                acc.to(dtype),
                mask=row_ok[:, None] & (k[None, :] < IN),
            )


@triton.jit
def _mogrify_backward_kernel(
    xs, hs, sig_x, sig_h, grad_xs, grad_hs, dz_x, dz_h, dinner,
    maps_x, maps_h, factors_x, factors_h,
    xs_stride, hs_stride, sig_x_stride, sig_h_stride, grad_xs_stride, grad_hs_stride,
    dz_x_stride, dz_h_stride, dinner_stride,
    maps_x_stride, maps_h_stride, factors_x_stride, factors_h_stride, n_rows,
    X_SIZE: tl.constexpr, H_SIZE: tl.constexpr, RANK: tl.constexpr, FIRST: tl.constexpr,
    LAST: tl.constexpr, ACC: tl.constexpr, BLOCK_B: tl.constexpr, BLOCK_N: tl.constexpr,
    BLOCK_K: tl.constexpr, BLOCK_R: tl.constexpr, PRECISION: tl.constexpr,
):  # fmt: skip
    """Rounds LAST down to FIRST of one step's backward, on the state gradients in place (grid as
    the forward's). A barrier follows each round."""
    rows = tl.program_id(0) * BLOCK_B + tl.arange(0, BLOCK_B)
    pid_n, n_programs = tl.program_id(1), tl.num_programs(1)
    for back in tl.static_range(0, LAST - FIRST + 1):
        j = LAST - back
        if j % 2 == 1:
            m = (j - 1) // 2
            _round_backward(
                grad_xs + (m + 1) * grad_xs_stride, grad_xs + m * grad_xs_stride,
                grad_hs + m * grad_hs_stride, xs + m * xs_stride, sig_x + m * sig_x_stride,
                dz_x + m * dz_x_stride, dinner + (j - 1) * dinner_stride,
                maps_x + m * maps_x_stride, factors_x + m * factors_x_stride,
                rows, n_rows, pid_n, n_programs, X_SIZE, H_SIZE, RANK, ACC,
                BLOCK_B, BLOCK_N, BLOCK_K, BLOCK_R, PRECISION,
            )  # fmt: skip
        else:
            m = j // 2 - 1
            _round_backward(
                grad_hs + (m + 1) * grad_hs_stride, grad_hs + m * grad_hs_stride,
                grad_xs + (m + 1) * grad_xs_stride, hs + m * hs_stride, sig_h + m * sig_h_stride,
                dz_h + m * dz_h_stride, dinner + (j - 1) * dinner_stride,
                maps_h + m * maps_h_stride, factors_h + m * factors_h_stride,
                rows, n_rows, pid_n, n_programs, H_SIZE, X_SIZE, RANK, ACC,
                BLOCK_B, BLOCK_N, BLOCK_K, BLOCK_R, PRECISION,
            )  # fmt: skip
        tl.debug_barrier()


class StackedMaps(NamedTuple):
    """A layer-direction's round maps stacked by kind, as the kernels read them.

    x-rounds (odd j): ``maps_x`` (nx, I, H), or A (nx, I, k) with ``factors_x`` B (nx, k, H);
    h-rounds (even j): ``maps_h`` (nh, H, I), or A (nh, H, k) with ``factors_h`` (nh, k, I);
    ``bias_x`` (nx, I) and ``bias_h`` (nh, H) or None. Stacking is differentiable, so gradients
    of the stacks reach shared and low-rank parameters through autograd."""

    maps_x: Tensor | None
    maps_h: Tensor | None
    factors_x: Tensor | None
    factors_h: Tensor | None
    bias_x: Tensor | None
    bias_h: Tensor | None

    @classmethod
    def from_params(cls, params: LayerParams) -> StackedMaps:
        def stack(maps, index: int) -> Tensor | None:
            found = [m.factors[index] if index < len(m.factors) else None for m in maps]
            return None if not found or found[0] is None else torch.stack(found)

        def stack_bias(maps) -> Tensor | None:
            return None if not maps or maps[0].bias is None else torch.stack([m.bias for m in maps])

        x_maps, h_maps = params.round_maps[0::2], params.round_maps[1::2]
        return cls(
            stack(x_maps, 0), stack(h_maps, 0), stack(x_maps, 1), stack(h_maps, 1),
            stack_bias(x_maps), stack_bias(h_maps),
        )  # fmt: skip

    def saved(self) -> tuple[list[bool], list[Tensor]]:
        """(which fields are present, the present tensors): for ``save_for_backward``."""
        return [t is not None for t in self], [t for t in self if t is not None]

    @classmethod
    def restore(cls, present: list[bool], tensors: list[Tensor]) -> StackedMaps:
        """The inverse of :meth:`saved`."""
        found = iter(tensors)
        return cls(*(next(found) if p else None for p in present))

    @property
    def rounds(self) -> int:
        return sum(0 if m is None else m.shape[0] for m in (self.maps_x, self.maps_h))

    @property
    def rank(self) -> int:
        """k of low-rank maps, 0 for dense maps."""
        return 0 if self.factors_x is None else self.factors_x.shape[1]


class MogrifyBuffers(NamedTuple):
    """Everything the rounds of T steps write, kept for the backward, each over all R rows of
    the call, step after step (:class:`~mogrifier_fast.backends.layout.StepRows`).

    xs (nx+1, R, I) and hs (nh+1, R, H) hold the states (index 0: the step's inputs, which the
    caller writes); sig_x (nx, R, I), sig_h (nh, R, H) the σ(z) of each round; inner (r, R, k)
    a low-rank round's inner value (else an empty placeholder)."""

    xs: Tensor
    hs: Tensor
    sig_x: Tensor
    sig_h: Tensor
    inner: Tensor

    @classmethod
    def empty(
        cls, rounds: int, rank: int, rows: int, input_size: int, hidden_size: int, like: Tensor
    ) -> MogrifyBuffers:
        nx, nh = (rounds + 1) // 2, rounds // 2
        new = like.new_empty
        return cls(
            new(nx + 1, rows, input_size), new(nh + 1, rows, hidden_size),
            new(nx, rows, input_size), new(nh, rows, hidden_size),
            new(rounds if rank else 0, rows, rank),
        )  # fmt: skip

    def gradient_buffers(self, batch: int) -> tuple[Tensor, Tensor, Tensor, Tensor, Tensor]:
        """What :func:`mogrify_backward` writes: per-step state gradients grad_xs (nx+1, B, I)
        and grad_hs (nh+1, B, H) for a batch of B, then dz_x, dz_h and dinner shaped as sig_x,
        sig_h, inner."""
        xs, hs = self.xs, self.hs
        return (
            xs.new_empty(xs.shape[0], batch, xs.shape[2]),
            hs.new_empty(hs.shape[0], batch, hs.shape[2]),
            torch.empty_like(self.sig_x), torch.empty_like(self.sig_h), torch.empty_like(self.inner),
        )  # fmt: skip


def _stride(t: Tensor | None) -> int:
    return 0 if t is None or t.shape[0] == 0 else t.stride(0)


def _or(t: Tensor | None, like: Tensor) -> Tensor:
    """A placeholder pointer for an argument the kernel does not read."""
    return like if t is None or t.numel() == 0 else t


def _launch_plan(rounds: int, widest: int, rows: int) -> list[tuple[int, int, tuple[int, int]]]:
    """(first, last, grid) per launch: all rounds at once for narrow states, else one per round."""
    row_blocks = triton.cdiv(rows, BLOCK_B)
    if widest <= ONE_LAUNCH_MAX_WIDTH:
        return [(1, rounds, (row_blocks, 1))]
    return [(j, j, (row_blocks, triton.cdiv(widest, 64))) for j in range(1, rounds + 1)]


def _blocks(maps: StackedMaps, input_size: int, hidden_size: int) -> dict:
    return {
        "BLOCK_B": BLOCK_B,
        "BLOCK_N": block(max(input_size, hidden_size)),
        "BLOCK_K": block(max(input_size, hidden_size), most=32),
        "BLOCK_R": block(maps.rank, most=256),
    }


def _backward_blocks(maps: StackedMaps, input_size: int, hidden_size: int) -> dict:
    """:func:`_blocks` with dz tiles 32 columns wide: they are the reduction of ``dz W``, and
    64 spilled registers on sm_80/sm_90 (float32 "ieee" tl.dot runs on CUDA cores, each thread
    holding its operands' fragments: 2 KB spilled with every round in one launch)."""
    return {
        **_blocks(maps, input_size, hidden_size),
        "BLOCK_N": block(max(input_size, hidden_size), most=32),
    }


def mogrify_forward(maps: StackedMaps, buffers: MogrifyBuffers, step: slice) -> None:
    """Run every round of one step, whose rows are ``step``: reads xs[0, step], hs[0, step];
    writes the other states of those rows, σ(z) and low-rank inner values."""
    xs, hs, sig_x, sig_h, inner = (b[:, step] for b in buffers)
    big_i, big_h, rows = xs.shape[-1], hs.shape[-1], xs.shape[1]
    dummy = xs
    for first, last, grid in _launch_plan(maps.rounds, max(big_i, big_h), rows):
        _mogrify_forward_kernel[grid](
            xs, hs, _or(sig_x, dummy), _or(sig_h, dummy), _or(inner, dummy),
            _or(maps.maps_x, dummy), _or(maps.maps_h, dummy),
            _or(maps.factors_x, dummy), _or(maps.factors_h, dummy),
            _or(maps.bias_x, dummy), _or(maps.bias_h, dummy),
            xs.stride(0), hs.stride(0), _stride(sig_x), _stride(sig_h), _stride(inner),
            _stride(maps.maps_x), _stride(maps.maps_h),
            _stride(maps.factors_x), _stride(maps.factors_h), rows,
            X_SIZE=big_i, H_SIZE=big_h, RANK=maps.rank, FIRST=first, LAST=last,
            HAS_BIAS=maps.bias_x is not None, ACC=accumulator(xs.dtype),
            PRECISION=dot_precision(xs.dtype), **_blocks(maps, big_i, big_h),
        )  # fmt: skip


def mogrify_backward(
    maps: StackedMaps,
    buffers: MogrifyBuffers,
    step: slice,
    grad_xs: Tensor,
    grad_hs: Tensor,
    dz_x: Tensor,
    dz_h: Tensor,
    dinner: Tensor,
) -> None:
    """The rounds of one step (rows ``step``) in reverse, on the state gradients grad_xs
    (nx+1, B, I), grad_hs (nh+1, B, H) in place, their first rows (as many as the step has): on
    entry the final x and h states' gradients (from the gates); on exit index 0 holds the
    gradients of the step's inputs. Writes dz_x[:, step] (nx, R, I), dz_h[:, step] and, for
    low-rank maps, dinner[:, step] (r, R, k) = dz A."""
    xs, hs, sig_x, sig_h, _ = (b[:, step] for b in buffers)
    dzx, dzh, dinn = dz_x[:, step], dz_h[:, step], dinner[:, step]
    big_i, big_h, rows = xs.shape[-1], hs.shape[-1], xs.shape[1]
    dummy = xs
    for first, last, grid in reversed(_launch_plan(maps.rounds, max(big_i, big_h), rows)):
        _mogrify_backward_kernel[grid](
            xs, hs, _or(sig_x, dummy), _or(sig_h, dummy), grad_xs, grad_hs,
            _or(dzx, dummy), _or(dzh, dummy), _or(dinn, dummy),
            _or(maps.maps_x, dummy), _or(maps.maps_h, dummy),
            _or(maps.factors_x, dummy), _or(maps.factors_h, dummy),
            xs.stride(0), hs.stride(0), _stride(sig_x), _stride(sig_h),
            grad_xs.stride(0), grad_hs.stride(0), _stride(dzx), _stride(dzh), _stride(dinn),
            _stride(maps.maps_x), _stride(maps.maps_h),
            _stride(maps.factors_x), _stride(maps.factors_h), rows,
            X_SIZE=big_i, H_SIZE=big_h, RANK=maps.rank, FIRST=first, LAST=last,
            ACC=accumulator(xs.dtype), PRECISION=dot_precision(xs.dtype),
            **_backward_blocks(maps, big_i, big_h),
        )  # fmt: skip


def _kind_grads(
    dz: Tensor, source: Tensor, inner: Tensor | None, dinner: Tensor | None
) -> tuple[Tensor, Tensor | None, Tensor]:
    """One kind's map gradients from all rows at once: dz (n, R, out), source (n, R, in)
    -> (maps (n, out, in) or A (n, out, k), B factors (n, k, in) or None, biases (n, out))."""
    n = dz.shape[0]
    dz_rows, source_rows = dz.reshape(n, -1, dz.shape[-1]), source.reshape(n, -1, source.shape[-1])
    bias = dz_rows.sum(1)
    if inner is None:
        return torch.bmm(dz_rows.transpose(1, 2), source_rows), None, bias
    inner_rows, dinner_rows = (t.reshape(n, -1, t.shape[-1]) for t in (inner, dinner))
    return (
        torch.bmm(dz_rows.transpose(1, 2), inner_rows),
        torch.bmm(dinner_rows.transpose(1, 2), source_rows),
        bias,
    )


def stacked_map_grads(
    maps: StackedMaps, buffers: MogrifyBuffers, dz_x: Tensor, dz_h: Tensor, dinner: Tensor
) -> tuple[Tensor | None, ...]:
    """Gradients of the six :class:`StackedMaps` fields (None where a field is None), each one
    batched product over all R rows, from the dz written by :func:`mogrify_backward`."""
    nx, nh = dz_x.shape[0], dz_h.shape[0]
    xs, hs, low_rank = buffers.xs, buffers.hs, maps.rank > 0
    x_grads = h_grads = (None, None, None)
    if nx:  # x-round m reads h-state m
        x_grads = _kind_grads(
            dz_x, hs[:nx], buffers.inner[0::2] if low_rank else None,
            dinner[0::2] if low_rank else None,
        )  # fmt: skip
    if nh:  # h-round m reads x-state m + 1
        h_grads = _kind_grads(
            dz_h, xs[1 : nh + 1], buffers.inner[1::2] if low_rank else None,
            dinner[1::2] if low_rank else None,
        )  # fmt: skip
    grads = (x_grads[0], h_grads[0], x_grads[1], h_grads[1], x_grads[2], h_grads[2])
    return tuple(None if field is None else g for g, field in zip(grads, maps, strict=True))
