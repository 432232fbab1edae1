"""The H200 time model behind ``mogrifier-bench --predict``: invariants, the CLI, bad input."""

from __future__ import annotations

import dataclasses
import itertools
import math

import pandas as pd
import pytest

from mogrifier_fast import bench, predict
from mogrifier_fast.bench import Config

GPU = bench.grid_from_args(bench.parse_args(["--preset", "gpu"]))  # GPU, seed, paper; two modes
SMALL = Config(steps=35, batch=16, input_size=64, hidden_size=64, rounds=5, mode="training")
CASES = [*GPU, SMALL, dataclasses.replace(SMALL, rank=8, rounds=3, mode="inference")]


def time(candidate: str, config: Config, precision: str = "float32", **kw) -> float:
    return predict.predict(candidate, config, precision, **kw)["predicted_ms"]


@pytest.fixture(scope="module")
def frame() -> pd.DataFrame:
    return predict.table(CASES, list(predict.PRECISIONS), list(predict.CANDIDATES))


def test_times_are_positive_and_the_breakdown_adds_up(frame) -> None:
    assert len(frame) == len(CASES) * len(predict.PRECISIONS) * len(predict.CANDIDATES)
    assert list(frame.columns) == predict.COLUMNS
    terms = ["flop_ms", "hbm_ms", "l2_ms", "launch_ms", "launch_graph_ms", "barrier_ms"]
    assert (frame[["predicted_ms", *terms]] >= 0).all().all()
    assert (frame["predicted_ms"] > 0).all() and frame["predicted_ms"].map(math.isfinite).all()
    # time = Σ max(flop, hbm, l2) + launches + barriers: at least each term, at most their sum.
    launch = frame["launch_graph_ms"].where(frame["cuda_graphs"], frame["launch_ms"])
    for term in ("flop_ms", "hbm_ms", "l2_ms"):
        assert (frame["predicted_ms"] >= frame[term] + launch + frame["barrier_ms"] - 1e-9).all()
    upper = frame[["flop_ms", "hbm_ms", "l2_ms"]].sum(axis=1) + launch + frame["barrier_ms"]
    assert (frame["predicted_ms"] <= upper + 1e-9).all()
    assert set(frame["dominant"]) <= {"flops", "HBM", "L2", "launches", "barriers"}
    lstm = frame[frame["candidate"] == "nn.LSTM"]
    assert (lstm["time_vs_lstm"] == 1).all() and not lstm["cuda_graphs"].any()


def test_more_steps_layers_or_a_backward_cost_more_time() -> None:
    for config, name in itertools.product(CASES, predict.CANDIDATES):
        base = time(name, config)
        assert time(name, dataclasses.replace(config, steps=2 * config.steps)) > base, name
        assert time(name, dataclasses.replace(config, layers=2)) > base, name
        if config.mode == "inference":
            assert time(name, dataclasses.replace(config, mode="training")) > base, name


def test_tf32_and_bfloat16_are_no_slower_than_exact_float32(frame) -> None:
    times = frame.set_index(["configuration", "mode", "candidate", "dtype"])["predicted_ms"]
    by_dtype = times.unstack("dtype")
    assert (by_dtype["tf32"] <= by_dtype["float32"] + 1e-12).all()
    assert (by_dtype["bfloat16"] <= by_dtype["float32"] + 1e-12).all()
    # nn.LSTM runs cuDNN in TF32 by default (cudnn.allow_tf32), so float32 is its TF32 time.
    lstm = by_dtype.xs("nn.LSTM", level="candidate")
    assert (lstm["tf32"] == lstm["float32"]).all()


def test_graphs_are_no_slower_than_launches_for_the_step_by_step_backends(frame) -> None:
    steps = frame[frame["candidate"].isin(["triton", "cudnn"])]
    assert (steps["launch_graph_ms"] < steps["launch_ms"]).all()
    # A single persistent launch gains nothing from graphs; the graph wrapper's copies into its
    # static inputs (every parameter, every call) cost more than the few launches they replace.
    persistent = frame[frame["candidate"].str.startswith("persistent")]
    assert (persistent["launches"] < steps["launches"].min()).all()


def test_the_roofline_terms_follow_the_hardware_figures() -> None:
    config = GPU[0]
    slower = predict.phases("persistent[grid]", config, "float32")
    gate = next(p for p in slower if p.name == "gates + LSTM cell")
    times = predict.phase_times(gate)
    # One phase per step: T runs, each over tiles on at most every SM.
    expected_flop = config.steps * gate.flops / (predict.FP32_FLOPS * predict.TRITON_FMA_EFFICIENCY)
    assert times["flop"] >= expected_flop * (1 - 1e-12)  # no more than the whole chip
    assert times["barrier"] == pytest.approx(config.steps * predict.GRID_BARRIER_S)
    # Work that cannot fill the chip is charged at its share of SMs: 4 programs of the rows plan.
    rows = next(p for p in predict.phases("persistent[rows]", config, "float32") if p.flops)
    share = math.ceil(config.batch / 16) / predict.SMS
    assert predict.phase_times(rows)["flop"] == pytest.approx(
        config.steps * rows.flops / (predict.FP32_FLOPS * share * predict.TRITON_FMA_EFFICIENCY)
    )


