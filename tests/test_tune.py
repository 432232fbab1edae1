"""benchmarks/tune.py: the LSTM and Mogrifier studies on a tiny corpus, resumed after a kill;
the trials CSV; the finals and their summary; parameter matching; loss parsing; bad arguments.

The studies run one trial of 10 steps (an evaluation every 2) per model (the LSTM's killed and
retried); every trial is one ``mogrifier-train`` process, so most of the time is process start-up.
"""

from __future__ import annotations

import csv
import importlib.util
import math
import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from tests.test_lm import corpus_dir  # noqa: F401  (the tiny word corpus fixture)

optuna = pytest.importorskip("optuna", reason="optuna is not installed (pip install -e .[dev])")
stats = pytest.importorskip("scipy.stats", reason="scipy is not installed (pip install -e .[dev])")

ROOT = Path(__file__).resolve().parents[1]
SCRIPT = ROOT / "benchmarks" / "tune.py"
_spec = importlib.util.spec_from_file_location("tune", SCRIPT)
tune = importlib.util.module_from_spec(_spec)
sys.modules["tune"] = tune  # (dataclasses look their module up)
_spec.loader.exec_module(tune)
# emb 64: the largest rank searched is 64, and a rank is at most the layer's input size
SIZES = ["--trial-steps", "10", "--eval-every", "2", "--eval-tokens", "200", "--emb", "64", "--target-hidden", "64"]  # fmt: skip


def tune_main(capsys, *argv: str) -> str:
    capsys.readouterr()
    tune.main(list(argv))
    return capsys.readouterr().out


def children(pid: int) -> dict[int, bytes]:
    """The live child processes of ``pid``: their command lines."""
    found = {}
    for stat in Path("/proc").glob("[0-9]*/stat"):
        try:
            fields = stat.read_text().rsplit(")", 1)[1].split()
            if int(fields[1]) == pid and fields[0] != "Z":
                found[int(stat.parent.name)] = (stat.parent / "cmdline").read_bytes()
        except (OSError, IndexError, ValueError):
            continue
    return found


def alive(pid: int) -> bool:
    try:
        return Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0] != "Z"
    except (OSError, IndexError):
        return False


def test_matched_hidden_is_the_closest_by_exhaustive_search() -> None:
    for rounds, rank, layers in ((0, None, 2), (5, 16, 2), (6, 8, 1)):
        counts = {h: tune.parameters(16, 32, h, rounds, rank, layers) for h in range(max(8, rank or 1), 96)}  # fmt: skip
        for target in (counts[20] + 5, counts[32], counts[31] - 1, counts[33] + 1, counts[60] - 7):
            best = min(counts, key=lambda h, target=target: abs(counts[h] - target))
            assert tune.matched_hidden(16, 32, target, rounds, rank, layers) == best


def test_sizes_match_the_lstm_count() -> None:
    protocol = tune.Protocol("ptb", 128, 139, 1250, 250, 40_000)
    hidden, count, target = tune.sizes(protocol, 10_000, "lstm", {})
    assert (hidden, count, target) == (139, 1_613_036, 1_613_036)
    hidden, count, target = tune.sizes(protocol, 10_000, "mogrifier", {"rounds": 5, "rank": 32})
    assert hidden == 118 and abs(count - target) / target < 0.001


def test_loss_line() -> None:
    static = "test: loss 4.6052 nats per token, perplexity 100.000, 82,430 tokens\n"
    assert tune.loss_line(static)[0] == 4.6052
    dynamic = (  # as mogrifier-eval --split test --dynamic --dynamic-tune prints it
        "chosen on the first 30,000 validation tokens: --dynamic-lr 1e-05 --dynamic-decay 0.003 "
        "(validation loss 4.9123)\n"
        "test: loss 4.2500 nats per token, perplexity 70.105, 82,430 tokens (dynamic evaluation, "
        "lr 1e-05, decay 0.003, segment 5)\n"
    )
    loss, line = tune.loss_line(dynamic)
    assert loss == 4.25 and tune.setting(line) == "dynamic evaluation, lr 1e-05, decay 0.003, segment 5"  # fmt: skip
    flags = tune.dynamic_flags(tune.setting(line))
    assert flags == ["--dynamic", "--dynamic-lr", "1e-05", "--dynamic-decay", "0.003"]
    assert tune.loss_line("valid: loss 4.9 nats per token\ntest: loss 4.25e+00 nats per token")[0] == 4.25  # fmt: skip
    assert tune.loss_line("dynamic evaluation: loss 3.5 nats per token")[0] == 3.5
    with pytest.raises(tune.TuneError, match="nats per token"):
        tune.loss_line("test: perplexity 100.0")[0]


