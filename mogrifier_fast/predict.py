"""Predicted time of the GPU backends on one NVIDIA H200 SXM, for ``mogrifier-bench --predict``.

No GPU has been lent to this project yet; this model says what to expect and where the time
should go, so that the first measurement (``benchmarks/gpu_check.py`` writes the two side by
side) can confirm or refute it. A roofline plus fixed costs: the work of one call is a list of
phases, each run ``count`` times one after another (a recurrence is sequential, so a per-step
phase runs T times and its time is summed over the steps), and

    time = Σ_phases count × ( max(flops / (peak × efficiency × f),
                                  HBM bytes / (HBM bandwidth × f),
                                  L2 bytes / (L2 bandwidth × f))
                              + launches × launch latency + barriers × barrier latency )

where f = units / (waves × SMs) is the fraction of the chip a phase's independent work units
(thread blocks, tiles) keep busy, waves = ceil(units / programs running at once): per-step work
that cannot fill the chip is charged at the share of SMs it uses. Launch latency is a plain
launch's or, for the Triton backends (they replay CUDA graphs), a graph node's. The work is
counted from the code (see each candidate's function). Times are seconds inside, milliseconds
in the table. Not modelled: host (Python) time per call, overlap of consecutive kernels, cache
misses of weights that fit in L2, clock throttling.
"""

from __future__ import annotations

import argparse
import dataclasses
import math
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

from mogrifier_fast import bench
from mogrifier_fast.bench import Config

if TYPE_CHECKING:
    import pandas as pd

# --- NVIDIA H200 SXM. Official: NVIDIA H200 Tensor Core GPU datasheet (2024) and the Hopper
# whitepaper ("NVIDIA H100 Tensor Core GPU Architecture", 2022); H200 is the same GH100 chip
# as H100 SXM5 with HBM3e. FLOP rates count a multiply-add as 2 FLOPs.
SMS = 132  # SMs of the SXM part (Hopper whitepaper: H100 SXM5, 132 SMs)
BOOST_CLOCK_HZ = 1.98e9  # max boost clock, 1,980 MHz (NVIDIA's H100/H200 SXM specifications)
FP32_FLOPS = 67e12  # FP32, CUDA cores (datasheet: 67 TFLOPS = 132 SMs x 128 lanes x 2 x 1.98 GHz)
TF32_FLOPS = 494.5e12  # TF32 tensor cores, dense (datasheet: 989 TFLOPS, with 2:4 sparsity)
BF16_FLOPS = 989e12  # BF16 tensor cores, dense (datasheet: 1,979 TFLOPS, with sparsity)
HBM_BYTES_PER_S = 4.8e12  # HBM3e (datasheet: 4.8 TB/s)
L2_BYTES = 50e6  # L2 cache (Hopper whitepaper: 50 MB)

# --- Figures without an official source.
# L2 bandwidth: Chips and Cheese's microbenchmark of the 114-SM H100 PCIe at up to 1.755 GHz
# ("Nvidia's H100: Funny L2, and Tons of Bandwidth", 2023) measured an L2 bandwidth of a few
# TB/s; scaled by SMs and clock to the 132-SM SXM part that is about 7 TB/s. An extrapolation:
# treat it as an assumption.
L2_BYTES_PER_S = 7e12
# Kernel launch latency: an assumption within the commonly quoted 2-5 us for a short kernel
# launched after a dependent one (host enqueue plus GPU start); NVIDIA's blog "Getting Started
# with CUDA Graphs" (2019) measured a few microseconds of overhead per short kernel.
KERNEL_LAUNCH_S = 3e-6
# A kernel node of a replayed CUDA graph: an assumption, ~1 us (the same blog shows graphs
# removing most, not all, of the per-kernel overhead).
GRAPH_NODE_S = 1e-6
# A grid-wide barrier of a cooperative launch over every SM: an assumption, ~1-2 us (every
# program's atomic arrival in L2, then polling until the last); no official figure.
GRID_BARRIER_S = 1.5e-6
# A CTA barrier after a phase whose output went through global memory: an assumption,
# __syncthreads plus an L2 round trip for the stored values (a few hundred cycles).
CTA_BARRIER_S = 0.3e-6
# Achievable fractions of peak: assumptions, none measured on this code.
VENDOR_BIG_GEMM_EFFICIENCY = 0.7  # cuBLAS/cuDNN products over all T·B rows
VENDOR_SMALL_GEMM_EFFICIENCY = 0.5  # cuBLAS/cuDNN per-step products of B rows
TRITON_FMA_EFFICIENCY = 0.4  # float32 tl.dot ("ieee") on CUDA cores, one 4-warp program per SM
TRITON_MMA_EFFICIENCY = 0.2  # TF32/BF16 tl.dot on 16-row tiles: mma.sync, not Hopper's wgmma
# Weights up to this share of L2 are taken to stay there across steps (read from HBM once
# per pass); larger ones are read from HBM every step. An assumption.
L2_RESIDENT_FRACTION = 0.8

PEAK_FLOPS = {"fp32": FP32_FLOPS, "tf32": TF32_FLOPS, "bf16": BF16_FLOPS}
# float32: torch's default switches, as mogrifier-bench measures: matmul.allow_tf32 off (tl.dot
# "ieee", cuBLAS exact FP32), cudnn.allow_tf32 on (cuDNN's LSTM in TF32). tf32: both on.
PRECISIONS = ("float32", "tf32", "bfloat16")
ELEMENT_BYTES = {"float32": 4, "tf32": 4, "bfloat16": 2}

