"""The one-shot GPU check: differential tests on CUDA for every backend, then the GPU benchmark.

    PYTHONPATH=. python benchmarks/gpu_check.py OUT_DIR      # or: benchmarks/gpu_check.sh OUT_DIR

Made for a machine with one GPU and only what it already has (torch, triton, pytest, pandas;
no package registry, nothing installed): run from the source tree. Within about five minutes
it writes to OUT_DIR:

* ``gpu_check.log``: the environment, each phase's command, time and exit status;
* first, the grid barrier's self-test (every SM's program through 2000 barriers; if it fails or
  hangs, the persistent backend's grid plan is left out of the later phases);
* ``tests.txt``: ``tests/test_kernels.py`` and ``tests/test_backends.py`` on CUDA
  (``MOGRIFIER_TEST_DEVICE=cuda``) for every backend but ``compile``: float64 and float32 with
  TF32 off against the oracle (the README's tolerances), bf16 and TF32 no worse than the
  reference loop in the same precision;
* ``tests-compile.txt``: the ``compile`` backend's float32 cases (it compiles per configuration);
* the benchmark's ``gpu`` preset (T=70, batch 64, I=H=512, r=5; the seed notebook's and the
  paper's sizes), training and inference, with both persistent plans forced beside the backend's
  own choice: ``cuda-<gpu>.csv`` and ``cuda-<gpu>-gpu.md``;
* ``predicted-vs-measured.csv``: each measured median next to the H200 model's prediction
  (``mogrifier_fast.predict``) for the configurations, modes and candidates both have.

Each phase has a time limit; a phase that fails or runs out of time is logged and the next one
still runs. The exit status is 0 only if every phase passed. ``--smoke`` runs a seconds-long
version on CPU with Triton's interpreter, which is how CI checks this script.
"""

from __future__ import annotations

import argparse
import os
import platform
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]

# Seconds per phase, about five minutes in all.
BARRIER_LIMIT_S = 20
TESTS_LIMIT_S = 130
COMPILE_TESTS_LIMIT_S = 40
BENCH_LIMIT_S = 110


# The grid barrier's self-test (first: a barrier that does not hold would hang the persistent
# grid plan): every SM's program through 2000 barriers (200 under --smoke: the interpreter runs
# one program, and slowly), under the phase's time limit. Arguments: device, phases.
BARRIER_CHECK = """
import sys, torch
from mogrifier_fast.kernels.persistent import barrier_check, grid_programs
device, phases = torch.device(sys.argv[1]), int(sys.argv[2])
programs = grid_programs(device) if device.type == "cuda" else 1  # the interpreter: one
passed = barrier_check(programs, phases, device)
print(f"barrier self-test over {programs} programs, {phases} phases: {'passed' if passed else 'FAILED'}")
sys.exit(0 if passed else 1)
"""


def environment() -> str:
    import torch

    lines = [
        f"python {platform.python_version()}, torch {torch.__version__}",
        f"cuda available: {torch.cuda.is_available()}",
    ]
    try:
        import triton

        lines.append(f"triton {triton.__version__}")
    except ImportError as error:
        lines.append(f"triton missing: {error}")
    if torch.cuda.is_available():
        properties = torch.cuda.get_device_properties(0)
        lines.append(
            f"{properties.name}, capability {properties.major}.{properties.minor}, "
            f"{properties.multi_processor_count} SMs, {properties.total_memory / 2**30:.0f} GiB; "
            f"CUDA {torch.version.cuda}, cuDNN {torch.backends.cudnn.version()}"
        )
        import mogrifier_fast as mf

        lines.append(f"backends on cuda: {mf.available_backends('cuda')}")
    return "\n".join(lines)


def phase(
    log, name: str, command: list[str], limit_s: int, device: str, output: Path | None = None
) -> bool:
    """Run one phase with a time limit; its output to ``output`` (or the log). True if it passed."""
    env = {**os.environ, "PYTHONPATH": f"{ROOT}{os.pathsep}{os.environ.get('PYTHONPATH', '')}",
           "MOGRIFIER_TEST_DEVICE": device, "PYTHONUNBUFFERED": "1", "TQDM_DISABLE": "1"}  # fmt: skip
    if device == "cpu":
        env["TRITON_INTERPRET"] = "1"
    else:
        env.pop("TRITON_INTERPRET", None)
    log.write(f"\n== {name}: {' '.join(command)} (limit {limit_s} s)\n")
    log.flush()
    started = time.perf_counter()
    with open(output or os.devnull, "w") as sink:
        try:
            status = subprocess.run(
                command, cwd=ROOT, env=env, stdout=sink if output else log,
                stderr=subprocess.STDOUT, timeout=limit_s,
            ).returncode  # fmt: skip
        except subprocess.TimeoutExpired:
            status = "timed out"
    log.write(f"== {name}: exit {status} after {time.perf_counter() - started:.0f} s\n")
    log.flush()
    return status == 0