@pytest.mark.parametrize(
    ("argv", "message"),
    [
        (["study", "--model", "gru"], "argument --model: invalid choice: 'gru'"),
        (["study", "--model", "lstm", "--trials", "0"], "argument --trials: expected an integer >= 1, got '0'"),
        (["finals", "--seeds", "0,x"], "argument --seeds: expected distinct comma-separated integers >= 0, got '0,x'"),
        (["study", "--model", "lstm", "--trial-steps", "5", "--eval-every", "2"], "--trial-steps: expected a multiple of --eval-every (2), got 5"),
        (["study", "--model", "mogrifier", "--emb", "32"], "--emb: expected >= 64 (the largest Mogrifier rank searched), got 32"),
        (["summary", "--finals", "/nonexistent/finals.csv"], "--finals: /nonexistent/finals.csv does not exist"),
        (["finals", "--trials", "/nonexistent/trials.csv"], "--trials: /nonexistent/trials.csv does not exist"),
    ],
)  # fmt: skip
def test_bad_arguments_name_the_argument_and_the_value(argv, message, tmp_path, capsys) -> None:
    with pytest.raises(SystemExit) as stop:
        tune.main([*argv, "--runs", str(tmp_path)])
    assert stop.value.code in (1, 2)
    assert message in capsys.readouterr().err


def test_later_seeds_reuse_the_dynamic_setting_chosen_for_the_first() -> None:
    assert tune.dynamic_flags(None) == ["--dynamic", "--dynamic-tune"]
    chosen = "dynamic evaluation, lr 3e-05, decay 0.001, segment 5"
    assert tune.dynamic_flags(chosen) == ["--dynamic", "--dynamic-lr", "3e-05", "--dynamic-decay", "0.001"]  # fmt: skip
    with pytest.raises(tune.TuneError, match="no 'lr X, decay Y'"):
        tune.dynamic_flags("static evaluation")


def test_evaluate_final_tunes_dynamic_evaluation_once_and_caches(tmp_path, monkeypatch) -> None:
    """mogrifier-eval's flags per seed, and the cache (mogrifier-eval itself: test_dynamic)."""
    calls = []

    def fake_eval(target, argv, log, watch=None):
        calls.append(argv[3:-1])
        how = "static evaluation"
        if "--dynamic" in argv:
            lr = argv[argv.index("--dynamic-lr") + 1] if "--dynamic-lr" in argv else "3e-05"
            decay = (
                argv[argv.index("--dynamic-decay") + 1] if "--dynamic-decay" in argv else "0.001"
            )
            how = f"dynamic evaluation, lr {lr}, decay {decay}, segment 5"
        return 0, f"test: loss {4 + len(calls)} nats per token, perplexity 1.0, 9 tokens ({how})\n"

    monkeypatch.setattr(tune, "run_child", fake_eval)
    runs = []
    for seed in (0, 1):
        out = tmp_path / f"lstm-seed{seed}"
        out.mkdir()
        (out / "metrics.csv").write_text(
            "step,split,loss,elapsed_s\n2,valid,5.0,1.0\n4,valid,4.9,2.0\n"
        )
        runs.append(out)
    first = tune.evaluate_final(runs[0], tune.dynamic_flags(None))
    chosen = tune.setting(first["dynamic"]["line"])
    later = tune.evaluate_final(runs[1], tune.dynamic_flags(chosen))
    assert calls == [[], ["--dynamic", "--dynamic-tune"], [], ["--dynamic", "--dynamic-lr", "3e-05", "--dynamic-decay", "0.001"]]  # fmt: skip
    assert (first["static"]["loss"], first["dynamic"]["loss"], later["dynamic"]["loss"]) == (
        5,
        6,
        8,
    )
    assert tune.setting(later["dynamic"]["line"]) == "dynamic evaluation, lr 3e-05, decay 0.001, segment 5"  # fmt: skip
    assert tune.evaluate_final(runs[1], tune.dynamic_flags(chosen)) == later
    assert len(calls) == 4  # cached: nothing evaluated again
    with open(runs[1] / "metrics.csv", "a") as file:  # the run trained on: evaluated again
        file.write("6,valid,4.8,3.0\n")
    tune.evaluate_final(runs[1], None)
    assert calls[4:] == [[]]