LSTM, TRITON, CUDNN = bench.LSTM, "triton", "cudnn"
ROWS, GRID = "persistent[rows]", "persistent[grid]"
CANDIDATES = (LSTM, TRITON, CUDNN, ROWS, GRID)
GRAPHED = frozenset({TRITON, CUDNN, ROWS, GRID})  # they replay CUDA graphs
PLANS = ("rows", "grid")
# Code constants the model follows: kernels.mogrify.BLOCK_B and ONE_LAUNCH_MAX_WIDTH, the
# step kernels' column block, the grid plan's tile width, backends.persistent.MAX_WEIGHT_BYTES.
BLOCK_ROWS = 16
ONE_LAUNCH_MAX_WIDTH = 256
STEP_COLUMNS = 64
GRID_TILE = 16
PERSISTENT_MAX_WEIGHT_BYTES = 40 * 2**20

COLUMNS = [
    "configuration", "steps", "batch", "input_size", "hidden_size", "rounds", "rank",
    "share_rounds", "layers", "mode", "dtype", "candidate", "arithmetic", "cuda_graphs",
    "predicted_ms", "time_vs_lstm", "flop_ms", "hbm_ms", "l2_ms", "launches", "launch_ms",
    "launch_graph_ms", "barriers", "barrier_ms", "dominant", "note",
]  # fmt: skip


@dataclass(frozen=True)
class Phase:
    """Work run ``count`` times in sequence. Per run: ``flops``, ``hbm_bytes``, ``l2_bytes``
    over ``units`` independent work units (None: enough to fill the chip), at most
    ``programs`` at once, in ``math`` ("fp32", "tf32", "bf16") at ``efficiency`` of its peak;
    ``launches`` kernels (graph nodes where graphs are replayed), ``host_launches`` always
    plain, ``graph_launches`` plain and only with graphs (replays, copies in and out);
    ``barriers`` of ``barrier_s`` seconds."""

    name: str
    count: int = 1
    flops: float = 0.0
    hbm_bytes: float = 0.0
    l2_bytes: float = 0.0
    units: int | None = None
    programs: int | None = None
    math: str = "fp32"
    efficiency: float = 1.0
    launches: int = 0
    host_launches: int = 0
    graph_launches: int = 0
    barriers: int = 0
    barrier_s: float = 0.0


@dataclass(frozen=True)
class Layer:
    """One layer-direction of a call: T steps, B rows, I input, H hidden, r rounds, k rank
    (0: dense maps), shared maps, e bytes per element."""

    T: int
    B: int
    I: int  # noqa: E741 - the paper's name
    H: int
    r: int
    k: int
    shared: bool
    e: int

    @property
    def rb(self) -> int:
        """Row blocks of 16 batch rows."""
        return math.ceil(self.B / BLOCK_ROWS)

    @property
    def rounds(self) -> list[tuple[int, int]]:
        """(out, in) of each round: odd rounds update x from h, even ones h from x."""
        return [(self.I, self.H) if j % 2 else (self.H, self.I) for j in range(1, self.r + 1)]

    def map_size(self, out: int, inp: int) -> int:
        """Elements of one round's map (dense out x in, or the k-rank factors)."""
        return out * inp if not self.k else self.k * (out + inp)

    def round_flops(self, out: int, inp: int) -> int:
        """FLOPs of one round's product for B rows."""
        return 2 * self.B * self.map_size(out, inp)

    @property
    def stored_maps(self) -> list[tuple[int, int]]:
        return self.rounds[:2] if self.shared else self.rounds

    @property
    def gate_elements(self) -> int:
        return 4 * self.H * (self.I + self.H)

    @property
    def weight_bytes(self) -> int:
        """Bytes of the weights as stored (shared maps once), biases included."""
        maps = sum(self.map_size(o, i) + o for o, i in self.stored_maps)
        return self.e * (self.gate_elements + 8 * self.H + maps)

    @property
    def params(self) -> int:
        """Parameter tensors: w_ih, w_hh, b_ih, b_hh and each stored map's factors and bias."""
        return 4 + len(self.stored_maps) * (3 if self.k else 2)

    @property
    def resident(self) -> bool:
        """Whether the weights stay in L2 across steps."""
        return self.weight_bytes <= L2_RESIDENT_FRACTION * L2_BYTES

    def step_weight_hbm(self, elements: int) -> float:
        """HBM bytes per step for weights of ``elements`` read every step: none if resident."""
        return 0.0 if self.resident else float(self.e * elements)

    @property
    def saved_elements(self) -> int:
        """Elements the Triton backends store per step for the backward: states and σ of each
        round, inner values, gates, cell and output."""
        states = sum(2 * out for out, _ in self.rounds)
        return self.B * (states + self.r * self.k + 6 * self.H)


def arithmetic(engine: str, precision: str) -> str:
    """The products' arithmetic ("fp32", "tf32", "bf16") of an engine ("triton", "cublas",
    "cudnn") at a precision of PRECISIONS."""
    if precision == "bfloat16":
        return "bf16"
    if precision == "tf32" or engine == "cudnn":
        return "tf32"
    return "fp32"


def _triton_efficiency(math_: str) -> float:
    return TRITON_FMA_EFFICIENCY if math_ == "fp32" else TRITON_MMA_EFFICIENCY


