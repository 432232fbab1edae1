"""Compile every Triton kernel the GPU backends launch, for an NVIDIA GPU, on a machine without one.

    python benchmarks/gpu_compile.py --out benchmarks/results   # sm_90 and sm_80, the full matrix
    python benchmarks/gpu_compile.py --arch 90 --quick           # one small configuration per path

The full matrix: the GPU preset (T=70, N=64, I=H=512, r=5), the seed notebook's size and the
paper's (I=H=1000, rank 84), training and inference, float32 and bfloat16. Each backend
(``triton``, and ``persistent`` in each of its plans, the grid plan over the target GPU's SMs:
132 for sm_90, an H200; 108 for sm_80, an A100) runs on CPU tensors with Triton's active driver
replaced by a stand-in that reports an NVIDIA target, and every launch turned into a
compile-only warm-up: each kernel is compiled exactly as that launch would compile it on the
GPU (same arguments, constexprs, grid), and nothing runs. ``ptxas -v`` (from Triton's wheel)
then reports each compiled kernel's registers and spills. One CSV row per distinct compiled
kernel and configuration: kernel, configuration, mode, dtype, programs, warps, stages, shared
bytes (and the SM's limit), registers, spill bytes, Triton version.

Must run without ``TRITON_INTERPRET`` (the kernels must be compiled, not interpreted); the CI test
runs it in a subprocess. The exit status is 1 where a kernel fails to compile, needs more shared
memory than the SM has, or spills. The grid barrier's self-test kernel is compiled too, over
every SM.
"""

from __future__ import annotations

import argparse
import contextlib
import csv
import math
import os
import re
import subprocess
import sys
import tempfile
from collections.abc import Iterator
from dataclasses import asdict, dataclass
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

# Shared memory a block may use per SM (opt-in maximum), by compute capability: H100/H200 (9.0)
# 227 KB, A100 (8.0) 163 KB (CUDA C Programming Guide, "Compute Capabilities", table of
# technical specifications).
SHARED_LIMIT = {90: 227 * 1024, 80: 163 * 1024}
# SMs of the GPUs these targets stand for: H200 (9.0) and A100 (8.0).
SM_COUNT = {90: 132, 80: 108}

SIZES = {
    # T, batch, input, hidden, rounds, rank, shared maps
    "gpu": dict(steps=70, batch=64, input_size=512, hidden_size=512, rounds=5),
    "seed": dict(steps=500, batch=32, input_size=50, hidden_size=125, rounds=5, share_rounds=True),
    "paper": dict(steps=70, batch=64, input_size=1000, hidden_size=1000, rounds=5, rank=84),
}
# One small configuration per kernel path (dense and low-rank maps, narrow states in one launch
# and wide ones a launch per round, both persistent kernels): what the CI test compiles.
QUICK_SIZES = {
    "small-dense": dict(steps=3, batch=8, input_size=24, hidden_size=40, rounds=5),
    # Three rounds: x-rounds 1 and 3 and h-round 2, each its own launch (keeps the test near a
    # minute: every round is a kernel to compile).
    "small-wide-lowrank": dict(steps=3, batch=8, input_size=264, hidden_size=272, rounds=3, rank=8),
}


@dataclass
class KernelRow:
    kernel: str
    size: str
    mode: str
    dtype: str
    backend: str
    arch: str
    programs: int
    warps: int
    stages: int
    shared_bytes: int
    shared_limit: int
    registers: int
    spill_bytes: int
    triton: str
    error: str = ""

    @property
    def clean(self) -> bool:
        return not self.error and self.spill_bytes == 0 and self.shared_bytes <= self.shared_limit


class _StandInDriver:
    """What ``JITFunction.run`` asks of Triton's active driver, answered for a GPU that is absent."""

    def __init__(self, capability: int) -> None:
        from triton.backends.compiler import GPUTarget

        self.target = GPUTarget("cuda", capability, 32)

    def get_current_target(self):
        return self.target

    def get_current_device(self) -> int:
        return 0

    def get_current_stream(self, device: int | None = None) -> int:
        return 0