def test_importances_cover_every_searched_parameter() -> None:
    for model, searched in (("lstm", list(tune.FLOATS)), ("mogrifier", tune.PARAMS)):
        # seeded, and 16 trials: with 8 unseeded ones fANOVA ranked another parameter first
        # for about 1 Mogrifier study in 7 (16 trials: first in 20 of 20 seeds tried)
        study = optuna.create_study(sampler=optuna.samplers.RandomSampler(seed=0))
        assert tune.importances(study, model) == []  # fewer than 2 completed trials: none
        study.optimize(lambda t, model=model: math.log(tune.sample(t, model)["lr"]), n_trials=16)
        found = {r["parameter"]: r["importance"] for r in tune.importances(study, model)}
        assert sorted(found) == sorted(searched) and math.isclose(sum(found.values()), 1, rel_tol=1e-3)  # fmt: skip
        assert max(found, key=found.get) == "lr"  # the only parameter the objective reads


def test_summary_welch(capsys) -> None:
    rows = [
        {
            "model": model,
            "static_test_perplexity": str(p),
            "dynamic_test_perplexity": "",
            "train_wall_s": "1800",
            "eval_wall_s": "360",
        }
        for model, values in (("lstm", (100.0, 101.0, 102.0)), ("mogrifier", (95.0, 96.5, 97.0)))
        for p in values
    ]
    tune.summarize(rows)
    out = capsys.readouterr().out
    assert "static test perplexity, lstm: 101.00 +- 1.00 (3 seeds)" in out
    welch = stats.ttest_ind([95.0, 96.5, 97.0], [100.0, 101.0, 102.0], equal_var=False)
    assert f"mogrifier - lstm = -4.83 perplexity; Welch's t = {welch.statistic:.2f}, p = {welch.pvalue:.3g}" in out  # fmt: skip
    assert "dynamic: no results" in out
    assert "mogrifier: 3 final runs, training 1.50 h, test evaluation 0.30 h" in out


