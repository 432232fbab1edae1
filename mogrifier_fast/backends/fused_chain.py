"""The C++ time loops of backend ``"fused"`` (``mogrifier_fast/csrc/fused_chain.cpp``).

Built with the system's C++ compiler and ninja on first use (about 10 s, then cached by
``torch.utils.cpp_extension`` under ``TORCH_EXTENSIONS_DIR``) for this machine's vector
instructions, and used for float32 on CPU. Where it cannot be built, ``"fused"`` runs its Python
loops (the same results; slower), after one logged warning. ``MOGRIFIER_NATIVE=0`` turns it off.
"""

from __future__ import annotations

import functools
import hashlib
import logging
import os
import platform
import shutil
import sysconfig
from pathlib import Path

import torch
from torch import Tensor

logger = logging.getLogger("mogrifier_fast")
SOURCE = Path(__file__).resolve().parent.parent / "csrc" / "fused_chain.cpp"
# A product of at least this many multiply-adds (for the loops: a step's gate product) is split
# across torch's threads; below it one thread runs it (a barrier costs more than it shares).
PARALLEL_MACS = 1 << 18
# With at most this many bytes of weights, and at least 8 batch rows per thread, each thread runs
# the loops on its own rows (reading every weight each step; no barrier); above it the threads
# share each product's columns. Measured on 2 cores (interleaved, float32, r=5): rows ahead by
# 1.02-1.38x up to 3.25 MiB of weights (H=256), even at 13 MiB (H=512), and at 33 MiB (H=1000)
# behind for inference (0.94x), ahead for training (1.04x).
ROW_SPLIT_MAX_WEIGHT_BYTES = 8 << 20


def _build_tag() -> str:
    """Distinguishes builds for different CPUs (the code is compiled for the build machine's
    instructions) and torch versions (its headers and ABI)."""
    flags = f"{torch.__version__} {platform.machine()}"
    try:
        with open("/proc/cpuinfo") as cpuinfo:
            flags += next((line for line in cpuinfo if line.startswith("flags")), "")
    except OSError:
        pass
    return hashlib.sha1(flags.encode()).hexdigest()[:10]


def _ninja_on_path() -> None:
    """torch runs ``ninja`` from PATH; the ``ninja`` package (a dependency) puts it among this
    interpreter's scripts, which are not on PATH in a virtual environment that was not
    activated: add that directory at its end."""
    scripts = sysconfig.get_path("scripts")
    if shutil.which("ninja") is None and shutil.which("ninja", path=scripts) is not None:
        os.environ["PATH"] = os.pathsep.join([os.environ.get("PATH", ""), scripts])


@functools.cache
def unavailable_reason() -> str | None:
    """None once the C++ loops are built and loaded here, else why they are not."""
    if os.environ.get("MOGRIFIER_NATIVE", "1") == "0":
        return "turned off by MOGRIFIER_NATIVE=0"
    try:
        from torch.utils import cpp_extension

        _ninja_on_path()
        cpp_extension.load(
            name=f"mogrifier_fast_chain_{_build_tag()}",
            sources=[str(SOURCE)],
            extra_cflags=["-O3", "-march=native", "-fopenmp"],
            extra_ldflags=["-fopenmp"],
            is_python_module=False,
            verbose=False,
        )
    except Exception as error:  # no compiler, no headers, a failed build: all mean "not here"
        first_line = str(error).strip().splitlines()[0] if str(error).strip() else repr(error)
        reason = f"could not build {SOURCE.name} ({type(error).__name__}: {first_line})"
        logger.warning("backend 'fused' runs its Python loops: %s", reason)
        return reason
    return None


def usable(x: Tensor) -> bool:
    """Whether the C++ loops run a call on input x (float32 on CPU, built here)."""
    return x.device.type == "cpu" and x.dtype == torch.float32 and unavailable_reason() is None


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
