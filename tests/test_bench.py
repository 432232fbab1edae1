"""The benchmark harness on a tiny grid: the CSV it writes, its columns and values, bad input."""

from __future__ import annotations

import math
import subprocess
import sys
from pathlib import Path

import pandas as pd
import pytest
import torch

from mogrifier_fast import bench
from mogrifier_fast.backends import fused_chain

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
    isa = bench.grid_from_args(bench.parse_args(["--preset", "isa"]))
    assert {(c.steps, c.batch, c.input_size, c.hidden_size, c.share_rounds) for c in isa} == {
        (35, 16, 64, 64, False), (35, 32, 256, 256, False), (500, 32, 50, 125, True)
    }  # fmt: skip
    assert len(isa) == 6
    generation = bench.grid_from_args(bench.parse_args(["--preset", "generation"]))
    assert generation == [
        bench.Config(steps=32, batch=1, input_size=256, hidden_size=256, rounds=5, layers=2,
                     mode="generation", threads=1)
    ]  # fmt: skip
    for name in set(bench.PRESETS) - {"generation"}:  # generation only when asked for
        assert "generation" not in {
            c.mode for c in bench.grid_from_args(bench.parse_args(["--preset", name]))
        }
    assert {c.mode for c in bench.grid_from_args(bench.parse_args(["--steps", "3"]))} == {
        "inference",
        "training",
    }


def test_variant_candidates_parse() -> None:
    assert bench.variant_of("fused[avx2]") == "avx2" and bench.variant_of("fused") is None
    assert bench.variant_candidate("python") == "fused[python]"
    cpu = torch.device("cpu")
    variants = [bench.variant_candidate(v) for v in fused_chain.variants()]
    assert variants[-1] == "fused[python]"
    assert bench.resolve_candidates(["fused", *variants], cpu) == ["fused", *variants]
    assert fused_chain.default_variant() in fused_chain.variants()


def test_a_variant_this_cpu_lacks_is_refused() -> None:
    lacking = fused_chain.unrunnable_isas()
    if not lacking:
        pytest.skip("this CPU runs every variant the build holds")
    with pytest.raises(
        ValueError,
        match=rf"'fused\[{lacking[0]}\]'.*this CPU lacks its instructions\); expected some of",
    ):
        bench.resolve_candidates([f"fused[{lacking[0]}]"], torch.device("cpu"))


def test_without_the_cpp_loops_only_the_python_variant_runs(monkeypatch) -> None:
    monkeypatch.setattr(fused_chain, "unavailable_reason", lambda: "turned off")
    assert fused_chain.variants() == ["python"] and fused_chain.default_variant() == "python"
    assert bench.isa_candidates() == ["LSTMCell loop", "nn.LSTM", "fused[python]"]
    assert bench.file_stem(bench.machine_columns(torch.device("cpu"))).endswith("-python")
    with pytest.raises(ValueError, match=r"not built: turned off\); expected some of"):
        bench.resolve_candidates(["fused[generic]"], torch.device("cpu"))


def test_preset_candidates() -> None:
    cpu = torch.device("cpu")
    isa = bench.isa_candidates()
    assert isa[:2] == ["LSTMCell loop", "nn.LSTM"] and isa[-1] == "fused[python]"
    assert isa[2:-1] == [f"fused[{v}]" for v in fused_chain.variants()[:-1]]
    if fused_chain.unavailable_reason() is None:
        assert set(isa[2:-1]) == {f"fused[{v}]" for v in fused_chain.runnable_isas()}
    assert bench.resolve_candidates(None, cpu, "isa") == isa
    assert set(bench.resolve_candidates(None, cpu, "generation")) == {
        "fused", "fused[python]", "MogrifierLSTMCell", "LSTMCell loop", "nn.LSTM"
    }  # fmt: skip
    assert "fused[python]" not in bench.resolve_candidates(None, cpu, "quick")