@contextlib.contextmanager
def compile_only(capability: int) -> Iterator[list[tuple[str, tuple, object]]]:
    """Within: every ``triton.jit`` launch compiles for sm_<capability> and does not run; yields
    the list of launches made, (kernel name, grid, compiled kernel)."""
    from triton.runtime import driver
    from triton.runtime.jit import JITFunction

    launches: list[tuple[str, tuple, object]] = []
    original = JITFunction.run

    def run(self, *args, grid, warmup, **kwargs):
        kernel = original(self, *args, grid=grid, warmup=True, **kwargs)
        launches.append((self.fn.__name__, tuple(grid) if not callable(grid) else (), kernel))
        return kernel

    # Kept for the process (Triton caches each device's target on first use, and has no driver
    # to go back to on a machine without a GPU): one capability per process.
    driver.set_active(_StandInDriver(capability))
    JITFunction.run = run
    try:
        yield launches
    finally:
        JITFunction.run = original


def ptxas_report(ptx: str, capability: int) -> tuple[int, int]:
    """(registers, spill bytes: stores + loads) from ``ptxas -v`` on one kernel's PTX."""
    from triton.backends.nvidia.compiler import get_ptxas, sm_arch_from_capability

    with tempfile.TemporaryDirectory() as scratch:
        source = Path(scratch, "kernel.ptx")
        source.write_text(ptx)
        result = subprocess.run(
            [get_ptxas(capability).path, "-v", f"--gpu-name={sm_arch_from_capability(capability)}",
             str(source), "-o", str(Path(scratch, "kernel.o"))],
            capture_output=True, text=True, check=True,
        )  # fmt: skip
    log = result.stderr
    registers = max((int(r) for r in re.findall(r"Used (\d+) registers", log)), default=0)
    spills = sum(int(b) for b in re.findall(r"(\d+) bytes spill (?:stores|loads)", log))
    return registers, spills


BACKENDS = ("triton", "persistent[rows]", "persistent[grid]")


def run_backend(backend: str, size: dict, mode: str, dtype, programs: int) -> None:
    """One layer's call (and backward in training) through ``backend``'s kernels, on CPU: one of
    :data:`BACKENDS`, a persistent backend with its plan; ``programs``: the grid plan's (the
    GPU's SMs)."""
    import torch

    import mogrifier_fast as mf
    from mogrifier_fast.backends.persistent import run_persistent
    from mogrifier_fast.backends.triton_steps import run_sequence
    from mogrifier_fast.kernels import persistent
    from mogrifier_fast.mogrify import Sequence, State

    options = {k: size[k] for k in ("rounds", "rank", "share_rounds") if k in size}
    torch.manual_seed(0)
    layer = mf.MogrifierLSTM(
        size["input_size"], size["hidden_size"], backend="reference", dtype=dtype, **options
    )
    training = mode == "training"
    layer.requires_grad_(training)
    params = layer.layer_params(0)
    x = torch.randn(size["steps"], size["batch"], size["input_size"], dtype=dtype)
    x.requires_grad_(training)
    zeros = torch.zeros(size["batch"], size["hidden_size"], dtype=dtype)
    if backend.startswith("persistent"):
        os.environ["MOGRIFIER_PERSISTENT_PLAN"] = backend[len("persistent[") : -1]
        persistent.grid_programs = lambda device: programs
        run = run_persistent
    else:
        run = run_sequence
    with torch.set_grad_enabled(training):
        output, state = run(Sequence(x), State(zeros, zeros), params)
    if training:
        (output.sum() + state.h.sum() + state.c.sum()).backward()


