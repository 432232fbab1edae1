"""The C++ time loops of backend ``"fused"`` (``mogrifier_fast/csrc``), for float32 on CPU.

Laid out by instruction set: ``bindings.cpp`` registers the ops (the only file that sees
tensors), ``loops.h`` holds the loops, templated on a register tile, and each ``isa_*.cpp``
compiles them for one instruction set with its own target flags and tile: ``avx512``, ``avx2``
(with FMA) and ``generic`` on x86-64, ``neon`` and ``generic`` on ARM64. All of them live in one
module, built with the system's C++ compiler and ninja on first use (about half a minute; then
cached by ``torch.utils.cpp_extension`` under ``TORCH_EXTENSIONS_DIR``), or ahead of time by
``python -m mogrifier_fast.build``. Each call names its variant: by default the best this CPU
runs, or the one ``MOGRIFIER_ISA`` names. Where the module cannot be built, ``"fused"`` runs its
Python loops (the same results; slower), after one logged warning. ``MOGRIFIER_NATIVE=0`` turns
the C++ loops off.
"""

from __future__ import annotations

import contextlib
import functools
import hashlib
import logging
import os
import platform
import shutil
import sys
import sysconfig
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import torch
from torch import Tensor

from mogrifier_fast.mogrify import Sequence

logger = logging.getLogger("mogrifier_fast")
SOURCE_DIR = Path(__file__).resolve().parent.parent / "csrc"
SOURCES = ["bindings.cpp", "isa_avx512.cpp", "isa_avx2.cpp", "isa_neon.cpp", "isa_generic.cpp"]
HEADERS = ["chain.h", "loops.h"]
ISA_VARIABLE = "MOGRIFIER_ISA"
PYTHON_LOOPS = "python"  # the variant name that means: no C++ loops (see `variant`)
# A product of at least this many multiply-adds (for the loops: a step's gate product) is split
# across torch's threads; below it one thread runs it (a barrier costs more than it shares).
PARALLEL_MACS = 1 << 18
# With at most this many bytes of weights, and at least 8 batch rows per thread, each thread runs
# the loops on its own rows (reading every weight each step; no barrier); above it the threads
# share each product's columns. Measured on 2 cores (interleaved, float32, r=5): rows ahead by
# 1.02-1.38x up to 3.25 MiB of weights (H=256), even at 13 MiB (H=512), and at 33 MiB (H=1000)
# behind for inference (0.94x), ahead for training (1.04x).
ROW_SPLIT_MAX_WEIGHT_BYTES = 8 << 20
# A call packs the weights into panels first (one pass over the weights, repaid by faster
# products over the steps) when it has at least PACK_MIN_ROWS batch rows and PACK_MIN_ROW_STEPS
# rows times steps; else it reads them where they are. Measured on the AVX2 machine (H=256, r=5,
# 2 threads, no_grad; packed / in place): T=35 B=1 3.68 / 3.30 ms, B=2 5.00 / 5.20, B=4
# 4.61 / 5.99; T=1 B=32 2.22 / 1.83, B=64 3.53 / 4.11; T=2 B=32 3.13 / 3.61; T=8 B=4 3.00 / 3.12.
PACK_MIN_ROWS = 3
PACK_MIN_ROW_STEPS = 48


def packs(steps: int, rows: int, total: int | None = None) -> bool:
    """Whether a call of ``steps`` steps on ``rows`` batch rows (``total`` rows over all steps,
    fewer than steps x rows for a packed batch) packs the weights first."""
    total = steps * rows if total is None else total
    return rows >= PACK_MIN_ROWS and total >= PACK_MIN_ROW_STEPS


def _build_name() -> str:
    """The module's name: distinguishes torch versions (headers and ABI), architectures and
    source versions, so no stale build is ever loaded."""
    digest = hashlib.sha1(f"{torch.__version__} {platform.machine()}".encode())
    for name in SOURCES + HEADERS:
        digest.update((SOURCE_DIR / name).read_bytes())
    return f"mogrifier_fast_loops_{digest.hexdigest()[:12]}"


