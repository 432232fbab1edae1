"""The NEON loops of backend "fused" (csrc/isa_neon.cpp), checked on an x86 machine.

isa_neon.cpp is compiled only for aarch64, so on x86 CI nothing else builds or runs it. Here
tests/native/neon_check.cpp, a standalone program without ATen, is cross-compiled for aarch64
together with isa_neon.cpp and isa_generic.cpp and run under qemu-user, which emulates the
NEON instructions. It runs both variants on the same random inputs (rows_product; the forward
with its saved buffers; the backward) over round counts, dense, low-rank and shared maps, biases,
odd sizes, batch rows and every plan, with every buffer ending at a guard page; it fails on a
relative error above 1e-5, an unwritten output, an access past a buffer or an unexpected number
of comparisons. A second test checks that the NEON variant really is vector code.

Needs ``apt-get install g++-aarch64-linux-gnu qemu-user`` (skipped without them). On an aarch64
machine the program runs natively.
"""

from __future__ import annotations

import os
import platform
import re
import shutil
import subprocess
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
CSRC = ROOT / "mogrifier_fast" / "csrc"
CHECK = ROOT / "tests" / "native" / "neon_check.cpp"
SOURCES = [CHECK, CSRC / "isa_neon.cpp", CSRC / "isa_generic.cpp"]
INSTALL = "apt-get install g++-aarch64-linux-gnu qemu-user"
NATIVE = platform.machine() in ("aarch64", "arm64")
COMPILER = ("aarch64-linux-gnu-g++", *(["g++"] if NATIVE else []))
EMULATOR = () if NATIVE else ("qemu-aarch64", "qemu-aarch64-static")
OBJDUMP = ("aarch64-linux-gnu-objdump", *(["objdump"] if NATIVE else []))


def _tools(*wanted: tuple[str, ...]) -> list[str]:
    """For each tuple of alternatives, the first on PATH; a skip naming all that are missing
    and how to install them."""
    found = [next(filter(None, map(shutil.which, names)), None) for names in wanted]
    missing = [" or ".join(names) for names, path in zip(wanted, found, strict=True) if not path]
    if missing:
        pytest.skip(f"{', '.join(missing)} not found: {INSTALL}")
    return [path for path in found if path]


def _build(tmp_path: Path) -> Path:
    """neon_check, statically linked for aarch64: the three sources compiled side by side."""
    (compiler,) = _tools(COMPILER)
    flags = ["-std=c++20", "-O2", "-fopenmp", "-Wall", "-Wextra", f"-I{CSRC}"]
    objects = [tmp_path / f"{source.stem}.o" for source in SOURCES]
    jobs = [
        subprocess.Popen(
            [compiler, *flags, "-c", str(source), "-o", str(obj)],
            stdout=subprocess.PIPE,
            stderr=subprocess.STDOUT,
            text=True,
        )
        for source, obj in zip(SOURCES, objects, strict=True)
    ]
    for source, job in zip(SOURCES, jobs, strict=True):
        out, _ = job.communicate()
        assert job.returncode == 0, f"{source.name} does not compile for aarch64:\n{out}"
    binary = tmp_path / "neon_check"
    link = subprocess.run(
        [compiler, "-fopenmp", "-static", *map(str, objects), "-o", str(binary)],
        capture_output=True,
        text=True,
    )
    assert link.returncode == 0, f"link failed:\n{link.stdout}{link.stderr}"
    return binary


@pytest.fixture(scope="module")
def neon_check(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return _build(tmp_path_factory.mktemp("neon"))


def test_neon_matches_generic(neon_check: Path) -> None:
    runner = _tools(EMULATOR) if EMULATOR else []
    # Threads that wait spin by default, which under emulation costs more than the work.
    env = {**os.environ, "OMP_WAIT_POLICY": "passive"}
    run = subprocess.run(
        [*runner, str(neon_check)], capture_output=True, text=True, env=env, timeout=300
    )
    lines = run.stdout.splitlines()
    failures = [line for line in lines if line.startswith("FAIL")]
    shown = "\n".join([*failures[:40], "...", *lines[-5:]])
    assert run.returncode == 0, (
        f"neon_check exited with {run.returncode}:\n{shown}\nstderr:\n{run.stderr[-2000:]}"
    )
    assert lines and lines[-1] == "PASS", shown
    print(lines[-2])


def test_neon_kernel_is_vector_code(neon_check: Path) -> None:
    """The NEON variant's code has 4-float fused multiply-adds (fmla vD.4s), a whole register
    tile's worth (6 rows x 3 vectors) in one function, so it is not scalar code that merely
    passes."""
    (objdump,) = _tools(OBJDUMP)
    listing = subprocess.run(
        [objdump, "-d", "-C", "--no-show-raw-insn", str(neon_check)],
        capture_output=True,
        text=True,
        check=True,
    ).stdout
    fmla: dict[str, int] = {}  # per function of the NEON loops
    function = None
    for line in listing.splitlines():
        if header := re.match(r"^[0-9a-f]+ <(.*)>:$", line):
            function = header[1] if "Loops<(anonymous namespace)::Neon>" in header[1] else None
        elif function and re.search(r"\bfmla\s+v\d+\.4s,", line):
            fmla[function] = fmla.get(function, 0) + 1
    most = sorted(fmla.items(), key=lambda item: -item[1])[:3]
    assert most and most[0][1] >= 6 * 3, f"fmla .4s per NEON function, most first: {most}"