def _gemm(
    name: str, count: int, mnk: tuple[int, int, int], math_: str, e: int, *, small: bool,
    hbm_bytes: float | None = None, launches: int = 1,
) -> Phase:  # fmt: skip
    """A vendor (cuBLAS/cuDNN) product (m, k) @ (k, n), ``mnk`` = (m, n, k): 64x64 output
    tiles for per-step (``small``) products, 256x256 for big ones (Hopper's cuBLAS kernels run
    128x256 tiles in 2-CTA clusters that share operand loads), split along k up to a wave
    when they are few; assumptions, not cuBLAS's actual heuristics. Operands are read from L2
    once per tile row/column; a big product's operands stream from HBM once unless
    ``hbm_bytes`` says otherwise (a small one's are in L2)."""
    m, n, k = mnk
    tile = 64 if small else 256
    row_tiles, col_tiles = math.ceil(m / tile), math.ceil(n / tile)
    tiles = row_tiles * col_tiles
    split = min(math.ceil(SMS / tiles), max(1, k // 128)) if tiles < SMS else 1
    l2 = e * (row_tiles * n * k + col_tiles * m * k + m * n * (1 if split == 1 else 2 * split))
    if hbm_bytes is None:
        hbm_bytes = 0.0 if small else float(e * (m * k + n * k + m * n))
    efficiency = VENDOR_SMALL_GEMM_EFFICIENCY if small else VENDOR_BIG_GEMM_EFFICIENCY
    return Phase(
        name, count, flops=2.0 * m * n * k, hbm_bytes=hbm_bytes, l2_bytes=float(l2),
        units=tiles * split, math=math_, efficiency=efficiency, launches=launches,
    )  # fmt: skip


def _step_gemm(L: Layer, name: str, mnk: tuple[int, int, int], math_: str, weights: int = 0) -> Phase:  # fmt: skip
    """A vendor product every step (T times) reading ``weights`` elements of weights."""
    return _gemm(name, L.T, mnk, math_, L.e, small=True, hbm_bytes=L.step_weight_hbm(weights))


def _pointwise(
    name: str, count: int, elements: int, l2_elements: int, hbm_elements: int, e: int,
    launches: int = 1, per_block: int = 512,
) -> Phase:  # fmt: skip
    """An elementwise kernel over ``elements``, ``per_block`` to a thread block (torch's
    elementwise kernels: 128 threads x 4; the Triton LSTM kernels: 16 x 128): bytes only."""
    return Phase(
        name, count, hbm_bytes=float(e * hbm_elements), l2_bytes=float(e * l2_elements),
        units=max(1, math.ceil(elements / per_block)), launches=launches,
    )  # fmt: skip


# --- The step-by-step Triton kernels (kernels/mogrify.py, kernels/lstm.py) and torch's products.


def _mogrify_steps(L: Layer, math_: str, forward: bool) -> list[Phase]:
    """The mogrify kernel per step (T times): states up to 256 wide run every round in one
    launch, one program per 16 rows walking every column (a CTA barrier per round); wider ones
    one launch per round, columns split over ceil(widest / 64) programs per row block (a
    low-rank round's inner product recomputed by each; in the backward the columns of the
    round's input are split, 32 at a time)."""
    if not L.r:
        return []
    B, k, rb, widest = L.B, L.k, L.rb, max(L.I, L.H)
    kernel = {"math": math_, "efficiency": _triton_efficiency(math_), "launches": 1}
    kernel["barrier_s"] = CTA_BARRIER_S
    direction = "forward" if forward else "backward"
    if widest <= ONE_LAUNCH_MAX_WIDTH:
        weights = sum(L.map_size(o, i) for o, i in L.rounds)
        states = sum(B * (i + 3 * o) + 2 * B * k for o, i in L.rounds)
        flops = float(sum(L.round_flops(o, i) for o, i in L.rounds))
        return [
            Phase(
                f"mogrify {direction} (all rounds, one launch)", L.T, flops=flops,
                hbm_bytes=L.step_weight_hbm(weights), l2_bytes=float(L.e * (rb * weights + states)),
                units=rb, barriers=L.r, **kernel,
            )
        ]  # fmt: skip
    columns = math.ceil(widest / STEP_COLUMNS)  # programs per row block
    phases = []
    for j, (out, inp) in enumerate(L.rounds, start=1):
        if forward and not k:
            busy, flops = math.ceil(out / STEP_COLUMNS), 2 * B * out * inp
            l2 = rb * out * inp + busy * B * inp + 3 * B * out
        elif forward:
            busy, flops = columns, 2 * B * inp * k * columns + 2 * B * k * out
            l2 = rb * columns * k * inp + rb * out * k + columns * B * inp + 3 * B * out
        elif not k:
            busy, flops = min(columns, math.ceil(inp / 32)), 2 * B * out * inp
            l2 = rb * out * inp + busy * 3 * B * out + 2 * B * inp
        else:
            busy, flops = columns, 2 * B * out * k * columns + 2 * B * k * inp
            l2 = rb * columns * out * k + columns * 3 * B * out + rb * k * inp + 2 * B * inp
        phases.append(
            Phase(
                f"mogrify {direction} round {j} (own launch)", L.T, flops=float(flops),
                hbm_bytes=L.step_weight_hbm(L.map_size(out, inp)), l2_bytes=float(L.e * l2),
                units=rb * busy, barriers=1, **kernel,
            )
        )  # fmt: skip
    return phases


def _map_gradients(L: Layer, math_: str, rows: int, count: int, small: bool) -> list[Phase]:
    """The maps' gradients from ``rows`` rows by kind (torch.bmm: dense (n·out, in), low-rank
    A (n·out, k) and B (n·k, in)) and their bias sums; ``count`` times."""
    phases = []
    for kind, rounds in (("x", L.rounds[0::2]), ("h", L.rounds[1::2])):
        if not rounds:
            continue
        n, (out, inp) = len(rounds), rounds[0]
        shapes = [("A", n * out, L.k), ("B", n * L.k, inp)] if L.k else [("", n * out, inp)]
        for part, m, width in shapes:
            name = f"{kind}-map gradients {part}".rstrip()
            phases.append(_gemm(name, count, (m, width, rows), math_, L.e, small=small))
        bias = rows * n * out
        phases.append(
            _pointwise(f"{kind}-map bias gradients", count, bias, bias if small else 0,
                       0 if small else bias, L.e)
        )  # fmt: skip
    return phases


def _weight_gradients(L: Layer, math_: str) -> list[Phase]:
    """After the loop (triton, persistent): every weight gradient as one product over all
    R = T·B rows (torch), the bias sum, the maps' by kind."""
    rows, e, H = L.T * L.B, L.e, L.H
    return [
        _gemm("weight gradient W_ih (all steps)", 1, (4 * H, L.I, rows), math_, e, small=False),
        _gemm("weight gradient W_hh (all steps)", 1, (4 * H, H, rows), math_, e, small=False),
        _pointwise("bias gradient", 1, rows * 4 * H, 0, rows * 4 * H, e),
        *_map_gradients(L, math_, rows, 1, small=False),
    ]


def _bookkeeping(L: Layer, training: bool) -> list[Phase]:
    """Launches around a Triton backend's recurrence: stacking the maps, the bias sum, copies
    into the buffers, the final-state gathers (forward), the gradient buffers' copies and the
    shared maps' sums (backward), inside the graph; each parameter's .grad accumulation
    (always plain); and, with graphs, the copies into the graph's static inputs (every
    parameter, every call), the replays and the copies of outputs and gradients out."""
    stacked = (min(L.r, 2) * (2 if L.k else 1) + min(L.r, 2)) if L.r else 0
    inputs = 3 + L.params
    inside = stacked + 1 + 3 + 2 + ((3 + (L.r if L.shared else 0)) if training else 0)
    around = inputs + 1 + 3 + ((1 + 3 + inputs) if training else 0)
    return [
        Phase(
            "setup and bookkeeping launches", 1, hbm_bytes=float(L.e * 2 * L.T * L.B * L.I),
            launches=inside, host_launches=L.params if training else 0, graph_launches=around,
        )
    ]  # fmt: skip


# --- Candidates: one layer-direction's phases. B rows, H hidden, X input width, T steps.


def _lstm_phases(L: Layer, precision: str, training: bool) -> list[Phase]:
    """nn.LSTM through cuDNN (standard algorithm, TF32 by default in float32): the input
    product over all T as one GEMM, then per step the recurrent product and one pointwise
    kernel; backward per step the pointwise backward and the recurrent data product, then the
    input's data product and the weight gradients over all T·B rows. No graphs."""
    m, e, B, H, X, T = arithmetic("cudnn", precision), L.e, L.B, L.H, L.I, L.T
    saved = B * 6 * H if training else B * 2 * H
    phases = [
        _gemm("input product (all steps)", 1, (T * B, 4 * H, X), m, e, small=False),
        _step_gemm(L, "recurrent product", (B, 4 * H, H), m, 4 * H * H),
        _pointwise("LSTM pointwise", T, B * H, B * 11 * H, saved, e),
    ]
    if training:
        phases += [
            _pointwise("LSTM pointwise backward", T, B * H, B * 14 * H, B * 10 * H, e),
            _step_gemm(L, "recurrent data gradient", (B, H, 4 * H), m, 4 * H * H),
            _gemm("input data gradient (all steps)", 1, (T * B, X, 4 * H), m, e, small=False),
            _gemm("weight gradient W_ih (all steps)", 1, (4 * H, X, T * B), m, e, small=False),
            _gemm("weight gradient W_hh (all steps)", 1, (4 * H, H, T * B), m, e, small=False),
            _pointwise("bias gradient, zeroing", 1, T * B * 4 * H, 0, T * B * 4 * H, e, launches=2),
        ]
    return [*phases, Phase(".grad accumulation", 1, host_launches=4 if training else 0)]


def _triton_phases(L: Layer, precision: str, training: bool) -> list[Phase]:
    """Backend triton (backends/triton_steps.py), per step: the mogrify launch(es), two addmm
    for the gates (torch), the LSTM pointwise kernel; backward per step: the pointwise
    backward, two mm into the x and h gradients, the mogrify backward launch(es), the x
    gradient's copy; weight gradients after the loop."""
    tri, blas = arithmetic("triton", precision), arithmetic("cublas", precision)
    e, B, H, X, T = L.e, L.B, L.H, L.I, L.T
    phases = [
        *_mogrify_steps(L, tri, forward=True),
        _step_gemm(L, "gate product x (addmm)", (B, 4 * H, X), blas, 4 * H * X),
        _step_gemm(L, "gate product h (addmm_)", (B, 4 * H, H), blas, 4 * H * H),
        _pointwise("LSTM pointwise", T, B * H, B * 11 * H, L.saved_elements, e, per_block=2048),
    ]
    if training:
        saved = B * 4 * H + L.saved_elements
        phases += [
            _pointwise("LSTM pointwise backward", T, B * H, B * 14 * H, saved, e, per_block=2048),
            _step_gemm(L, "gate gradient into x (mm)", (B, X, 4 * H), blas, 4 * H * X),
            _step_gemm(L, "gate gradient into h (mm)", (B, H, 4 * H), blas, 4 * H * H),
            *_mogrify_steps(L, tri, forward=False),
            _pointwise("copy x gradient", T, B * X, 2 * B * X, B * X, e),
            *_weight_gradients(L, blas),
        ]
    return phases + _bookkeeping(L, training)


def _cudnn_phases(L: Layer, precision: str, training: bool) -> list[Phase]:
    """Backend cudnn (backends/cudnn_steps.py), per step: copies into the mogrify buffers, the
    mogrify launch(es), copies out, then torch._VF.lstm for one step: cuDNN copies the layer's
    four separate weight tensors into its flat buffer, runs the input and recurrent products and
    its pointwise kernel. Backward per step: the same in reverse, with each step's weight and
    map gradients (products of K = B) accumulated into the parameters' gradients."""
    tri, m = arithmetic("triton", precision), arithmetic("cudnn", precision)
    blas, e, B, H, X, T = arithmetic("cublas", precision), L.e, L.B, L.H, L.I, L.T
    weights = L.gate_elements + 8 * H
    maps = sum(L.map_size(o, i) + o for o, i in L.rounds)
    states = B * (X + H)
    phases = []
    if L.r:
        phases.append(_pointwise("mogrify copies in, out", T, states, 4 * states, 0, e, launches=4))
    phases += [
        *_mogrify_steps(L, tri, forward=True),
        _pointwise("weights into cuDNN's flat buffer", T, weights, 2 * weights, 0, e, launches=4),
        _step_gemm(L, "cuDNN input product", (B, 4 * H, X), m, 4 * H * X),
        _step_gemm(L, "cuDNN recurrent product", (B, 4 * H, H), m, 4 * H * H),
        _pointwise("cuDNN pointwise", T, B * H, B * 11 * H, L.saved_elements, e),
        _pointwise("stack outputs", 1, T * B * H, 0, 2 * T * B * H, e),
    ]
    if training:
        saved = B * 4 * H + L.saved_elements
        phases += [
            _pointwise("cuDNN pointwise backward", T, B * H, B * 14 * H, saved, e),
            _step_gemm(L, "cuDNN recurrent data gradient", (B, H, 4 * H), m, 4 * H * H),
            _step_gemm(L, "cuDNN input data gradient", (B, X, 4 * H), m, 4 * H * X),
            _step_gemm(L, "cuDNN weight gradient W_ih (one step)", (4 * H, X, B), m),
            _step_gemm(L, "cuDNN weight gradient W_hh (one step)", (4 * H, H, B), m),
            _pointwise("weight gradients: zero, bias, sum", T, weights, 3 * weights, 0, e, launches=6),
        ]  # fmt: skip
        if L.r:
            phases += [
                _pointwise("mogrify backward copies, dh sum", T, states, 4 * states, 0, e, launches=3),
                *_mogrify_steps(L, tri, forward=False),
                *_map_gradients(L, blas, B, T, small=True),
                _pointwise("map gradients: sum over steps", T, maps, 3 * maps, 0, e,
                           launches=len(L.stored_maps) * (3 if L.k else 2)),
            ]  # fmt: skip
        phases.append(_pointwise("stack x gradients", 1, T * B * X, 0, 2 * T * B * X, e))
    return phases + _bookkeeping(L, training)


def _rows_phases(L: Layer, precision: str, training: bool) -> list[Phase]:
    """Backend persistent, plan "rows": one program per 16 batch rows (ceil(B/16) programs)
    runs every step in one launch: each round (all columns), then the gate product with the
    LSTM cell fused, a CTA barrier after each phase; every program re-reads all weights from L2
    each step. Backward launch per step: pointwise backward, the gate-gradient products, the
    rounds in reverse, the x gradient's copy. Weight gradients after the loop (torch)."""
    tri, blas = arithmetic("triton", precision), arithmetic("cublas", precision)
    e, B, H, X, T, rb = L.e, L.B, L.H, L.I, L.T, L.rb
    maps = sum(L.map_size(o, i) for o, i in L.rounds)
    map_flops = float(sum(L.round_flops(o, i) for o, i in L.rounds))
    states = sum(B * (i + 3 * o) + 2 * B * L.k for o, i in L.rounds)
    gates = L.gate_elements

    def phase(name: str, l2: int, hbm: float, flops: float = 0.0, barriers: int = 1) -> Phase:
        return Phase(
            name, T, flops=flops, hbm_bytes=hbm, l2_bytes=float(e * l2), units=rb, math=tri,
            efficiency=_triton_efficiency(tri), barriers=barriers, barrier_s=CTA_BARRIER_S,
        )  # fmt: skip

    round_phases = L.r * (2 if L.k else 1)  # a low-rank round: inner, then outer
    rounds = phase("rounds", rb * maps + states, L.step_weight_hbm(maps), map_flops, round_phases)
    hbm_gates = L.step_weight_hbm(gates)
    phases = [Phase("persistent forward launch", 1, launches=1), *([rounds] if L.r else [])]
    phases.append(
        phase("gate product + LSTM cell", rb * gates + B * (X + H) + 7 * B * H,
              hbm_gates + e * L.saved_elements, 2.0 * B * gates)
    )  # fmt: skip
    if training:
        phases += [
            Phase("persistent backward launch", 1, launches=1),
            phase("pointwise backward", B * 14 * H, e * (B * 4 * H + L.saved_elements)),
            phase("gate-gradient products", rb * gates + B * 4 * H + B * (X + H), hbm_gates,
                  2.0 * B * gates),
            *([dataclasses.replace(rounds, name="rounds in reverse")] if L.r else []),
            phase("copy x gradient", 2 * B * X, e * B * X, barriers=0),
            *_weight_gradients(L, blas),
        ]  # fmt: skip
    return phases + _bookkeeping(L, training)


def _grid_phases(L: Layer, precision: str, training: bool, sms: int = SMS) -> list[Phase]:
    """Backend persistent, plan "grid": a cooperative launch of up to one program per SM;
    each phase's output split into 16-row x 16-column tiles dealt round-robin to the programs
    (the gate phase: 4 gate columns per output column), a grid barrier after each phase but
    the last copy. Per step forward: each round (a low-rank one: inner, then outer), then
    gates + cell. Backward: pointwise, the gate-gradient products into x and h, the rounds in
    reverse, the x gradient's copy. A weight tile is read from L2 each step by each of the
    ceil(B/16) row blocks."""
    tri, blas = arithmetic("triton", precision), arithmetic("cublas", precision)
    B, H, X, e, t, k = L.B, L.H, L.I, L.e, GRID_TILE, L.k
    weights = L.step_weight_hbm

    def tiles(columns: int) -> int:
        return L.rb * math.ceil(columns / t)

    def product(name: str, out: int, inp: int, extra: int, hbm: float, out_tile: int = t):
        """(name, tiles, flops, L2 bytes, HBM bytes) of (B, inp) @ (inp, out·out_tile/16):
        each tile reads its weight tile (inp x out_tile) and its 16 input rows; ``extra``
        elements more through L2."""
        n = tiles(out)
        flops = 2.0 * B * out * inp * out_tile / t
        return name, n, flops, float(e * (n * (out_tile + t) * inp + extra)), hbm

    forward = []
    for j, (out, inp) in enumerate(L.rounds, start=1):
        if k:
            forward.append(product(f"round {j} inner", k, inp, B * k, weights(k * inp)))
            forward.append(product(f"round {j} outer", out, k, 3 * B * out, weights(k * out)))
        else:
            forward.append(product(f"round {j}", out, inp, 3 * B * out, weights(out * inp)))
    saved = weights(L.gate_elements) + e * L.saved_elements
    forward.append(product("gates + LSTM cell", H, X + H, 7 * B * H, saved, out_tile=4 * t))
    backward = []
    if training:
        pointwise_hbm = float(e * (B * 4 * H + L.saved_elements))
        backward.append(("pointwise backward", tiles(H), 0.0, float(e * B * 14 * H), pointwise_hbm))
        n = tiles(X) + tiles(H)  # each tile: its weight columns and its rows of the gate gradient
        backward.append(
            ("gate-gradient products", n, 2.0 * B * L.gate_elements, float(e * n * 2 * t * 4 * H),
             weights(L.gate_elements))
        )  # fmt: skip
        for j, (out, inp) in reversed(list(enumerate(L.rounds, start=1))):
            # A tile's dz is formed from three (16, out) tiles (the new state's gradient, σ and
            # the gated state) in place of one input tile.
            if k:
                backward.append(product(f"round {j} backward inner", k, out, 2 * tiles(k) * t * out, weights(k * out)))  # fmt: skip
                backward.append(product(f"round {j} backward outer", inp, k, 2 * B * inp, weights(k * inp)))  # fmt: skip
            else:
                backward.append(product(f"round {j} backward", inp, out, 2 * tiles(inp) * t * out, weights(out * inp)))  # fmt: skip
        backward.append(("copy x gradient", tiles(X), 0.0, float(e * 2 * B * X), float(e * B * X)))
    # As the kernels launch it: the most tiles of any phase, forward or backward, at most an SM's.
    programs = min(sms, max(tiles(X) + tiles(H), tiles(k)))

    def run(steps: list) -> list[Phase]:
        """A grid barrier after every phase but the x gradient's copy."""
        return [
            Phase(
                name, L.T, flops=flops, hbm_bytes=hbm, l2_bytes=l2, units=n, programs=programs,
                math=tri, efficiency=_triton_efficiency(tri), barriers=int(name != "copy x gradient"),
                barrier_s=GRID_BARRIER_S,
            )
            for name, n, flops, l2, hbm in steps
        ]  # fmt: skip

    phases = [Phase("cooperative forward launch", 1, launches=1), *run(forward)]
    if training:
        phases += [Phase("cooperative backward launch", 1, launches=1), *run(backward)]
        phases += _weight_gradients(L, blas)
    return phases + _bookkeeping(L, training)


# --- Timing.


def phase_times(phase: Phase, sms: int = SMS) -> dict[str, float]:
    """Seconds of ``phase`` over all its runs: "flop", "hbm", "l2" (each term alone), "roof"
    (their maximum), "launch" and "launch_graph" (its launches plain, or as graph nodes with
    the graph's own launches), "barrier"; "bound": the term of the maximum (0 flop, 1 hbm, 2 l2)."""
    slots = min(phase.programs or sms, sms)
    share = 1.0 if phase.units is None else phase.units / (math.ceil(phase.units / slots) * sms)
    active = share * sms  # SMs kept busy
    flop = phase.flops / (PEAK_FLOPS[phase.math] / SMS * active * phase.efficiency)
    hbm = phase.hbm_bytes / min(HBM_BYTES_PER_S, HBM_BYTES_PER_S / SMS * active)
    l2 = phase.l2_bytes / (L2_BYTES_PER_S / SMS * active)
    terms = [flop, hbm, l2]
    plain = (phase.launches + phase.host_launches) * KERNEL_LAUNCH_S
    graph = (
        phase.launches * GRAPH_NODE_S
        + (phase.host_launches + phase.graph_launches) * KERNEL_LAUNCH_S
    )
    n = phase.count
    return {
        "flop": n * flop,
        "hbm": n * hbm,
        "l2": n * l2,
        "roof": n * max(terms),
        "bound": float(terms.index(max(terms))),
        "launch": n * plain,
        "launch_graph": n * graph,
        "barrier": n * phase.barriers * phase.barrier_s,
    }


def layers_of(config: Config, precision: str) -> list[Layer]:
    """The layer-directions of a configuration (layer 0 reads input_size, the others hidden)."""
    return [
        Layer(config.steps, config.batch, config.input_size if i == 0 else config.hidden_size,
              config.hidden_size, config.rounds, config.rank or 0, config.share_rounds,
              ELEMENT_BYTES[precision])
        for i in range(config.layers)
    ]  # fmt: skip


def persistent_runs_step_by_step(layer: Layer) -> bool:
    """Whether backend persistent falls back to step by step (weights over its budget)."""
    return layer.weight_bytes > PERSISTENT_MAX_WEIGHT_BYTES


def phases(candidate: str, config: Config, precision: str, sms: int = SMS) -> list[Phase]:
    """Every phase of one call of ``candidate`` at ``config`` (its mode) and ``precision``."""
    _check(config, precision, [candidate])
    training = config.mode == "training"
    build = {LSTM: _lstm_phases, TRITON: _triton_phases, CUDNN: _cudnn_phases, ROWS: _rows_phases}
    # Per call: h0/c0 zeros, and the benchmark's sum of the output and its gradient seed.
    result = [Phase("zeros, sum, gradient seed", 1, host_launches=2 + (2 if training else 0))]
    for layer in layers_of(config, precision):
        if candidate in (ROWS, GRID) and persistent_runs_step_by_step(layer):
            result += _triton_phases(layer, precision, training)
        elif candidate == GRID:
            result += _grid_phases(layer, precision, training, sms)
        else:
            result += build[candidate](layer, precision, training)
    return result


BOUNDS = ("flops", "HBM", "L2")


def predict(candidate: str, config: Config, precision: str, sms: int = SMS) -> dict:
    """One row of the table: the predicted milliseconds of one call and their breakdown."""
    totals = dict.fromkeys(("flop", "hbm", "l2", "roof", "launch", "launch_graph", "barrier"), 0.0)
    by_bound = dict.fromkeys(BOUNDS, 0.0)
    launches = barriers = 0
    graphed = candidate in GRAPHED
    for phase in phases(candidate, config, precision, sms):
        times = phase_times(phase, sms)
        for key in totals:
            totals[key] += times[key]
        by_bound[BOUNDS[int(times["bound"])]] += times["roof"]
        launches += phase.count * (
            phase.launches + phase.host_launches + (phase.graph_launches if graphed else 0)
        )
        barriers += phase.count * phase.barriers
    launch = totals["launch_graph" if graphed else "launch"]
    shares = {**by_bound, "launches": launch, "barriers": totals["barrier"]}
    engine = "cudnn" if candidate == LSTM else "triton"
    note = ""
    if candidate in (ROWS, GRID) and any(
        persistent_runs_step_by_step(layer) for layer in layers_of(config, precision)
    ):
        note = "weights over the persistent budget: runs step by step (as triton)"
    return {
        "configuration": describe(config),
        **{
            f: getattr(config, f) for f in ("steps", "batch", "input_size", "hidden_size", "rounds")
        },
        "rank": "" if config.rank is None else config.rank,
        "share_rounds": config.share_rounds,
        "layers": config.layers,
        "mode": config.mode,
        "dtype": precision,
        "candidate": candidate,
        "arithmetic": arithmetic(engine, precision),
        "cuda_graphs": graphed,
        "predicted_ms": 1e3 * (totals["roof"] + launch + totals["barrier"]),
        "time_vs_lstm": math.nan,
        "flop_ms": 1e3 * totals["flop"],
        "hbm_ms": 1e3 * totals["hbm"],
        "l2_ms": 1e3 * totals["l2"],
        "launches": launches,
        "launch_ms": 1e3 * totals["launch"],
        "launch_graph_ms": 1e3 * totals["launch_graph"],
        "barriers": barriers,
        "barrier_ms": 1e3 * totals["barrier"],
        "dominant": max(shares, key=shares.get),
        "note": note,
    }


def persistent_plan(config: Config, sms: int = SMS) -> str:
    """The persistent plan ("rows" or "grid") the model predicts faster for one call at
    ``config`` (its mode: training or else inference; float64 compared as float32) on a GPU
    with ``sms`` SMs."""
    precision = {"bfloat16": "bfloat16", "tf32": "tf32"}.get(config.dtype, "float32")
    mode = "training" if config.mode == "training" else "inference"
    config = dataclasses.replace(config, mode=mode)
    times = {
        plan: predict(f"persistent[{plan}]", config, precision, sms)["predicted_ms"]
        for plan in PLANS
    }
    return min(PLANS, key=times.__getitem__)


def describe(config: Config) -> str:
    """The configuration's sizes: "T=70 N=64 I=512 H=512 r=5 full L=1"."""
    rank = "full" if config.rank is None else f"k={config.rank}"
    shared = " shared" if config.share_rounds else ""
    return (
        f"T={config.steps} N={config.batch} I={config.input_size} H={config.hidden_size} "
        f"r={config.rounds}{shared} {rank} L={config.layers}"
    )


def _check(config: Config, precision: str, candidates: list[str]) -> None:
    if precision not in PRECISIONS:
        raise ValueError(
            f"--predict: dtype {precision!r} has no prediction; expected some of {list(PRECISIONS)}"
        )
    if config.mode not in ("inference", "training"):
        raise ValueError(
            f"--predict: mode {config.mode!r} is not modelled; expected inference or training"
        )
    for name in candidates:
        _check_candidate(name)
    for name in ("steps", "batch", "input_size", "hidden_size", "layers"):
        if getattr(config, name) < 1:
            raise ValueError(f"--predict: {name} must be >= 1, got {getattr(config, name)}")
    if config.rounds < 0 or (config.rank is not None and config.rank < 1):
        raise ValueError(f"--predict: bad rounds/rank in {describe(config)}")


def table(configs: list[Config], precisions: list[str], candidates: list[str]) -> pd.DataFrame:
    """The predictions (a pandas DataFrame, COLUMNS) for every configuration, precision and
    candidate; ``time_vs_lstm`` where nn.LSTM is among the candidates."""
    import pandas as pd

    rows = []
    for config in configs:
        for precision in precisions:
            _check(config, precision, candidates)
            group = [predict(name, config, precision) for name in candidates]
            lstm = {r["candidate"]: r["predicted_ms"] for r in group}.get(LSTM)
            for row in group:
                row["time_vs_lstm"] = math.nan if lstm is None else row["predicted_ms"] / lstm
            rows += group
    return pd.DataFrame(rows, columns=COLUMNS)


def markdown(frame: pd.DataFrame) -> str:
    """A summary of :func:`table`'s frame, one line per row."""
    header = ["configuration", "mode", "dtype", "candidate", "predicted ms", "vs nn.LSTM",
              "FLOP ms", "HBM ms", "L2 ms", "launch ms (graphs)", "barrier ms", "dominant"]  # fmt: skip
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    for row in frame.itertuples():
        ratio = "" if math.isnan(row.time_vs_lstm) else f"{row.time_vs_lstm:.2f}x"
        launch = f"{row.launch_ms:.3f} ({row.launch_graph_ms:.3f})"
        cells = [row.configuration, row.mode, row.dtype, row.candidate, f"{row.predicted_ms:.3f}",
                 ratio, f"{row.flop_ms:.3f}", f"{row.hbm_ms:.3f}", f"{row.l2_ms:.3f}", launch,
                 f"{row.barrier_ms:.3f}", row.dominant]  # fmt: skip
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines)


def resolve_candidates(requested: list[str] | None) -> list[str]:
    """The candidates asked for ("persistent": both plans), each checked; default all."""
    if requested is None:
        return list(CANDIDATES)
    names = [p for name in requested for p in ((ROWS, GRID) if name == "persistent" else (name,))]
    for name in names:
        _check_candidate(name)
    return list(dict.fromkeys(names))


def _check_candidate(name: str) -> None:
    if name not in CANDIDATES:
        raise ValueError(
            f"--predict: no model for candidate {name!r}; expected some of {list(CANDIDATES)}"
            " ('persistent' for both plans)"
        )


CSV_NAME = "predicted-h200.csv"


def run(args: argparse.Namespace) -> Path | None:
    """``mogrifier-bench --predict``: the table for the configurations the grid flags ask for
    (their modes; every precision unless --dtype), printed, and written to
    ``--out``/predicted-h200.csv (replaced) when --out is given. Returns that path or None."""
    precisions = args.dtype or list(PRECISIONS)
    for precision in precisions:
        if precision not in PRECISIONS:
            raise ValueError(
                f"--predict: dtype {precision!r} has no prediction; expected some of {list(PRECISIONS)}"
            )
    grid_args = argparse.Namespace(**{**vars(args), "dtype": None})
    configs = list(dict.fromkeys(bench.grid_from_args(grid_args)))
    candidates = resolve_candidates(args.candidates)
    frame = table(configs, precisions, candidates)
    print(
        f"mogrifier-bench --predict: modelled time on one NVIDIA H200 SXM ({SMS} SMs), not measured"
    )
    print(markdown(frame))
    if ROWS in candidates and GRID in candidates:
        for config in dict.fromkeys(dataclasses.replace(c, mode="training") for c in configs):
            for precision in precisions:
                plan = persistent_plan(dataclasses.replace(config, dtype=precision))
                print(
                    f"persistent plan predicted faster (training, {precision}) at {describe(config)}: {plan}"
                )
    if args.out is None:
        return None
    args.out.mkdir(parents=True, exist_ok=True)
    path = args.out / CSV_NAME
    frame.to_csv(path, index=False)
    print(f"\npredictions written to {path}")
    return path


def predicted_vs_measured(measured: pd.DataFrame) -> pd.DataFrame:
    """Measured medians (a mogrifier-bench CSV as a DataFrame) next to the predictions, for
    each configuration, mode, dtype (float32 and bfloat16) and candidate the model covers;
    measured "persistent" is compared with the plan :func:`persistent_plan` picks."""
    import pandas as pd

    rows = []
    for record in measured.to_dict("records"):
        name, dtype = record["candidate"], record["dtype"]
        if dtype not in PRECISIONS or record["mode"] not in ("inference", "training"):
            continue
        rank = record.get("rank")
        rank = None if rank is None or rank == "" or pd.isna(rank) else int(rank)
        config = Config(
            steps=int(record["steps"]),
            batch=int(record["batch"]),
            input_size=int(record["input_size"]),
            hidden_size=int(record["hidden_size"]),
            rounds=int(record["rounds"]),
            rank=rank,
            layers=int(record["layers"]),
            share_rounds=str(record["share_rounds"]).lower() in ("true", "1"),
            dtype=dtype,
            mode=record["mode"],
        )
        model = f"persistent[{persistent_plan(config)}]" if name == "persistent" else name
        if model not in CANDIDATES:
            continue
        predicted = predict(model, config, dtype)["predicted_ms"]
        rows.append(
            {
                "configuration": describe(config),
                "mode": config.mode,
                "dtype": dtype,
                "candidate": name,
                "model": model,
                "device_name": record.get("device_name", ""),
                "measured_median_ms": record["median_ms"],
                "predicted_ms": predicted,
                "measured_over_predicted": record["median_ms"] / predicted,
            }
        )
    columns = ["configuration", "mode", "dtype", "candidate", "model", "device_name",
               "measured_median_ms", "predicted_ms", "measured_over_predicted"]  # fmt: skip
    return pd.DataFrame(rows, columns=columns)