def _ninja_on_path() -> None:
    """torch runs ``ninja`` from PATH; the ``ninja`` package (a dependency) puts it among this
    interpreter's scripts, which are not on PATH in a virtual environment that was not
    activated: add that directory at its end."""
    scripts = sysconfig.get_path("scripts")
    if shutil.which("ninja") is None and shutil.which("ninja", path=scripts) is not None:
        os.environ["PATH"] = os.pathsep.join([os.environ.get("PATH", ""), scripts])


def build() -> float | None:
    """Build (or load the cached build of) the C++ loops and register their ops' fake kernels;
    the seconds a build took, or None when a cached one was loaded. Raises what the build
    raises."""
    from torch.utils import cpp_extension

    _ninja_on_path()
    name = _build_name()
    library = Path(cpp_extension._get_build_directory(name, verbose=False)) / f"{name}.so"
    fresh = not library.exists()
    if fresh:
        print(
            "mogrifier_fast: building the C++ loops of backend 'fused' for this machine "
            "(once, about half a minute; `python -m mogrifier_fast.build` does it ahead of time)",
            file=sys.stderr,
            flush=True,
        )
    start = time.perf_counter()
    cpp_extension.load(
        name=name,
        sources=[str(SOURCE_DIR / s) for s in SOURCES],
        extra_cflags=["-O3", "-fopenmp"],
        extra_ldflags=["-fopenmp"],
        is_python_module=False,
        verbose=False,
    )
    register_fake_kernels()
    return time.perf_counter() - start if fresh else None


@functools.cache
def unavailable_reason() -> str | None:
    """None once the C++ loops are built and loaded here, else why they are not."""
    if os.environ.get("MOGRIFIER_NATIVE", "1") == "0":
        return "turned off by MOGRIFIER_NATIVE=0"
    try:
        build()
    except Exception as error:  # no compiler, no headers, a failed build: all mean "not here"
        first_line = str(error).strip().splitlines()[0] if str(error).strip() else repr(error)
        reason = f"could not build {SOURCE_DIR.name}/ ({type(error).__name__}: {first_line})"
        logger.warning("backend 'fused' runs its Python loops: %s", reason)
        return reason
    return None


@functools.cache
def _runnable() -> tuple[str, ...]:
    return tuple(torch.ops.mogrifier_fast.isas())


def runnable_isas() -> list[str]:
    """The instruction-set variants this CPU executes, best first (the loops must be built)."""
    return list(_runnable())


def compiled_isas() -> list[str]:
    """Every variant this architecture's build holds, whether this CPU runs it or not."""
    return list(torch.ops.mogrifier_fast.compiled_isas())


def variants() -> list[str]:
    """Every variant a call can run here, best first: the C++ loops' variants this CPU runs
    (where they are built), then ``"python"``, the Python loops."""
    isas = runnable_isas() if unavailable_reason() is None else []
    return [*isas, PYTHON_LOOPS]


def unrunnable_isas() -> list[str]:
    """The variants the build holds that this CPU cannot run (none where it is not built)."""
    if unavailable_reason() is not None:
        return []
    runnable = runnable_isas()
    return [name for name in compiled_isas() if name not in runnable]


def default_variant() -> str:
    """The variant a plain call runs here: :func:`isa`, or ``"python"`` where the C++ loops are
    not built."""
    return PYTHON_LOOPS if unavailable_reason() is not None else isa()


_forced: str | None = None


@contextlib.contextmanager
def variant(name: str) -> Iterator[None]:
    """Within the block, calls run the C++ loops of variant ``name`` (one of
    :func:`runnable_isas`), or the Python loops for ``"python"``, whatever ``MOGRIFIER_ISA``
    says: to compare variants in one process."""
    global _forced
    if name not in variants():
        raise ValueError(f"variant: {name!r} does not run here; expected one of {variants()}")
    previous, _forced = _forced, name
    try:
        yield
    finally:
        _forced = previous


