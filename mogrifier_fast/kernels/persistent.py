"""The whole recurrence in one Triton launch per direction of the chain: forward and backward.

Every step is a fixed sequence of *phases*; each phase computes one product with its epilogue
fused, and a phase reads what earlier phases wrote for all rows, so a barrier separates them.
Forward, per step: each mogrifier round (a dense round is one phase; a low-rank round two: the
inner value ``src Bᵀ`` (rows, k), then ``inner Aᵀ`` with the ``2σ(·)⊙`` epilogue), then the gate
product with the LSTM pointwise step fused into its epilogue (four gate accumulators per
column tile). Backward, per step, last step first: the pointwise backward, the gate product's
data gradients (into x and h), each round in reverse (one phase dense, two low-rank: ``dz A``,
then ``· B``), and the copy of the input's gradient out. Weight gradients are left to the caller
(one product over all rows), and the buffers are the step-by-step backend's
(:class:`~mogrifier_fast.kernels.mogrify.MogrifyBuffers`, gates (R, 4H), cells (B + R, H)).

A phase's output is cut into tiles of ``BLOCK_B`` rows by ``BLOCK_N`` columns, dealt to the
programs round-robin (tile u: row block u mod (row blocks), column block u div (row blocks)).
Two plans launch the same code:

* ``"rows"``: one program per row block of the batch. Tile u then always falls to the program of
  its row block, so a program depends only on its own rows and a CTA barrier
  (``tl.debug_barrier``) separates phases. Parallelism is the number of row blocks.
* ``"grid"``: up to one program per SM (:func:`grid_programs`), every program taking tiles of
  every phase; a grid-wide barrier (:func:`_grid_barrier`: an atomic counter, release on
  arrival, acquire while waiting) separates phases. The launch is cooperative
  (``launch_cooperative_grid=True``), which guarantees all programs are resident, so the spin
  cannot deadlock. Under Triton's CPU interpreter, which runs programs one after another, each
  (step, phase) is its own launch instead: the launch boundary is the barrier, and the phase code
  is the same.

States live in global memory between phases (L2-resident); every tile re-reads its weight
columns from L2 each step (register-resident weights would need the whole weight set to fit in
the chip's registers, several times over at the sizes that matter).
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl
from torch import Tensor

from mogrifier_fast.backends.layout import StepRows
from mogrifier_fast.kernels import accumulator, dot_precision, interpreted
from mogrifier_fast.kernels.lstm import _cell_backward_tile, _cell_forward, _store_gates
from mogrifier_fast.kernels.mogrify import (
    BLOCK_B,
    MogrifyBuffers,
    StackedMaps,
    _dz_tile,
    _load_tile,
    _or,
    _stride,
)

PLANS = ("rows", "grid")
# Columns per tile and the reduction's chunk in each product, compiled: 16 columns, tl.dot's
# smallest width, so a phase has the most tiles (and wider tiles spilled registers in the rows
# plan at sm_90: 32 columns, 424 bytes in the forward).
BLOCK_N, BLOCK_K = 16, 32
# The same under Triton's CPU interpreter, where an operation costs about the same whatever its
# size: wider tiles halve the time of the CPU tests (tests/test_kernels.py also runs the compiled
# sizes there).
INTERPRETER_BLOCK_N, INTERPRETER_BLOCK_K = 32, 64
# Compile options of the compiled launches. Software pipelining (Triton's default 3 stages) keeps
# prefetched tiles of every loop live at once: at sm_90 the bf16 forward then spilled up to 1.3 KB
# (paper size); with 1 stage nothing spills. ptxas may use all 255 registers per thread (it held
# some kernels to 128 and spilled); 4 warps suit 16 x 16 tiles.
LAUNCH_OPTIONS = {"num_warps": 4, "num_stages": 1, "maxnreg": 255}
# Programs of the grid plan under Triton's CPU interpreter (no SMs to count): an odd number, so
# tiles fall unevenly and every program takes several.
INTERPRETER_PROGRAMS = 3


# -- the grid-wide barrier ---------------------------------------------------------------------


@triton.jit
def _grid_barrier(counter, passed, GRID: tl.constexpr):
    """The barrier between two phases; returns the number of barriers passed (``passed`` + 1).

    With GRID, a grid-wide barrier: each program adds 1 to ``counter`` (zero at launch) with
    release semantics after a CTA barrier, so its stores are visible first, then spins with
    acquire reads until all programs have arrived ``passed + 1`` times. Otherwise a CTA barrier."""
    tl.debug_barrier()
    if GRID:
        target = (passed + 1) * tl.num_programs(0)
        tl.atomic_add(counter, 1, sem="release")
        arrived = tl.atomic_add(counter, 0, sem="acquire")
        while arrived < target:
            arrived = tl.atomic_add(counter, 0, sem="acquire")
        tl.debug_barrier()
    return passed + 1


@triton.jit
def _end_phase(counter, passed, GRID: tl.constexpr, RUN_PHASE: tl.constexpr):
    """The barrier after a phase where the launch runs every phase (RUN_PHASE < 0); else
    nothing (the launch ends with the phase). Returns the barriers passed."""
    if RUN_PHASE < 0:
        passed = _grid_barrier(counter, passed, GRID)
    return passed


@triton.jit
def _barrier_check_kernel(counter, slots, sums, phases):
    """The barrier's self-test: in phase k program p writes (p + 1)(k + 1) into its slot of one
    of two banks, and after the barrier reads the slot of program (p + k + 1) mod P. Every
    program's sum of reads is then known (:func:`barrier_check`); a barrier that lets a program
    through early reads a stale or unwritten slot."""
    pid, programs = tl.program_id(0), tl.num_programs(0)
    total = 0
    passed = 0
    for k in range(phases):
        bank = slots + (k % 2) * programs
        tl.store(bank + pid, (pid + 1) * (k + 1))
        passed = _grid_barrier(counter, passed, True)
        total += tl.load(bank + (pid + k + 1) % programs, volatile=True)
    tl.store(sums + pid, total)


def barrier_check(programs: int, phases: int, device: torch.device | str = "cuda") -> bool:
    """Run the barrier self-test on ``programs`` co-resident programs (a cooperative launch) for
    ``phases`` phases; True if every program read what the barrier promises."""
    counter = torch.zeros(1, dtype=torch.int32, device=device)
    slots = torch.zeros(2 * programs, dtype=torch.int32, device=device)
    sums = torch.empty(programs, dtype=torch.int32, device=device)
    _barrier_check_kernel[(programs,)](counter, slots, sums, phases, launch_cooperative_grid=True)
    pid, k = torch.arange(programs), torch.arange(phases)
    reader = (pid[:, None] + k[None, :] + 1) % programs
    expected = ((reader + 1) * (k[None, :] + 1)).sum(1)
    return torch.equal(sums.cpu().long(), expected)


# -- tiles ---------------------------------------------------------------------------------------


@triton.jit
def _dot(a, w, rows, row_ok, cols, acc, K: tl.constexpr, COLS: tl.constexpr,
         K_STRIDE: tl.constexpr, COL_STRIDE: tl.constexpr, BLOCK_K: tl.constexpr,
         PRECISION: tl.constexpr):  # fmt: skip
    """acc + a[rows, :K] @ W[:K, cols] for a (·, K) row-major and W (K, COLS) with element (k, c)
    at w + k K_STRIDE + c COL_STRIDE: a weight (COLS, K) row-major read transposed has strides
    (1, K); a (K, COLS) one (COLS, 1)."""
    for k0 in range(0, K, BLOCK_K):
        k = k0 + tl.arange(0, BLOCK_K)
        wk = tl.load(
            w + k[:, None] * K_STRIDE + cols[None, :] * COL_STRIDE,
            mask=(k[:, None] < K) & (cols[None, :] < COLS),
            other=0.0,
        )
        a_tile = _load_tile(a, rows, k, K, row_ok)
        acc = tl.dot(a_tile, wk, acc, input_precision=PRECISION, out_dtype=acc.dtype)
    return acc


@triton.jit
def _dz_dot_w(g_new, g_old, old, sig, dz, w, rows, row_ok, cols, stored, acc,
              OUT: tl.constexpr, WIDTH: tl.constexpr, ACC: tl.constexpr,
              BLOCK_K: tl.constexpr, PRECISION: tl.constexpr):  # fmt: skip
    """acc + dz[rows, :OUT] @ w[:OUT, cols] for w (OUT, WIDTH) row-major, dz formed on the fly
    from the round's state gradient (``_dz_tile``; dz and g_old stored for columns < stored)."""
    for n0 in range(0, OUT, BLOCK_K):
        n = n0 + tl.arange(0, BLOCK_K)
        d = _dz_tile(g_new, g_old, old, sig, dz, rows, n, row_ok, OUT, stored, ACC)
        wk = tl.load(
            w + n[:, None] * WIDTH + cols[None, :],
            mask=(n[:, None] < OUT) & (cols[None, :] < WIDTH),
            other=0.0,
        )
        acc = tl.dot(
            d.to(w.dtype.element_ty), wk, acc, input_precision=PRECISION, out_dtype=acc.dtype
        )
    return acc