def test_persistent_plan_is_the_faster_prediction() -> None:
    for config in CASES:
        plan = predict.persistent_plan(config)
        assert plan in predict.PLANS
        precision = "float32"
        times = {p: time(f"persistent[{p}]", config, precision) for p in predict.PLANS}
        assert times[plan] == min(times.values())
    gpu_training = next(c for c in GPU if c.steps == 70 and c.hidden_size == 512)
    assert predict.persistent_plan(dataclasses.replace(gpu_training, mode="training")) == "grid"
    # With one SM the grid plan is one program paying grid barriers: the rows plan wins.
    assert predict.persistent_plan(SMALL, sms=1) == "rows"


def test_weights_over_the_persistent_budget_run_step_by_step() -> None:
    big = Config(steps=4, batch=8, input_size=2048, hidden_size=2048, rounds=1, mode="training")
    row = predict.predict("persistent[grid]", big, "float32")
    assert row["note"] and row["predicted_ms"] == pytest.approx(time("triton", big))


def test_constants_mirror_the_code() -> None:
    pytest.importorskip("triton")
    from mogrifier_fast.backends import persistent as backend
    from mogrifier_fast.kernels import mogrify

    assert predict.PERSISTENT_MAX_WEIGHT_BYTES == backend.MAX_WEIGHT_BYTES
    assert predict.BLOCK_ROWS == mogrify.BLOCK_B
    assert predict.ONE_LAUNCH_MAX_WIDTH == mogrify.ONE_LAUNCH_MAX_WIDTH
    fp32 = predict.SMS * 128 * 2 * predict.BOOST_CLOCK_HZ  # 128 FP32 lanes per SM, FMA = 2
    assert math.isclose(predict.FP32_FLOPS, fp32, rel_tol=0.01)


def test_cli_prints_and_writes_the_csv(tmp_path, capsys, monkeypatch) -> None:
    monkeypatch.chdir(tmp_path)
    bench.main(["--predict", "--preset", "seed"])  # no --out: printed only
    assert list(tmp_path.iterdir()) == []
    printed = capsys.readouterr().out
    assert "| T=500 N=32 I=50 H=125 r=5 shared full L=1 | training | bfloat16 | cudnn |" in printed
    assert "persistent plan predicted faster (training, float32)" in printed
    bench.main(["--predict", "--preset", "gpu", "--dtype", "float32,bfloat16",
                "--candidates", "nn.LSTM,persistent", "--out", str(tmp_path / "out")])  # fmt: skip
    written = pd.read_csv(tmp_path / "out" / predict.CSV_NAME)
    assert list(written.columns) == predict.COLUMNS
    assert len(written) == 3 * 2 * 2 * 3  # sizes x modes x dtypes x (nn.LSTM, two plans)
    assert set(written["candidate"]) == {"nn.LSTM", "persistent[rows]", "persistent[grid]"}
    assert set(written["dtype"]) == {"float32", "bfloat16"}


@pytest.mark.parametrize(
    ("flags", "message"),
    [
        (["--dtype", "float64"], "dtype 'float64' has no prediction"),
        (["--mode", "generation"], "mode 'generation' is not modelled"),
        (["--candidates", "fused"], "no model for candidate 'fused'"),
        (["--steps", "0"], "steps"),
        (["--preset", "nope"], "unknown preset 'nope'"),
    ],
)
def test_bad_arguments_are_refused_clearly(flags, message, capsys) -> None:
    with pytest.raises(SystemExit) as exit_info:
        bench.main(["--predict", "--preset", "seed", *flags] if "--preset" not in flags
                   else ["--predict", *flags])  # fmt: skip
    assert exit_info.value.code == 2
    assert message in capsys.readouterr().err


def test_predicted_vs_measured_pairs_rows() -> None:
    config = dict(steps=70, batch=64, input_size=512, hidden_size=512, rounds=5, rank="",
                  layers=1, share_rounds=False, dtype="float32", mode="training")  # fmt: skip
    measured = pd.DataFrame(
        [{"candidate": name, **config, "median_ms": 2.0, "device_name": "NVIDIA H200"}
         for name in ("nn.LSTM", "persistent", "fused", "LSTMCell loop")]
        + [{"candidate": "triton", **config, "dtype": "float64", "median_ms": 9.0}]
    )  # fmt: skip
    compared = predict.predicted_vs_measured(measured)
    assert list(compared["candidate"]) == ["nn.LSTM", "persistent"]  # the rest has no model
    assert compared["model"].iloc[1] == "persistent[grid]"
    assert (compared["measured_over_predicted"] == 2.0 / compared["predicted_ms"]).all()