def test_pruned_diverged_and_interrupted_trials(corpus_dir, tmp_path, capsys, monkeypatch) -> None:  # noqa: F811
    """With mogrifier-train replaced by a writer of given validation curves: the median pruner
    stops a trailing trial (its watcher raises, which stops the process), a non-finite loss
    prunes a trial as diverged, SIGTERM stops the study (the trial marked failed) and a rerun
    retries that trial; a second tuner on a locked study is refused."""
    curves = iter([[5, 4, 3, 2, 1], [9, 9, 9, 9, 9], "diverge", "sigterm", [4, 3, 2, 1, 1]])
    stopped_at = []

    def fake_run_child(target, argv, log, watch=None):
        out = Path(argv[argv.index("--out") + 1])
        curve = next(curves)
        if curve == "diverge":
            return 1, "mogrifier-train: error: non-finite training loss at step 3; stopped"
        if curve == "sigterm":
            os.kill(os.getpid(), signal.SIGTERM)  # tune.main's handler: KeyboardInterrupt
        out.mkdir(parents=True, exist_ok=True)
        (out / "metrics.csv").write_text("step,split,loss,elapsed_s\n")
        for i, loss in enumerate(curve, 1):
            with open(out / "metrics.csv", "a") as file:
                file.write(f"{2 * i},valid,{loss},{i}\n")
            try:
                watch()
            except optuna.TrialPruned:
                stopped_at.append(2 * i)
                raise
        return 0, ""

    monkeypatch.setattr(tune, "run_child", fake_run_child)
    monkeypatch.setattr(tune, "PRUNER_STARTUP", 1)  # prune from the second trial on
    runs = tmp_path / "runs"
    common = ["study", "--model", "lstm", "--runs", str(runs), "--data", str(corpus_dir), *SIZES]
    out = tune_main(capsys, *common, "--trials", "3")
    assert "lstm trial 0: complete" in out
    # trial 1's best (9) trails the completed trials' median (trial 0's 3) at step 6, the first
    # step past the warm-up
    assert stopped_at == [6] and "lstm trial 1: pruned at step 6" in out
    assert "lstm trial 2: diverged (non-finite loss); pruned" in out

    with pytest.raises(SystemExit) as exit_info:
        tune.main([*common, "--trials", "4"])
    assert exit_info.value.code == 130
    assert "interrupted; run the same command again" in capsys.readouterr().err
    out = tune_main(capsys, *common, "--trials", "4")
    assert "trial 3 failed (interrupted or crashed); retrying it" in out
    assert "lstm trial 4 (run lstm-003): complete" in out

    protocol = tune.Protocol(str(corpus_dir), 64, 64, 10, 2, 200)
    study, _ = tune.open_study(protocol, "lstm", runs, create=False)
    rows = tune.trial_rows(study, "lstm", runs)
    assert [(r["state"], r["diverged"], r["steps"]) for r in rows] == [
        ("complete", False, 10), ("pruned", False, 6), ("pruned", True, 0),
        ("failed", False, ""), ("complete", False, 10),
    ]  # fmt: skip
    assert (rows[3]["retried_as"], rows[4]["retry_of"]) == (4, 3)
    lock = runs / f"{protocol.study_name('lstm')}.lock"
    with tune.locked(lock), pytest.raises(SystemExit) as exit_info:
        tune.main([*common, "--trials", "5"])
    assert exit_info.value.code == 1
    assert "another process is running this" in capsys.readouterr().err


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="reads /proc")
def test_studies_resume_after_a_kill_then_trials_and_finals(corpus_dir, tmp_path, capsys) -> None:  # noqa: F811
    runs = tmp_path / "runs"
    common = ["--runs", str(runs), "--data", str(corpus_dir), *SIZES]
    # The LSTM study, killed (SIGKILL, the tuner alone) once trial 0 has evaluated at step 2.
    log = tmp_path / "killed.log"
    with open(log, "w") as file:
        tuner = subprocess.Popen(
            [sys.executable, str(SCRIPT), "study", "--model", "lstm", "--trials", "1", *common],
            stdout=file,
            stderr=subprocess.STDOUT,
        )
    run = runs / "trials" / "lstm-000"
    deadline = time.monotonic() + 120
    while not tune.valid_rows(run):
        assert tuner.poll() is None and time.monotonic() < deadline, log.read_text()
        time.sleep(0.01)
    training = next(iter(children(tuner.pid)))
    killed_at = (run / "train.log").stat().st_size
    os.kill(tuner.pid, signal.SIGKILL)
    tuner.wait()
    deadline = time.monotonic() + 20
    while alive(training):  # the training child dies with the tuner (no orphan in the run)
        assert time.monotonic() < deadline, "the training process outlived the killed tuner"
        time.sleep(0.05)
    stopped_at = [row.step for row in tune.valid_rows(run)]
    assert 2 <= stopped_at[-1] < 10, stopped_at
    protocol = tune.Protocol(str(corpus_dir), 64, 64, 10, 2, 200)
    study, _ = tune.open_study(protocol, "lstm", runs, create=False)
    assert [t.state.name for t in study.trials] == ["RUNNING"]

    # Rerun: trial 0 is retried with its parameters and continues its run from a checkpoint.
    out = tune_main(capsys, "study", "--model", "lstm", "--trials", "1", *common)
    assert "trial 0 was left running by a stopped process; retrying it" in out
    assert "lstm trial 1 (run lstm-000) evaluation 1/5 (step 2" in out
    assert "lstm trial 1 (run lstm-000): complete" in out
    resumed = (run / "train.log").read_text()[killed_at:]
    assert "resuming from checkpoint-" in resumed
    assert [row.step for row in tune.valid_rows(run)] == [2, 4, 6, 8, 10]
    study, _ = tune.open_study(protocol, "lstm", runs, create=False)
    states = [t.state.name for t in study.trials]
    assert states == ["FAIL", "COMPLETE"]
    assert study.trials[1].params == study.trials[0].params
    out = tune_main(capsys, "study", "--model", "lstm", "--trials", "1", *common)
    assert "1 of 1 trials finished" in out and "evaluation" not in out  # nothing left to do
    with pytest.raises(SystemExit):  # a study continues only under its own protocol
        tune.main(["study", "--model", "lstm", *common, "--trial-steps", "12"])
    assert "was run with other settings: trial_steps 10 (now 12)" in capsys.readouterr().err

    tune_main(capsys, "study", "--model", "mogrifier", "--trials", "1", *common)

    # The trials CSV: a row per trial, equal counts and budgets.
    trials_csv = tmp_path / "trials.csv"
    importances_csv = tmp_path / "importances.csv"
    out = tune_main(capsys, "trials", "--out", str(trials_csv), "--importances", str(importances_csv), *common)  # fmt: skip
    assert not importances_csv.exists()  # none from 1 completed trial (test_importances)
    with open(trials_csv, newline="") as file:
        rows = list(csv.DictReader(file))
    assert [(r["model"], r["trial"], r["state"]) for r in rows] == [
        ("lstm", "0", "failed"), ("lstm", "1", "complete"), ("mogrifier", "0", "complete"),
    ]  # fmt: skip
    assert rows[0]["retried_as"] == "1" and rows[1]["retry_of"] == "0" and rows[0]["tokens"] == ""
    assert rows[0]["trial_s"] == "" and all(float(r["trial_s"]) > 0 for r in rows[1:])
    finished = [r for r in rows if r["state"] == "complete"]
    assert {r["steps"] for r in finished} == {"10"}
    assert {r["tokens"] for r in finished} == {str(10 * 32 * 70)}
    for row in finished:
        assert all(row[name] != "" for name in tune.FLOATS)
        assert (row["rounds"] != "") == (row["model"] == "mogrifier")
        assert int(row["parameters"]) > 0 and int(row["target_parameters"]) == 67_600
        assert math.isclose(float(row["best_valid_perplexity"]), math.exp(float(row["best_valid_loss"])), rel_tol=1e-4)  # fmt: skip
    assert "lstm: 1 finished trials" in out and "mogrifier: 1 finished trials" in out
    assert "the tuner's time on its finished trials 0.0" in out
    assert "tokens lstm / mogrifier: 1.000 (within 10%)" in out and "WARNING" not in out

    # The finals, one seed, then again: everything is cached.
    finals, curves = tmp_path / "finals.csv", tmp_path / "curves.csv"
    # (dynamic evaluation: its own tests; the finals' use of it: test_evaluate_final_* and
    # test_finals_resume_from_the_csvs)
    argv = ["finals", "--seeds", "0", "--final-steps", "4", "--no-dynamic", "--trials", str(trials_csv), "--out", str(finals), "--curves", str(curves), *common]  # fmt: skip
    out = tune_main(capsys, *argv, "--model", "lstm")  # one model: its run recorded at once
    assert "lstm-seed0: training steps 0-4" in out and "mogrifier-seed0" not in out
    with open(finals, newline="") as file:
        assert [(r["model"], r["seed"]) for r in csv.DictReader(file)] == [("lstm", "0")]
    out = tune_main(capsys, *argv)
    assert "lstm-seed0: trained (4 steps)" in out and "mogrifier-seed0: training steps 0-4" in out
    with open(finals, newline="") as file:
        rows = list(csv.DictReader(file))
    assert [(r["model"], r["seed"], r["steps"]) for r in rows] == [("lstm", "0", "4"), ("mogrifier", "0", "4")]  # fmt: skip
    for row, trial in zip(rows, finished, strict=True):
        assert row["trial"] == trial["trial"] and row["hidden"] == trial["hidden"]
        assert all(row[name] == trial[name] for name in tune.PARAMS)
        assert math.isclose(float(row["static_test_perplexity"]), math.exp(float(row["static_test_loss"])), rel_tol=1e-4)  # fmt: skip
        assert row["dynamic_test_loss"] == row["dynamic_setting"] == ""
    with open(curves, newline="") as file:
        assert [(r["model"], r["step"]) for r in csv.DictReader(file)] == [
            ("lstm", "2"), ("lstm", "4"), ("mogrifier", "2"), ("mogrifier", "4"),
        ]  # fmt: skip
    out = tune_main(capsys, *argv)
    assert out.count("trained (4 steps)") == 2 and out.count("(cached)") == 2
    assert "Welch's t-test needs at least 2 seeds per model" in out
    # A run directory gone (a new checkout): the recorded run is kept, not trained again.
    recorded = finals.read_text()
    shutil.rmtree(runs / "finals" / "lstm-seed0")
    out = tune_main(capsys, *argv)
    assert "lstm-seed0: recorded in finals.csv (no run directory; kept)" in out
    assert "training steps" not in out and finals.read_text() == recorded
    # The finals refuse a trials CSV tuned under other settings.
    with pytest.raises(SystemExit):
        tune.main([*argv, "--emb", "32"])
    assert "was tuned under other settings (hidden 64, " in capsys.readouterr().err