@triton.jit
def _store_tile(out, rows, row_ok, cols, value, WIDTH: tl.constexpr):
    """out[rows, cols] = value, for out (·, WIDTH) row-major."""
    tl.store(
        out + rows[:, None] * WIDTH + cols[None, :],
        value.to(out.dtype.element_ty),
        mask=row_ok[:, None] & (cols[None, :] < WIDTH),
    )


@triton.jit
def _tile_of(unit, row_blocks, BLOCK_B: tl.constexpr, BLOCK_N: tl.constexpr):
    """Tile ``unit``'s rows and columns: row block unit mod row_blocks, column block unit div."""
    rows = (unit % row_blocks) * BLOCK_B + tl.arange(0, BLOCK_B)
    return rows, (unit // row_blocks) * BLOCK_N + tl.arange(0, BLOCK_N)


@triton.jit
def _round_phases(
    src, old, new, sig, inner, w, v, b, n_rows, row_blocks, counter, passed,
    PHASE: tl.constexpr, OUT: tl.constexpr, IN: tl.constexpr, RANK: tl.constexpr,
    HAS_BIAS: tl.constexpr,
    ACC: tl.constexpr, BLOCK_B: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr,
    BLOCK_R: tl.constexpr, PRECISION: tl.constexpr, GRID: tl.constexpr,
    RUN_PHASE: tl.constexpr,
):  # fmt: skip
    """One round, new = 2 σ(src Wᵀ + b) ⊙ old (σ into sig), W = w (OUT, IN) or w (OUT, RANK) @
    v (RANK, IN) (then ``inner`` = src vᵀ first, its own phase). Returns the barriers passed."""
    pid, programs = tl.program_id(0), tl.num_programs(0)
    if RANK > 0:
        if RUN_PHASE < 0 or RUN_PHASE == PHASE:
            for unit in range(pid, row_blocks * tl.cdiv(RANK, BLOCK_R), programs):
                rows, ranks = _tile_of(unit, row_blocks, BLOCK_B, BLOCK_R)
                row_ok = rows < n_rows
                acc = tl.zeros((BLOCK_B, BLOCK_R), ACC)
                acc = _dot(src, v, rows, row_ok, ranks, acc, IN, RANK, 1, IN, BLOCK_K, PRECISION)
                _store_tile(inner, rows, row_ok, ranks, acc, RANK)
        passed = _end_phase(counter, passed, GRID, RUN_PHASE)
    if RUN_PHASE < 0 or PHASE + (RANK > 0) == RUN_PHASE:
        for unit in range(pid, row_blocks * tl.cdiv(OUT, BLOCK_N), programs):
            rows, cols = _tile_of(unit, row_blocks, BLOCK_B, BLOCK_N)
            row_ok = rows < n_rows
            z = tl.zeros((BLOCK_B, BLOCK_N), ACC)
            if RANK > 0:
                z = _dot(inner, w, rows, row_ok, cols, z, RANK, OUT, 1, RANK, BLOCK_K, PRECISION)
            else:
                z = _dot(src, w, rows, row_ok, cols, z, IN, OUT, 1, IN, BLOCK_K, PRECISION)
            if HAS_BIAS:
                z += tl.load(b + cols, mask=cols < OUT, other=0.0).to(ACC)[None, :]
            s = tl.sigmoid(z)
            gated = _load_tile(old, rows, cols, OUT, row_ok).to(ACC)
            _store_tile(sig, rows, row_ok, cols, s, OUT)
            _store_tile(new, rows, row_ok, cols, 2 * s * gated, OUT)
    passed = _end_phase(counter, passed, GRID, RUN_PHASE)
    return passed


@triton.jit
def _round_backward_phases(
    g_new, g_old, g_src, old, sig, dz, dinner, w, v, n_rows, row_blocks, counter, passed,
    PHASE: tl.constexpr, OUT: tl.constexpr, IN: tl.constexpr, RANK: tl.constexpr, ACC: tl.constexpr,
    BLOCK_B: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr,
    BLOCK_R: tl.constexpr, PRECISION: tl.constexpr, GRID: tl.constexpr,
    RUN_PHASE: tl.constexpr,
):  # fmt: skip
    """One round's backward: g_src += dz W, dz = g_new ⊙ 2 old ⊙ σ'(z) (stored, with g_old =
    2σ ⊙ g_new, by the tiles of column block 0); low rank: dinner = dz A, then g_src += dinner B,
    two phases. Returns the barriers passed."""
    pid, programs = tl.program_id(0), tl.num_programs(0)
    if RANK > 0:
        if RUN_PHASE < 0 or RUN_PHASE == PHASE:
            for unit in range(pid, row_blocks * tl.cdiv(RANK, BLOCK_R), programs):
                rows, ranks = _tile_of(unit, row_blocks, BLOCK_B, BLOCK_R)
                row_ok = rows < n_rows
                stored = OUT * (unit < row_blocks).to(tl.int32)
                acc = tl.zeros((BLOCK_B, BLOCK_R), ACC)
                acc = _dz_dot_w(g_new, g_old, old, sig, dz, w, rows, row_ok, ranks, stored, acc,
                                OUT, RANK, ACC, BLOCK_K, PRECISION)  # fmt: skip
                _store_tile(dinner, rows, row_ok, ranks, acc, RANK)
        passed = _end_phase(counter, passed, GRID, RUN_PHASE)
    if RUN_PHASE < 0 or PHASE + (RANK > 0) == RUN_PHASE:
        for unit in range(pid, row_blocks * tl.cdiv(IN, BLOCK_N), programs):
            rows, cols = _tile_of(unit, row_blocks, BLOCK_B, BLOCK_N)
            row_ok = rows < n_rows
            acc = _load_tile(g_src, rows, cols, IN, row_ok).to(ACC)
            if RANK > 0:
                acc = _dot(dinner, v, rows, row_ok, cols, acc, RANK, IN, IN, 1, BLOCK_K, PRECISION)
            else:
                stored = OUT * (unit < row_blocks).to(tl.int32)
                acc = _dz_dot_w(g_new, g_old, old, sig, dz, w, rows, row_ok, cols, stored, acc,
                                OUT, IN, ACC, BLOCK_K, PRECISION)  # fmt: skip
            _store_tile(g_src, rows, row_ok, cols, acc, IN)
    passed = _end_phase(counter, passed, GRID, RUN_PHASE)
    return passed


@triton.jit
def _accumulate_gates(
    v, w, rows, row_ok, n, acc_i, acc_f, acc_g, acc_o, K_SIZE: tl.constexpr,
    H_SIZE: tl.constexpr, BLOCK_K: tl.constexpr, PRECISION: tl.constexpr,
):  # fmt: skip
    """The four gate accumulators of columns n plus v (rows, K) Wᵀ, W (4H, K) row-major."""
    G = 4 * H_SIZE
    acc_i = _dot(v, w, rows, row_ok, n, acc_i, K_SIZE, G, 1, K_SIZE, BLOCK_K, PRECISION)
    acc_f = _dot(v, w, rows, row_ok, n + H_SIZE, acc_f, K_SIZE, G, 1, K_SIZE, BLOCK_K, PRECISION)
    acc_g = _dot(
        v, w, rows, row_ok, n + 2 * H_SIZE, acc_g, K_SIZE, G, 1, K_SIZE, BLOCK_K, PRECISION
    )
    acc_o = _dot(
        v, w, rows, row_ok, n + 3 * H_SIZE, acc_o, K_SIZE, G, 1, K_SIZE, BLOCK_K, PRECISION
    )
    return acc_i, acc_f, acc_g, acc_o


@triton.jit
def _gate_tile(
    x, h, w_ih, w_hh, bias, gates, c_prev, c_next, h_out, h_copy, copy_rows, rows, n, n_rows,
    X_SIZE: tl.constexpr, H_SIZE: tl.constexpr, GATE_BIAS: tl.constexpr, ACC: tl.constexpr,
    BLOCK_B: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr,
    PRECISION: tl.constexpr,
):  # fmt: skip
    """Columns n of the gates = x W_ihᵀ + h W_hhᵀ + bias (kept), then of c' and h' (h' also into
    h_copy for rows below copy_rows)."""
    row_ok = rows < n_rows
    acc_i = tl.zeros((BLOCK_B, BLOCK_N), ACC)
    acc_f = tl.zeros((BLOCK_B, BLOCK_N), ACC)
    acc_g = tl.zeros((BLOCK_B, BLOCK_N), ACC)
    acc_o = tl.zeros((BLOCK_B, BLOCK_N), ACC)
    acc_i, acc_f, acc_g, acc_o = _accumulate_gates(
        x, w_ih, rows, row_ok, n, acc_i, acc_f, acc_g, acc_o, X_SIZE, H_SIZE, BLOCK_K, PRECISION
    )
    acc_i, acc_f, acc_g, acc_o = _accumulate_gates(
        h, w_hh, rows, row_ok, n, acc_i, acc_f, acc_g, acc_o, H_SIZE, H_SIZE, BLOCK_K, PRECISION
    )
    col_ok = n < H_SIZE
    if GATE_BIAS:
        acc_i += tl.load(bias + n, mask=col_ok, other=0.0).to(ACC)[None, :]
        acc_f += tl.load(bias + H_SIZE + n, mask=col_ok, other=0.0).to(ACC)[None, :]
        acc_g += tl.load(bias + 2 * H_SIZE + n, mask=col_ok, other=0.0).to(ACC)[None, :]
        acc_o += tl.load(bias + 3 * H_SIZE + n, mask=col_ok, other=0.0).to(ACC)[None, :]
    ok = row_ok[:, None] & col_ok[None, :]
    _store_gates(gates, rows[:, None] * (4 * H_SIZE) + n[None, :], ok, acc_i, acc_f, acc_g, acc_o,
                 H_SIZE)  # fmt: skip
    c, h_new = _cell_forward(acc_i, acc_f, acc_g, acc_o, _load_tile(c_prev, rows, n, H_SIZE, row_ok).to(ACC))  # fmt: skip
    _store_tile(c_next, rows, row_ok, n, c, H_SIZE)
    _store_tile(h_out, rows, row_ok, n, h_new, H_SIZE)
    _store_tile(h_copy, rows, rows < copy_rows, n, h_new, H_SIZE)


# -- the kernels ---------------------------------------------------------------------------------


@triton.jit
def _persistent_forward_kernel(
    xs, hs, sig_x, sig_h, inner, maps_x, maps_h, factors_x, factors_h, bias_x, bias_h,
    w_ih, w_hh, gate_bias, gates, cells, output, step_rows, step_first, cell_first, counter,
    xs_stride, hs_stride, sig_x_stride, sig_h_stride, inner_stride,
    maps_x_stride, maps_h_stride, factors_x_stride, factors_h_stride,
    step_begin, step_end, batch_row_blocks,
    X_SIZE: tl.constexpr, H_SIZE: tl.constexpr, RANK: tl.constexpr, ROUNDS: tl.constexpr,
    HAS_BIAS: tl.constexpr, GATE_BIAS: tl.constexpr, ACC: tl.constexpr,
    BLOCK_B: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr, BLOCK_R: tl.constexpr,
    PRECISION: tl.constexpr, OWN_ROWS: tl.constexpr, GRID: tl.constexpr,
    RUN_PHASE: tl.constexpr, PHASES_PER_ROUND: tl.constexpr,
):  # fmt: skip
    """Steps [step_begin, step_end): step t runs step_rows[t] rows from row step_first[t] of every
    buffer (cells: the cell it starts from at cell_first[t], the one it writes at
    cell_first[t + 1]). xs[0] holds the inputs and hs[0] h0 (step 0's rows) on entry. OWN_ROWS:
    the batch's row blocks (one per program) in every phase, else each step's own; RUN_PHASE:
    only that phase of each step (no barriers), or every phase (-1)."""
    passed = 0
    for t in range(step_begin, step_end):
        n_rows = tl.load(step_rows + t)
        first = tl.load(step_first + t)
        row_blocks = batch_row_blocks if OWN_ROWS else tl.cdiv(n_rows, BLOCK_B)
        x_at, h_at = first * X_SIZE, first * H_SIZE
        for j in tl.static_range(1, ROUNDS + 1):
            if RUN_PHASE >= 0 and j - 1 != RUN_PHASE // PHASES_PER_ROUND:
                pass  # another round's phase (the interpreter's launches): nothing to form here
            elif j % 2 == 1:  # x-round m reads h-state m
                m = (j - 1) // 2
                passed = _round_phases(
                    hs + m * hs_stride + h_at, xs + m * xs_stride + x_at,
                    xs + (m + 1) * xs_stride + x_at, sig_x + m * sig_x_stride + x_at,
                    inner + (j - 1) * inner_stride + first * RANK, maps_x + m * maps_x_stride,
                    factors_x + m * factors_x_stride, bias_x + m * X_SIZE, n_rows, row_blocks,
                    counter, passed, (j - 1) * PHASES_PER_ROUND, X_SIZE, H_SIZE, RANK, HAS_BIAS,
                    ACC, BLOCK_B, BLOCK_N, BLOCK_K, BLOCK_R, PRECISION, GRID, RUN_PHASE,
                )  # fmt: skip
            else:  # h-round m reads x-state m + 1
                m = j // 2 - 1
                passed = _round_phases(
                    xs + (m + 1) * xs_stride + x_at, hs + m * hs_stride + h_at,
                    hs + (m + 1) * hs_stride + h_at, sig_h + m * sig_h_stride + h_at,
                    inner + (j - 1) * inner_stride + first * RANK, maps_h + m * maps_h_stride,
                    factors_h + m * factors_h_stride, bias_h + m * H_SIZE, n_rows, row_blocks,
                    counter, passed, (j - 1) * PHASES_PER_ROUND, H_SIZE, X_SIZE, RANK, HAS_BIAS,
                    ACC, BLOCK_B, BLOCK_N, BLOCK_K, BLOCK_R, PRECISION, GRID, RUN_PHASE,
                )  # fmt: skip
        if RUN_PHASE < 0 or RUN_PHASE == ROUNDS * PHASES_PER_ROUND:
            # The next step's h input: this step's h for the rows that run it (its rows follow).
            copy_rows = tl.load(step_rows + t + 1)  # step_rows ends with a 0
            c_prev = cells + tl.load(cell_first + t) * H_SIZE
            c_next = cells + tl.load(cell_first + t + 1) * H_SIZE
            for unit in range(tl.program_id(0), row_blocks * tl.cdiv(H_SIZE, BLOCK_N), tl.num_programs(0)):  # fmt: skip
                rows, n = _tile_of(unit, row_blocks, BLOCK_B, BLOCK_N)
                _gate_tile(
                    xs + ((ROUNDS + 1) // 2) * xs_stride + x_at,
                    hs + (ROUNDS // 2) * hs_stride + h_at, w_ih, w_hh, gate_bias,
                    gates + 4 * h_at, c_prev, c_next, output + h_at,
                    hs + (first + n_rows) * H_SIZE, copy_rows, rows, n, n_rows,
                    X_SIZE, H_SIZE, GATE_BIAS, ACC, BLOCK_B, BLOCK_N, BLOCK_K, PRECISION,
                )  # fmt: skip
        passed = _end_phase(counter, passed, GRID, RUN_PHASE)


@triton.jit
def _persistent_backward_kernel(
    xs, hs, sig_x, sig_h, maps_x, maps_h, factors_x, factors_h, w_ih, w_hh, gates, cells,
    grad_output, grad_xs, grad_hs, grad_cell, grad_gates, dz_x, dz_h, dinner, grad_x,
    step_rows, step_first, cell_first, counter,
    xs_stride, hs_stride, sig_x_stride, sig_h_stride, grad_xs_stride, grad_hs_stride,
    dz_x_stride, dz_h_stride, dinner_stride,
    maps_x_stride, maps_h_stride, factors_x_stride, factors_h_stride,
    steps, back_begin, back_end, batch_row_blocks,
    X_SIZE: tl.constexpr, H_SIZE: tl.constexpr, RANK: tl.constexpr, ROUNDS: tl.constexpr,
    ACC: tl.constexpr, BLOCK_B: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr,
    BLOCK_R: tl.constexpr, PRECISION: tl.constexpr, OWN_ROWS: tl.constexpr,
    GRID: tl.constexpr, RUN_PHASE: tl.constexpr, PHASES_PER_ROUND: tl.constexpr,
):  # fmt: skip
    """Steps steps - 1 - back for back in [back_begin, back_end) of the backward (rows, plans and
    phases as in the forward). On entry grad_hs[0] holds the gradient of h_n and grad_cell that
    of c_n (each sequence's last step); on exit grad_hs[0] and grad_cell hold those of h0 and
    c0. grad_xs (nx+1, B, I) and grad_hs (nh+1, B, H) are per-step scratch; a step's rows are
    their first ones, so the rows of sequences that end earlier keep h_n's and c_n's
    gradients."""
    pid, programs = tl.program_id(0), tl.num_programs(0)
    G = 4 * H_SIZE
    passed = 0
    for back in range(back_begin, back_end):
        t = steps - 1 - back
        n_rows = tl.load(step_rows + t)
        first = tl.load(step_first + t)
        row_blocks = batch_row_blocks if OWN_ROWS else tl.cdiv(n_rows, BLOCK_B)
        x_at, h_at = first * X_SIZE, first * H_SIZE
        if RUN_PHASE < 0 or RUN_PHASE == 0:  # the pointwise backward
            c_prev = cells + tl.load(cell_first + t) * H_SIZE
            c_next = cells + tl.load(cell_first + t + 1) * H_SIZE
            for unit in range(pid, row_blocks * tl.cdiv(H_SIZE, BLOCK_N), programs):
                rows, cols = _tile_of(unit, row_blocks, BLOCK_B, BLOCK_N)
                _cell_backward_tile(
                    gates + 4 * h_at, c_prev, c_next, grad_output + h_at, grad_hs, grad_cell,
                    grad_gates + 4 * h_at, rows, cols, n_rows, H_SIZE, ACC,
                )  # fmt: skip
            passed = _end_phase(counter, passed, GRID, RUN_PHASE)
        if RUN_PHASE < 0 or RUN_PHASE == 1:  # the gate product's data gradients
            x_units = row_blocks * tl.cdiv(X_SIZE, BLOCK_N)
            h_units = row_blocks * tl.cdiv(H_SIZE, BLOCK_N)
            for unit in range(pid, x_units + h_units, programs):
                if unit < x_units:
                    rows, cols = _tile_of(unit, row_blocks, BLOCK_B, BLOCK_N)
                    row_ok = rows < n_rows
                    acc = tl.zeros((BLOCK_B, BLOCK_N), ACC)
                    acc = _dot(grad_gates + 4 * h_at, w_ih, rows, row_ok, cols, acc, G, X_SIZE, X_SIZE,
                               1, BLOCK_K, PRECISION)  # fmt: skip
                    _store_tile(grad_xs + ((ROUNDS + 1) // 2) * grad_xs_stride, rows, row_ok,
                                cols, acc, X_SIZE)  # fmt: skip
                else:
                    rows, cols = _tile_of(unit - x_units, row_blocks, BLOCK_B, BLOCK_N)
                    row_ok = rows < n_rows
                    acc = tl.zeros((BLOCK_B, BLOCK_N), ACC)
                    acc = _dot(grad_gates + 4 * h_at, w_hh, rows, row_ok, cols, acc, G, H_SIZE, H_SIZE,
                               1, BLOCK_K, PRECISION)  # fmt: skip
                    _store_tile(grad_hs + (ROUNDS // 2) * grad_hs_stride, rows, row_ok, cols,
                                acc, H_SIZE)  # fmt: skip
            passed = _end_phase(counter, passed, GRID, RUN_PHASE)
        for back_j in tl.static_range(0, ROUNDS):
            j = ROUNDS - back_j
            phase = 2 + back_j * PHASES_PER_ROUND
            if RUN_PHASE >= 0 and back_j != (RUN_PHASE - 2) // PHASES_PER_ROUND:
                pass  # another phase (the interpreter's launches): nothing to form here
            elif j % 2 == 1:  # x-round m: new x-state m + 1 from x-state m, reading h-state m
                m = (j - 1) // 2
                passed = _round_backward_phases(
                    grad_xs + (m + 1) * grad_xs_stride, grad_xs + m * grad_xs_stride,
                    grad_hs + m * grad_hs_stride, xs + m * xs_stride + x_at,
                    sig_x + m * sig_x_stride + x_at, dz_x + m * dz_x_stride + x_at,
                    dinner + (j - 1) * dinner_stride + first * RANK, maps_x + m * maps_x_stride,
                    factors_x + m * factors_x_stride, n_rows, row_blocks, counter, passed, phase,
                    X_SIZE, H_SIZE, RANK, ACC, BLOCK_B, BLOCK_N, BLOCK_K, BLOCK_R, PRECISION,
                    GRID, RUN_PHASE,
                )  # fmt: skip
            else:  # h-round m: new h-state m + 1 from h-state m, reading x-state m + 1
                m = j // 2 - 1
                passed = _round_backward_phases(
                    grad_hs + (m + 1) * grad_hs_stride, grad_hs + m * grad_hs_stride,
                    grad_xs + (m + 1) * grad_xs_stride, hs + m * hs_stride + h_at,
                    sig_h + m * sig_h_stride + h_at, dz_h + m * dz_h_stride + h_at,
                    dinner + (j - 1) * dinner_stride + first * RANK, maps_h + m * maps_h_stride,
                    factors_h + m * factors_h_stride, n_rows, row_blocks, counter, passed, phase,
                    H_SIZE, X_SIZE, RANK, ACC, BLOCK_B, BLOCK_N, BLOCK_K, BLOCK_R, PRECISION,
                    GRID, RUN_PHASE,
                )  # fmt: skip
        if RUN_PHASE < 0 or RUN_PHASE == 2 + ROUNDS * PHASES_PER_ROUND:  # the input's gradient
            for unit in range(pid, row_blocks * tl.cdiv(X_SIZE, BLOCK_N), programs):
                rows, cols = _tile_of(unit, row_blocks, BLOCK_B, BLOCK_N)
                row_ok = rows < n_rows
                _store_tile(grad_x + x_at, rows, row_ok, cols,
                            _load_tile(grad_xs, rows, cols, X_SIZE, row_ok), X_SIZE)  # fmt: skip


# -- launching -----------------------------------------------------------------------------------


def grid_programs(device: torch.device) -> int:
    """The grid plan's most programs on ``device``: one per SM (all resident, so the grid
    barrier is safe), or :data:`INTERPRETER_PROGRAMS` on CPU."""
    if device.type == "cuda":
        return torch.cuda.get_device_properties(device).multi_processor_count
    return INTERPRETER_PROGRAMS


def _plan_meta(plan: str, maps: StackedMaps, input_size: int, hidden_size: int) -> dict:
    """Block sizes and phase counts of a plan."""
    if interpreted(_persistent_forward_kernel):
        block_n, block_k = INTERPRETER_BLOCK_N, INTERPRETER_BLOCK_K
    else:
        block_n, block_k = BLOCK_N, BLOCK_K
    return {
        "BLOCK_B": BLOCK_B, "BLOCK_N": block_n, "BLOCK_K": block_k, "BLOCK_R": block_n,
        "ROUNDS": maps.rounds, "RANK": maps.rank, "PHASES_PER_ROUND": 2 if maps.rank else 1,
        "X_SIZE": input_size, "H_SIZE": hidden_size, "OWN_ROWS": plan == "rows",
    }  # fmt: skip


def grid_size(tiles: int, most: int) -> int:
    """Programs for a phase of ``tiles`` tiles on at most ``most`` programs: as few as deal the
    tiles in the same number of rounds, so every program takes as many (256 tiles on 132 SMs:
    128 programs, two tiles each)."""
    return triton.cdiv(tiles, triton.cdiv(tiles, most))


def _most_tiles(meta: dict, rows: int, backward: bool) -> int:
    """The most tiles a phase of the forward or of the backward has, every row running (the
    backward's widest phase forms the gradients of x and h together)."""
    cdiv, n = triton.cdiv, meta["BLOCK_N"]
    widths = [cdiv(meta["X_SIZE"], n), cdiv(meta["H_SIZE"], n), cdiv(max(meta["RANK"], 1), n)]
    if backward:
        widths.append(widths[0] + widths[1])
    return cdiv(rows, meta["BLOCK_B"]) * max(widths)


def _launch(kernel, plan: str, meta: dict, args: tuple, steps: int, phases: int, rows: int,
            device: torch.device, extra: tuple = ()) -> None:  # fmt: skip
    """Launch ``kernel`` over all steps in ``plan``: rows (one program per row block), grid (one
    cooperative launch), or, under the interpreter, grid as one launch per (step, phase).
    ``extra`` precedes the step range in the kernel's arguments."""
    row_blocks = triton.cdiv(rows, meta["BLOCK_B"])
    counter = torch.zeros(1, dtype=torch.int32, device=device)
    compiled = not interpreted(kernel)
    options = LAUNCH_OPTIONS if compiled else {}
    if plan == "rows":
        kernel[(row_blocks,)](*args, counter, *extra, 0, steps, row_blocks, GRID=False,
                              RUN_PHASE=-1, **meta, **options)  # fmt: skip
        return
    tiles = _most_tiles(meta, rows, backward=kernel is _persistent_backward_kernel)
    programs = grid_size(tiles, grid_programs(device))
    if compiled:
        kernel[(programs,)](*args, counter, *extra, 0, steps, row_blocks, GRID=True,
                            RUN_PHASE=-1, launch_cooperative_grid=True, **meta, **options)  # fmt: skip
        return
    for step in range(steps):
        for phase in range(phases):
            kernel[(programs,)](*args, counter, *extra, step, step + 1, row_blocks, GRID=False,
                                RUN_PHASE=phase, **meta)  # fmt: skip


def persistent_forward(
    maps: StackedMaps, buffers: MogrifyBuffers, w_ih: Tensor, w_hh: Tensor,
    bias: Tensor | None, gates: Tensor, cells: Tensor, output: Tensor, steps: StepRows,
    plan: str,
) -> None:  # fmt: skip
    """Every step in one launch (``plan``: "rows" or "grid"), each on its rows (``steps``): reads
    xs[0] (the inputs), hs[0]'s first B rows (h0) and cells' (c0); writes the rest of
    ``buffers`` (R rows), gates (R, 4H), cells (B + R, H) past c0 and output (R, H)."""
    xs, hs, sig_x, sig_h, inner = buffers
    dummy = xs
    meta = _plan_meta(plan, maps, xs.shape[2], hs.shape[2])
    args = (
        xs, hs, _or(sig_x, dummy), _or(sig_h, dummy), _or(inner, dummy),
        _or(maps.maps_x, dummy), _or(maps.maps_h, dummy),
        _or(maps.factors_x, dummy), _or(maps.factors_h, dummy),
        _or(maps.bias_x, dummy), _or(maps.bias_h, dummy),
        w_ih, w_hh, _or(bias, dummy), gates, cells, output, *steps.tables(xs.device),
    )  # fmt: skip
    strides = (
        xs.stride(0), hs.stride(0), _stride(sig_x), _stride(sig_h), _stride(inner),
        _stride(maps.maps_x), _stride(maps.maps_h),
        _stride(maps.factors_x), _stride(maps.factors_h),
    )  # fmt: skip
    meta.update(HAS_BIAS=maps.bias_x is not None, GATE_BIAS=bias is not None,
                ACC=accumulator(xs.dtype), PRECISION=dot_precision(xs.dtype))  # fmt: skip
    phases = maps.rounds * meta["PHASES_PER_ROUND"] + 1
    _launch(_persistent_forward_kernel, plan, meta, args, steps.steps, phases, steps.batch,
            xs.device, extra=strides)  # fmt: skip


def persistent_backward(
    maps: StackedMaps, buffers: MogrifyBuffers, w_ih: Tensor, w_hh: Tensor, gates: Tensor,
    cells: Tensor, grad_output: Tensor, grad_xs: Tensor, grad_hs: Tensor, grad_cell: Tensor,
    grad_gates: Tensor, dz_x: Tensor, dz_h: Tensor, dinner: Tensor, grad_x: Tensor,
    steps: StepRows, plan: str,
) -> None:  # fmt: skip
    """Every step of the backward in one launch (see ``_persistent_backward_kernel``)."""
    xs, hs, sig_x, sig_h, _ = buffers
    dummy = xs
    meta = _plan_meta(plan, maps, xs.shape[2], hs.shape[2])
    args = (
        xs, hs, _or(sig_x, dummy), _or(sig_h, dummy),
        _or(maps.maps_x, dummy), _or(maps.maps_h, dummy),
        _or(maps.factors_x, dummy), _or(maps.factors_h, dummy), w_ih, w_hh, gates, cells,
        grad_output, grad_xs, grad_hs, grad_cell, grad_gates,
        _or(dz_x, dummy), _or(dz_h, dummy), _or(dinner, dummy), grad_x,
        *steps.tables(xs.device),
    )  # fmt: skip
    strides = (
        xs.stride(0), hs.stride(0), _stride(sig_x), _stride(sig_h),
        grad_xs.stride(0), grad_hs.stride(0), _stride(dz_x), _stride(dz_h), _stride(dinner),
        _stride(maps.maps_x), _stride(maps.maps_h),
        _stride(maps.factors_x), _stride(maps.factors_h), steps.steps,
    )  # fmt: skip
    meta.update(ACC=accumulator(xs.dtype), PRECISION=dot_precision(xs.dtype))
    phases = maps.rounds * meta["PHASES_PER_ROUND"] + 3
    _launch(_persistent_backward_kernel, plan, meta, args, steps.steps, phases, steps.batch,
            xs.device, extra=strides)  # fmt: skip