def isa() -> str:
    """The variant calls use: the one :func:`variant` forces, else ``MOGRIFIER_ISA`` when set,
    else the best this CPU runs."""
    if _forced is not None:
        return _forced
    runnable = runnable_isas()
    wanted = os.environ.get(ISA_VARIABLE, "")
    if not wanted:
        return runnable[0]
    if wanted not in runnable:
        compiled = compiled_isas()
        why = "this CPU lacks its instructions" if wanted in compiled else "no such variant"
        raise ValueError(
            f"{ISA_VARIABLE}={wanted!r}: {why}; expected one of {', '.join(runnable)} "
            f"(built here: {', '.join(compiled)})"
        )
    return wanted


def usable(x: Tensor) -> bool:
    """Whether the C++ loops run a call on input x (float32 on CPU, built here, not turned off
    by :func:`variant`)."""
    return (
        x.device.type == "cpu"
        and x.dtype == torch.float32
        and _forced != PYTHON_LOOPS
        and unavailable_reason() is None
    )


def plan(rows: int, gate_macs: int, weight_bytes: int) -> tuple[int, bool]:
    """(threads, split_rows) for the loops of a call with ``rows`` batch rows, a gate product
    of ``gate_macs`` multiply-adds per step and ``weight_bytes`` of weights."""
    threads = torch.get_num_threads()
    if threads > 1 and rows >= 8 * threads and weight_bytes <= ROW_SPLIT_MAX_WEIGHT_BYTES:
        return threads, True
    return threads_for(gate_macs), False


def threads_for(macs: int) -> int:
    """How many threads run the loops for a step whose gate product has ``macs`` multiply-adds,
    or a product of that many."""
    return torch.get_num_threads() if macs >= PARALLEL_MACS else 1


@dataclass(frozen=True)
class NativeCall:
    """What every op of one call shares, decided once per call: the variant, the parameters as
    stored ([w_ih, w_hh, b_ih, b_hh, then each round's factors and bias]), the powers of two
    the gate product's x and h halves and each round's input carry, each round's factor count,
    the plan (threads, split_rows, packed) and the batch (B rows; a packed batch's
    batch_sizes, else empty)."""

    isa: str
    params: list[Tensor | None]
    scales: list[float]
    factors: list[int]
    threads: int
    split_rows: bool
    packed: bool
    batch: int
    batch_sizes: list[int]

    @classmethod
    def prepare(
        cls,
        params: list[Tensor | None],
        scales: list[float],
        factors: list[int],
        seq: Sequence,
        total: int,
    ) -> NativeCall:
        """For a call on ``seq`` of ``total`` rows over all steps; matrices given contiguous
        rows if they lack them."""
        rows = seq.batch
        params = [p if p is None or p.stride(-1) == 1 else p.contiguous() for p in params]
        w_ih, w_hh = params[0], params[1]
        weight_bytes = 4 * sum(p.numel() for p in params if p is not None and p.dim() == 2)
        gate_macs = rows * w_ih.shape[0] * (w_ih.shape[1] + w_hh.shape[1])
        threads, split_rows = plan(rows, gate_macs, weight_bytes)
        packed_weights = packs(seq.steps, rows, total)
        sizes = list(seq.batch_sizes or ())
        return cls(isa(), params, scales, factors, threads, split_rows, packed_weights, rows, sizes)

    def _blocks(self, t: Tensor, per_step: bool = True) -> Tensor:
        """A buffer as the loops read it: (·, B, width) blocks, or, for a packed batch's
        buffers that hold every step (``per_step``: R rows, or B + R for the cells), the rows
        as they are."""
        return t if per_step and self.batch_sizes else t.view(-1, self.batch, t.shape[-1])

    def forward(self, seq: Sequence, h0: Tensor, c0: Tensor, saved: list[Tensor],
                output: Tensor, c_last: Tensor, keep: bool) -> None:  # fmt: skip
        """Fill output (R, H), c_last (B, H) and the saved buffers."""
        torch.ops.mogrifier_fast.chain_forward(
            self.isa, seq.data, h0, c0, self.params, self.scales, self.factors,
            [self._blocks(t, keep) for t in saved], self._blocks(output), c_last, keep, self.threads,
            self.split_rows, self.packed, self.batch_sizes, seq.state_mask,
        )  # fmt: skip

    def backward(self, grads: tuple[Tensor, Tensor, Tensor], seq: Sequence, h0: Tensor,
                 output: Tensor, saved: list[Tensor], grad_x: Tensor, grad_h0: Tensor,
                 grad_c0: Tensor, grad_pre: Tensor,
                 grad_inners: list[Tensor | None]) -> None:  # fmt: skip
        """From the gradients of (output (R, H), h_n, c_n), fill grad_x (R, I), grad_h0,
        grad_c0, grad_pre (R, 4H + the rounds' widths) and the low-rank rounds' inner
        gradients."""
        grad_output, grad_h, grad_c = grads
        blocks = self._blocks
        torch.ops.mogrifier_fast.chain_backward(
            self.isa, blocks(grad_output), grad_h.contiguous(), grad_c.contiguous(), seq.data,
            h0, blocks(output), self.params, self.scales, self.factors,
            [blocks(t) for t in saved], blocks(grad_x), grad_h0, grad_c0, blocks(grad_pre),
            [None if t is None else blocks(t) for t in grad_inners], self.threads,
            self.split_rows, self.packed, self.batch_sizes, seq.state_mask,
        )  # fmt: skip

    def rows_product(self, a: Tensor, b: Tensor, scale: float) -> Tensor | None:
        """scale · a^T b over all rows, or None when a row is not contiguous."""
        if a.stride(-1) != 1 or b.stride(-1) != 1:
            return None
        threads = threads_for(a.shape[0] * a.shape[1] * b.shape[1])
        return torch.ops.mogrifier_fast.rows_product(self.isa, a, b, scale, threads)