def test_finals_resume_from_the_csvs(corpus_dir, tmp_path, capsys, monkeypatch) -> None:  # noqa: F811
    """With training and testing faked: each run is recorded as it finishes; a later call
    (run directories gone) keeps the recorded seeds and gives a new seed the dynamic setting the
    first seed chose."""
    protocol = tune.Protocol(str(corpus_dir), 64, 64, 10, 2, 200)
    vocab = len(tune.load_corpus(str(corpus_dir)).vocab)
    params = {name: 0.1 for name in tune.FLOATS} | {"rounds": 5, "rank": 16}
    hidden, count, target = tune.sizes(protocol, vocab, "mogrifier", params)
    trials_csv = tmp_path / "trials.csv"
    trial = {"model": "mogrifier", "trial": 3, "state": "complete", "best_valid_loss": 5.0, "best_valid_perplexity": 148.4}  # fmt: skip
    worse = trial | {"trial": 4, "best_valid_loss": 5.5, "lr": 1.0}
    sized = {"steps": 10, "tokens": 10 * 32 * 70, "hidden": hidden, "parameters": count, "target_parameters": target}  # fmt: skip
    tune.write_csv(trials_csv, [trial | params | sized, worse | sized])
    evaluated = []

    def fake_train(out, config, model, steps):
        assert config["lr"] == 0.1 and config["seed"] == int(out.name[-1])
        return [tune.Evaluation(2, 5.0, 1.0), tune.Evaluation(steps, 4.5, 2.0)]

    def fake_evaluate(out, flags):
        evaluated.append((out.name, flags))
        line = "test: loss 4.2 nats per token (dynamic evaluation, lr 1e-05, decay 0.003, segment 5)"  # fmt: skip
        return {"static": {"loss": 4.4, "wall_s": 1.0}, "dynamic": {"loss": 4.2, "line": line, "wall_s": 2.0}}  # fmt: skip

    monkeypatch.setattr(tune, "train_final", fake_train)
    monkeypatch.setattr(tune, "evaluate_final", fake_evaluate)
    finals, curves = tmp_path / "finals.csv", tmp_path / "curves.csv"
    argv = ["finals", "--model", "mogrifier", "--data", str(corpus_dir), *SIZES, "--final-steps", "4", "--runs", str(tmp_path / "runs"), "--trials", str(trials_csv), "--out", str(finals), "--curves", str(curves)]  # fmt: skip
    out = tune_main(capsys, *argv, "--seeds", "0,1")
    assert "the best completed trial is 3" in out
    chosen = ["--dynamic", "--dynamic-lr", "1e-05", "--dynamic-decay", "0.003"]
    assert evaluated == [("mogrifier-seed0", ["--dynamic", "--dynamic-tune"]), ("mogrifier-seed1", chosen)]  # fmt: skip
    rows = tune.read_csv(finals)
    assert [(r["seed"], r["trial"], r["dynamic_test_loss"]) for r in rows] == [("0", "3", "4.2"), ("1", "3", "4.2")]  # fmt: skip
    assert rows[0]["dynamic_setting"] == "dynamic evaluation, lr 1e-05, decay 0.003, segment 5"
    assert [(r["seed"], r["step"]) for r in tune.read_csv(curves)] == [("0", "2"), ("0", "4"), ("1", "2"), ("1", "4")]  # fmt: skip
    out = tune_main(capsys, *argv, "--seeds", "0,1,2")
    assert out.count("(no run directory; kept)") == 2
    assert evaluated[2:] == [("mogrifier-seed2", chosen)]
    assert [r["seed"] for r in tune.read_csv(finals)] == ["0", "1", "2"]
    assert "dynamic test perplexity, mogrifier: 66.69 +- 0.00 (3 seeds)" in out
    # Another budget is not the recorded result: trained again.
    out = tune_main(capsys, *argv, "--seeds", "0", "--final-steps", "6")
    assert "kept" not in out and evaluated[3:] == [("mogrifier-seed0", ["--dynamic", "--dynamic-tune"])]  # fmt: skip
    assert [(r["seed"], r["steps"]) for r in tune.read_csv(finals)] == [("0", "6"), ("1", "4"), ("2", "4")]  # fmt: skip
    assert [(r["seed"], r["step"]) for r in tune.read_csv(curves)][:2] == [("0", "2"), ("0", "6")]
