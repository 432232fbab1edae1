"""The benchmark harness on a tiny grid: the CSV it writes, its columns and values, bad input."""

from __future__ import annotations

import math
import subprocess
import sys
from pathlib import Path

import pandas as pd
import pytest

from mogrifier_fast import bench

ROOT = Path(__file__).resolve().parents[1]

TINY = ["--steps", "3", "--batch", "2", "--hidden-size", "4", "--rounds", "0,2", "--repeats", "2"]
CANDIDATES = ["--candidates", "reference,fused,nn.LSTM,LSTMCell loop"]


def run_bench(tmp_path, *extra: str) -> pd.DataFrame:
    bench.main([*TINY, *CANDIDATES, "--out", str(tmp_path), "--name", "tiny", *extra])
    return pd.read_csv(tmp_path / "tiny.csv")


def test_tiny_grid_writes_a_tidy_csv(tmp_path, capsys) -> None:
    frame = run_bench(tmp_path)
    modes = {"inference", "training"}
    assert len(frame) == 2 * 2 * 4  # rounds x modes x candidates (quick preset's modes)
    assert set(frame["mode"]) == modes and set(frame["rounds"]) == {0, 2}
    for column in ("candidate", "median_ms", "min_ms", "max_ms", "ms_per_step", "tokens_per_s", "speedup_vs_reference",
                   "speedup_vs_loop", "time_vs_lstm", "warmup_s", "peak_memory_mb", "device", "device_name",
                   "torch_version", "git_commit"):  # fmt: skip
        assert column in frame.columns, column
    assert (frame["median_ms"] > 0).all() and (frame["min_ms"] <= frame["median_ms"]).all()
    assert (frame["median_ms"] <= frame["max_ms"]).all() and (frame["peak_memory_mb"] >= 0).all()
    assert frame["tokens_per_s"].tolist() == pytest.approx(
        (frame["steps"] * frame["batch"] / frame["median_ms"] * 1e3).tolist()
    )
    for _, group in frame.groupby(["rounds", "mode"]):
        reference = group.set_index("candidate")["median_ms"]
        for _, row in group.iterrows():
            assert math.isclose(
                row["speedup_vs_reference"], reference["reference"] / row["median_ms"], rel_tol=1e-9
            )
            assert math.isclose(
                row["speedup_vs_loop"], reference["LSTMCell loop"] / row["median_ms"], rel_tol=1e-9
            )
            assert math.isclose(
                row["time_vs_lstm"], row["median_ms"] / reference["nn.LSTM"], rel_tol=1e-9
            )
    summary = (tmp_path / "tiny-grid.md").read_text()
    assert "| T=3 N=2 I=4 H=4 r=2 full L=1 float32 training | fused |" in summary
    assert "vs reference" in capsys.readouterr().out


def test_a_second_run_appends_and_keeps_earlier_rows(tmp_path) -> None:
    first = run_bench(tmp_path, "--mode", "training")
    both = run_bench(tmp_path, "--mode", "inference", "--no-memory")
    assert len(both) == 2 * len(first)
    pd.testing.assert_frame_equal(both.iloc[: len(first)].reset_index(drop=True), first)


def test_other_columns_in_the_file_are_refused(tmp_path, capsys) -> None:
    (tmp_path / "tiny.csv").write_text("a,b\n1,2\n")
    with pytest.raises(SystemExit) as exit_info:
        run_bench(tmp_path)
    assert exit_info.value.code == 2
    assert "existing columns ['a', 'b'] differ" in capsys.readouterr().err
    assert (tmp_path / "tiny.csv").read_text() == "a,b\n1,2\n"


def test_grid_from_toml(tmp_path) -> None:
    grid = tmp_path / "grid.toml"
    grid.write_text(
        'steps = 3\nbatch = [1, 2]\nhidden_size = 4\nrounds = 1\nmode = "training"\nrank = 1\n'
    )
    configs = bench.grid_from_args(bench.parse_args(["--grid", str(grid)]))
    assert [(c.batch, c.rank, c.input_size) for c in configs] == [(1, 1, 4), (2, 1, 4)]


def test_presets_expand() -> None:
    assert len(bench.grid_from_args(bench.parse_args([]))) == 4  # quick: S and M, two modes
    seed = bench.grid_from_args(bench.parse_args(["--preset", "seed"]))
    assert {
        (c.steps, c.batch, c.input_size, c.hidden_size, c.rounds, c.share_rounds) for c in seed
    } == {(500, 32, 50, 125, 5, True)}
    paper = bench.grid_from_args(bench.parse_args(["--preset", "paper", "--mode", "training"]))
    assert [(c.hidden_size, c.rank, c.batch, c.steps, c.mode) for c in paper] == [
        (1000, 84, 64, 70, "training")
    ]


@pytest.mark.parametrize(
    ("argv", "message"),
    [
        (["--preset", "huge"], "--preset: unknown preset 'huge'"),
        (["--candidates", "warp"], "--candidates: unknown or unavailable candidate 'warp'"),
        (["--device", "cuda"], "--device: CUDA was asked for"),
        (["--dtype", "float16"], "dtype: unknown dtype 'float16'"),
        (["--mode", "serving"], "mode: unknown mode 'serving'"),
        (["--hidden-size", "200000", "--steps", "5000"], "grid: T=5000 N=16 I=200000 H=200000"),
        (["--repeats", "0"], "--repeats: expected >= 1, got 0"),
    ],
)
def test_bad_input_is_one_line(argv, message, tmp_path, capsys) -> None:
    if argv[:2] == ["--device", "cuda"]:
        pytest.importorskip("torch").cuda.is_available() and pytest.skip("this machine has CUDA")
    with pytest.raises(SystemExit) as exit_info:
        bench.main([*argv, "--out", str(tmp_path)])
    assert exit_info.value.code == 2
    error = capsys.readouterr().err.strip()
    assert error.startswith("mogrifier-bench: error: ") and message in error and "\n" not in error


def test_unknown_grid_column(tmp_path, capsys) -> None:
    grid = tmp_path / "grid.toml"
    grid.write_text("hiden_size = 4\n")
    with pytest.raises(SystemExit):
        bench.main(["--grid", str(grid), "--out", str(tmp_path)])
    assert "grid: unknown column(s) ['hiden_size']" in capsys.readouterr().err


def test_gpu_check_script_runs_in_smoke_mode(tmp_path: Path) -> None:
    """benchmarks/gpu_check.py end to end on CPU (--smoke: Triton's interpreter, tiny sizes)."""
    result = subprocess.run(
        [sys.executable, "benchmarks/gpu_check.py", str(tmp_path), "--smoke"],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert result.returncode == 0, result.stdout + result.stderr
    log = (tmp_path / "gpu_check.log").read_text()
    assert "phases passed: 2/2" in log and "triton" in log
    assert (tmp_path / "tests.txt").read_text().strip().endswith("s")
    assert list(tmp_path.glob("cpu-*.csv"))