def compile_matrix(
    capability: int, sizes: dict[str, dict], modes: list[str], dtypes: list[str],
    backends: tuple[str, ...] = BACKENDS,
) -> list[KernelRow]:  # fmt: skip
    """One row per distinct compiled kernel over sizes x modes x dtypes x backends."""
    import torch
    import triton

    rows: list[KernelRow] = []

    def record(launches, size_name: str, mode: str, dtype_name: str, backend: str, error: str):
        if error and not launches:
            rows.append(KernelRow("(none)", size_name, mode, dtype_name, backend,
                                  f"sm_{capability}", 0, 0, 0, 0, 0, 0, 0,
                                  triton.__version__, error))  # fmt: skip
        seen: set[int] = set()
        for name, grid, kernel in launches:
            if id(kernel) in seen:
                continue
            seen.add(id(kernel))
            registers, spills = ptxas_report(kernel.asm["ptx"], capability)
            rows.append(KernelRow(
                name, size_name, mode, dtype_name, backend, f"sm_{capability}",
                math.prod(grid), kernel.metadata.num_warps, kernel.metadata.num_stages,
                kernel.metadata.shared, SHARED_LIMIT[capability], registers, spills,
                triton.__version__, error,
            ))  # fmt: skip

    from mogrifier_fast.kernels.persistent import barrier_check

    with compile_only(capability) as launches:  # the grid barrier's self-test, over every SM
        barrier_check(SM_COUNT[capability], 4, "cpu")
    record(launches, "-", "-", "int32", "barrier", "")
    for size_name, size in sizes.items():
        for mode in modes:
            for dtype_name in dtypes:
                dtype = getattr(torch, dtype_name)
                for backend in backends:
                    error = ""
                    with compile_only(capability) as launches:
                        try:
                            run_backend(backend, size, mode, dtype, SM_COUNT[capability])
                        except Exception as failure:  # a compile error is a result to report
                            error = f"{type(failure).__name__}: {str(failure)[:200]}"
                    record(launches, size_name, mode, dtype_name, backend, error)
    return rows


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--arch", default="90,80", help="compute capabilities (default 90,80)")
    parser.add_argument("--quick", action="store_true", help="one small configuration per path")
    parser.add_argument(
        "--backends", default=",".join(BACKENDS), help=f"of {', '.join(BACKENDS)} (default all)"
    )
    parser.add_argument(
        "--out", type=Path, default=None, help="write gpu-kernels-sm<arch>.csv here"
    )
    args = parser.parse_args(argv)
    if os.environ.get("TRITON_INTERPRET"):
        parser.error("unset TRITON_INTERPRET: the kernels must be compiled, not interpreted")
    sizes = QUICK_SIZES if args.quick else SIZES
    modes = ["training"] if args.quick else ["training", "inference"]
    dtypes = ["float32"] if args.quick else ["float32", "bfloat16"]
    arches = [int(a) for a in args.arch.split(",")]
    if len(arches) > 1:  # one capability per process (see compile_only)
        statuses = [
            subprocess.run([sys.executable, __file__, *(argv or sys.argv[1:]), "--arch", str(arch)])
            for arch in arches
        ]  # fmt: skip
        return max(status.returncode for status in statuses)
    failed = False
    for arch in arches:
        rows = compile_matrix(arch, sizes, modes, dtypes, tuple(args.backends.split(",")))
        for row in rows:
            flag = "" if row.clean else "  <-- " + (row.error or "spills / shared memory")
            print(
                f"sm_{arch} {row.backend:10s} {row.size:18s} {row.mode:9s} {row.dtype:8s} "
                f"{row.kernel:30s} programs {row.programs:5d} warps {row.warps} "
                f"shared {row.shared_bytes:6d} regs {row.registers:3d} spills {row.spill_bytes}"
                + flag
            )
        failed |= not all(row.clean for row in rows)
        if args.out is not None:
            args.out.mkdir(parents=True, exist_ok=True)
            with open(args.out / f"gpu-kernels-sm{arch}.csv", "w", newline="") as sink:
                writer = csv.DictWriter(sink, fieldnames=list(asdict(rows[0])))
                writer.writeheader()
                writer.writerows(asdict(row) for row in rows)
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