def test_generation_mode_runs_every_kind_of_candidate(tmp_path) -> None:
    before = torch.get_num_threads()
    variants = [bench.variant_candidate(v) for v in fused_chain.variants()]
    candidates = ["fused", "reference", *variants, "MogrifierLSTMCell", "LSTMCell loop", "nn.LSTM"]
    bench.main(["--mode", "generation", "--steps", "3", "--batch", "1", "--hidden-size", "8", "--layers", "2",
                "--rounds", "2", "--threads", "1", "--repeats", "2", "--candidates", ",".join(candidates),
                "--out", str(tmp_path), "--name", "gen"])  # fmt: skip
    assert torch.get_num_threads() == before
    frame = pd.read_csv(tmp_path / "gen.csv")
    assert frame["candidate"].tolist() == candidates
    assert (frame["mode"] == "generation").all() and (frame["threads"] == 1).all()
    assert (frame["median_ms"] > 0).all() and (frame["peak_memory_mb"] >= 0).all()
    assert frame["ms_per_step"].tolist() == pytest.approx((frame["median_ms"] / 3).tolist())
    assert frame["tokens_per_s"].tolist() == pytest.approx((3e3 / frame["median_ms"]).tolist())
    summary = (tmp_path / "gen-grid.md").read_text()
    line = next(line for line in summary.splitlines() if "| MogrifierLSTMCell |" in line)
    assert line.startswith("| T=3 N=1 I=8 H=8 r=2 full L=2 float32 generation |")
    assert line.endswith("| 1 |")  # the threads column


def test_loop_steps_carry_each_layers_state() -> None:
    """With no rounds the LSTMCell loop, stepped, is nn.LSTM: the state goes to the right layer."""
    config = bench.Config(steps=4, batch=2, input_size=3, hidden_size=5, rounds=0, layers=2)
    loop, lstm = bench.LSTMCellLoop(config), torch.nn.LSTM(3, 5, num_layers=2)
    with torch.no_grad():
        for layer, cell in enumerate(loop.cells):
            for name in ("weight_ih", "weight_hh", "bias_ih", "bias_hh"):
                getattr(lstm, f"{name}_l{layer}").copy_(getattr(cell, name))
    x = torch.randn(4, 2, 3)
    output, (h_n, c_n) = lstm(x)
    torch.testing.assert_close(loop(x), output)
    _, state = loop.step(x[0], None)
    for x_t in x[1:]:
        _, state = loop.step(x_t, state)
    torch.testing.assert_close(torch.stack([h for h, _ in state]), h_n)
    torch.testing.assert_close(torch.stack([c for _, c in state]), c_n)


def test_file_stem_names_the_cpu_and_variant(tmp_path) -> None:
    columns = bench.machine_columns(torch.device("cpu"))
    assert columns["variant"] == fused_chain.default_variant()
    stem = bench.file_stem(columns)
    assert stem == f"cpu-{bench._slug(columns['device_name'])}-{columns['variant']}"
    bench.main([*TINY, "--rounds", "1", "--mode", "inference", "--candidates", "nn.LSTM", "--no-memory",
                "--out", str(tmp_path)])  # fmt: skip
    frame = pd.read_csv(tmp_path / f"{stem}.csv")
    assert frame["variant"].tolist() == [columns["variant"]]
    assert frame["isa_flags"].tolist() == [bench.isa_flags()]
    assert (
        bench.file_stem({**columns, "device": "cuda", "device_name": "NVIDIA H200"})
        == "cuda-nvidia-h200"
    )


@pytest.mark.parametrize(
    ("flags", "machine", "summary"),
    [
        ("flags\t\t: fpu sse2 avx2 fma avx512f\n", "x86_64", "avx512f"),
        ("flags\t\t: fpu sse2 avx avx2 fma\n", "x86_64", "avx2+fma"),
        ("flags\t\t: fpu sse2 avx\n", "x86_64", "baseline"),
        ("Features\t: fp asimd evtstrm\n", "aarch64", "neon"),
        ("", "arm64", "neon"),
        ("", "x86_64", "unknown"),
    ],
)
def test_isa_flags(flags, machine, summary) -> None:
    assert bench.isa_flags(flags, machine) == summary


@pytest.mark.parametrize(
    ("argv", "message"),
    [
        (["--preset", "huge"], "--preset: unknown preset 'huge'"),
        (["--candidates", "warp"], "--candidates: unknown or unavailable candidate 'warp'"),
        (["--candidates", "fused[sse9]"], "candidate 'fused[sse9]' on cpu; expected some of ["),
        (
            ["--candidates", "fused[generic]", "--dtype", "float64"],
            "force the C++ loops, which run float32 only",
        ),
        (["--threads", "-1"], "threads: expected >= 0 (0: torch's setting), got -1"),
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
    assert "phases passed: 3/3" in log and "triton" in log
    assert "barrier self-test over 1 programs, 200 phases: passed" in log
    assert (tmp_path / "tests.txt").read_text().strip().endswith("s")
    assert list(tmp_path.glob("cpu-*.csv"))