def write_predicted_vs_measured(log, out: Path, device: str) -> None:
    """predicted-vs-measured.csv from the benchmark's CSV in ``out`` (logged; never fatal)."""
    measured = sorted(out.glob(f"{device}-*.csv"))
    if not measured:
        log.write("\n== predicted vs measured: no benchmark CSV, nothing compared\n")
        return
    try:
        import pandas as pd

        from mogrifier_fast.predict import predicted_vs_measured

        frame = predicted_vs_measured(pd.read_csv(measured[0]))
        frame.to_csv(out / "predicted-vs-measured.csv", index=False)
        log.write(f"\n== predicted vs measured: {len(frame)} rows in predicted-vs-measured.csv\n")
    except Exception as error:  # a comparison must not cost the run its other results
        log.write(f"\n== predicted vs measured: failed ({type(error).__name__}: {error})\n")


def main(argv: list[str]) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("out", type=Path, help="directory for the log, test output and CSVs")
    parser.add_argument(
        "--smoke",
        action="store_true",
        help="a few seconds' version on CPU (Triton's interpreter): checks this script itself",
    )
    args = parser.parse_args(argv)
    out = args.out.resolve()
    out.mkdir(parents=True, exist_ok=True)
    python, device = sys.executable, "cpu" if args.smoke else "cuda"
    if args.smoke:  # before mogrifier_fast (and so triton) is imported below
        os.environ["TRITON_INTERPRET"] = "1"
    tests = ["tests/test_kernels.py", "tests/test_backends.py"]
    bench = ["--preset", "gpu"]
    limits = (TESTS_LIMIT_S, BENCH_LIMIT_S, COMPILE_TESTS_LIMIT_S)
    plans = ["persistent[rows]", "persistent[grid]"]
    if args.smoke:
        tests = ["tests/test_backends.py", "-k", "triton and deterministic"]
        bench = ["--steps", "3", "--batch", "2", "--hidden-size", "8", "--repeats", "1",
                 "--mode", "inference"]  # fmt: skip
        plans = []
    else:
        tests += ["-k", "not compile"]
    with open(out / "gpu_check.log", "w") as log:
        log.write(environment() + "\n")
        import torch

        import mogrifier_fast as mf

        results = []
        if device == "cuda" and not torch.cuda.is_available():
            log.write("no CUDA device: nothing to check\n")
        else:
            backends = [b for b in mf.available_backends(device) if b != "compile"]
            results = [
                phase(log, "grid barrier self-test",
                      [python, "-c", BARRIER_CHECK, device, "200" if args.smoke else "2000"],
                      BARRIER_LIMIT_S, device),
            ]  # fmt: skip
            if not results[0]:  # keep the later phases from hanging on the grid plan
                log.write("the grid plan is left out: MOGRIFIER_PERSISTENT_PLAN=rows\n")
                os.environ["MOGRIFIER_PERSISTENT_PLAN"] = "rows"
                plans = [p for p in plans if p != "persistent[grid]"]
            results += [
                phase(log, "differential tests", [python, "-m", "pytest", "-q", "-x", "-p", "no:cacheprovider", *tests],
                      limits[0], device, out / "tests.txt"),
                phase(log, "benchmark", [python, "-m", "mogrifier_fast.bench", *bench, "--device", device,
                      "--candidates", ",".join([*backends, *plans, "nn.LSTM", "LSTMCell loop"]), "--out", str(out)],
                      limits[1], device),
            ]  # fmt: skip
            write_predicted_vs_measured(log, out, device)
            if not args.smoke:
                results.append(
                    phase(log, "compile backend tests", [python, "-m", "pytest", "-q", "-p", "no:cacheprovider",
                          "tests/test_backends.py", "-k", "compile and float32"],
                          limits[2], device, out / "tests-compile.txt")
                )  # fmt: skip
        log.write(f"\nphases passed: {sum(results)}/{len(results)}\n")
    print((out / "gpu_check.log").read_text())
    return 0 if results and all(results) else 1


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
