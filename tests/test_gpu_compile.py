"""Every Triton kernel the GPU backends launch compiles for sm_90 without spilling, on any machine.

Runs ``benchmarks/gpu_compile.py --arch 90 --quick`` in a subprocess: the kernels must be
compiled, not interpreted, so TRITON_INTERPRET (which tests/conftest.py sets in this process) is
removed from its environment. The script compiles each launch for the GPU with a stand-in driver
and reads registers and spills from ``ptxas -v``; it exits 1 on a compile error, shared memory
above the SM's limit, or any spill. About a minute with a cold Triton cache.
"""

from __future__ import annotations

import csv
import os
import subprocess
import sys
from pathlib import Path

import pytest

triton = pytest.importorskip("triton", reason="triton is not installed (pip install -e .[dev])")

from mogrifier_fast.kernels.mogrify import _launch_plan  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]
SCRIPT = ROOT / "benchmarks" / "gpu_compile.py"
# The step-by-step backend's kernels, each launched at every quick size (training).
STEP_KERNELS = {
    "_mogrify_forward_kernel",
    "_mogrify_backward_kernel",
    "_lstm_forward_kernel",
    "_lstm_backward_kernel",
}


def _ptxas_missing() -> str | None:
    """Why Triton's ptxas cannot run here, or None."""
    try:
        from triton.backends.nvidia.compiler import get_ptxas

        get_ptxas(90)
    except Exception as failure:  # ImportError: no NVIDIA backend; RuntimeError: no binary
        return f"ptxas (Triton's NVIDIA backend) is unavailable: {failure}"
    return None


def _quick_sizes() -> dict[str, dict]:
    sys.path.insert(0, str(SCRIPT.parent))
    try:
        import gpu_compile
    finally:
        sys.path.remove(str(SCRIPT.parent))
    return gpu_compile.QUICK_SIZES


def test_quick_sizes_cover_every_kernel_path() -> None:
    """Dense and low-rank maps; all rounds in one launch, and a launch per round."""
    sizes = _quick_sizes().values()
    assert {bool(s.get("rank")) for s in sizes} == {False, True}
    launches = {
        len(_launch_plan(s["rounds"], max(s["input_size"], s["hidden_size"]), s["batch"]))
        for s in sizes
    }
    assert 1 in launches and max(launches) > 1, launches


def test_kernels_compile_for_sm90_without_spills(tmp_path: Path) -> None:
    reason = _ptxas_missing()
    if reason is not None:
        pytest.skip(reason)
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    result = subprocess.run(
        [sys.executable, str(SCRIPT), "--arch", "90", "--quick", "--out", str(tmp_path)],
        cwd=ROOT, env=env, capture_output=True, text=True, timeout=900,
    )  # fmt: skip
    report = result.stdout + result.stderr
    print(report)  # the kernels' registers and spills, shown with -s or on failure
    table = tmp_path / "gpu-kernels-sm90.csv"
    assert table.exists(), report
    with open(table, newline="") as source:
        rows = list(csv.DictReader(source))
    bad = [
        f"{r['backend']} {r['size']} {r['mode']} {r['dtype']} {r['kernel']}: spills "
        f"{r['spill_bytes']} B, shared {r['shared_bytes']}/{r['shared_limit']} B {r['error']}"
        for r in rows
        if r["error"] or int(r["spill_bytes"]) or int(r["shared_bytes"]) > int(r["shared_limit"])
    ]
    assert not bad, "compile errors, spills or too much shared memory:\n" + "\n".join(bad)
    assert result.returncode == 0, report

    for r in rows:  # a compiled kernel, with what ptxas and the launch report
        assert r["arch"] == "sm_90" and r["triton"] == triton.__version__, r
        assert int(r["registers"]) > 0 and int(r["warps"]) > 0 and int(r["programs"]) > 0, r
    persistent = {r["backend"] for r in rows if r["backend"].startswith("persistent")}
    assert persistent, "no persistent backend's kernels"
    for size in _quick_sizes():  # every kernel at every quick size
        for backend in ("triton", *persistent):
            kernels = {r["kernel"] for r in rows if r["size"] == size and r["backend"] == backend}
            if backend == "triton":
                assert kernels >= STEP_KERNELS, (size, kernels)
            else:
                assert any(k.startswith("_persistent") for k in kernels), (size, backend, kernels)