# -------------------------------------------------------------------------------------------------
# torch.compile and torch.export support: fake kernels, and torch.compile's import made quiet.
# -------------------------------------------------------------------------------------------------
#
# Tracing with fake tensors (torch.compile, torch.export, FakeTensorMode) runs an op's fake
# kernel, which computes only the metadata of its results. chain_forward and chain_backward
# return nothing and annotate every tensor they write (Tensor(a!)), so torch derives their fake
# kernels itself; rows_product returns a new tensor and needs one. Fake kernels can be registered
# only once the ops exist, that is once build() has loaded the C++ module: build() registers
# them right after.

# Floats per vector of each variant's loops (``Kernels::vector_width``, the ``VL`` of each
# ``isa_*.cpp``): rows_product pads its result's rows to a multiple of it.
VECTOR_WIDTHS = {"avx512": 16, "avx2": 8, "neon": 4, "generic": 4}


def _fake_rows_product(isa: str, a: Tensor, b: Tensor, scale: float, threads: int) -> Tensor:
    """rows_product's result as the C++ op lays it out: (m, n) columns of an (m, width) block,
    width = n rounded up to the variant's vector width."""
    n, vector = b.shape[1], VECTOR_WIDTHS.get(isa, 1)
    width = (n + vector - 1) // vector * vector
    return a.new_empty(a.shape[1], width).narrow(1, 0, n)


_fakes_registered = False


def register_fake_kernels() -> None:
    """Register the ops' fake kernels (once; the C++ module must be loaded)."""
    global _fakes_registered
    if not _fakes_registered:
        torch.library.register_fake("mogrifier_fast::rows_product", _fake_rows_product)
        _fakes_registered = True


# The first torch.compile in a process imports torch.utils.mkldnn, whose TorchScript classes
# warn (torch >= 2.11) that `torch.jit.script_method` is deprecated, whatever the model: that
# warning is torch's own, not this package's, but it surfaced as a warning of compiling a model
# that holds these layers. The module is imported here, once and quietly (about 10 ms), so that
# torch.compile of such a model warns of nothing.
def _import_torch_mkldnn_quietly() -> None:
    from mogrifier_fast.backends import quiet_torchscript_deprecation

    with quiet_torchscript_deprecation():
        import torch.utils.mkldnn  # noqa: F401


_import_torch_mkldnn_quietly()
