"""LSTM vs Mogrifier on PTB (word level) with equal tuning effort: one Optuna study per model,
then the best setting of each trained at the final budget on several seeds.

    python benchmarks/tune.py study --model lstm              # 16 trials (resumes if interrupted)
    python benchmarks/tune.py study --model mogrifier
    python benchmarks/tune.py trials                          # tune-trials.csv, tune-importances.csv
    python benchmarks/tune.py finals --seeds 0,1,2            # tune-finals.csv, tune-final-curves.csv
    (or `finals --model lstm` and `finals --model mogrifier` side by side)
    python benchmarks/tune.py summary                         # mean +- std, Welch's t-test

Both studies get the same search space (the Mogrifier's rounds and rank on top), the same number
of finished trials (complete + pruned), the same per-trial step budget, the same pruner and the
same fixed protocol (the constants below). The plain LSTM has a fixed hidden size; each sampled
Mogrifier gets the hidden size whose parameter count is closest to that LSTM's.

Each trial is one ``mogrifier-train`` process; after each of its evaluations the trial reports
its best validation loss so far to the median pruner, which may stop it. Resume: the studies live
in ``RUNS/tune.db`` (SQLite, Optuna's RDBStorage with heartbeats); a trial left running (or
failed) by a stopped process is retried with the same parameters
(``RetryHeartbeatStaleTrialCallback``) and continues its run directory from the latest
checkpoint (one per evaluation), so rerunning the same command loses at most one evaluation's
training.
The finals and their evaluations are cached in their run directories in the same way. The
finals take each model's best completed trial from the trials CSV (no study database needed) and
add each run to the finals CSVs as soon as it is tested: the CSVs are the record, a run directory
only a cache, so a recorded run whose directory is gone is kept, not trained again.
"""

from __future__ import annotations

import argparse
import contextlib
import csv
import json
import math
import os
import re
import signal
import statistics
import subprocess
import sys
import time
import warnings
from collections.abc import Callable, Iterator
from dataclasses import asdict, dataclass
from pathlib import Path

import optuna
from optuna.storages import RDBStorage, RetryHeartbeatStaleTrialCallback
from optuna.trial import FrozenTrial, Trial, TrialState

HERE = Path(__file__).resolve().parent
if str(HERE) not in sys.path:  # replicate.py beside this file, also when imported from elsewhere
    sys.path.insert(0, str(HERE))
from replicate import matched_hidden, parameters  # noqa: E402

from mogrifier_fast.lm.data import CorpusError, load_corpus  # noqa: E402

ROOT = HERE.parent
RESULTS = ROOT / "benchmarks" / "results"

# ----------------------------------------------------------------------------- the protocol
# Fixed for every trial and final run of both models; only the search space below varies.
DATA = "ptb"  # Mikolov's PTB, word level, 10k vocabulary
EMB = 128  # embedding size (tied input and output embeddings; a hidden -> emb projection)
LAYERS = 2
# The plain LSTM's hidden size, fixed: 1,613,036 parameters on PTB, the size of the README's
# replication (1.61M; the 10k x 128 embedding is 1.28M of it). It is every trial's target count.
TARGET_HIDDEN = 139
BPTT = 70
BATCH = 32  # one update: 32 x 70 = 2,240 tokens
BETA1 = 0.0  # Adam's beta1 (the paper's setting; mogrifier-train's default)
CLIP = 1.0  # gradient-norm clipping
LR_DECAY = 0.5  # the learning rate is halved after each evaluation without improvement...
PATIENCE = 0  # ...and no run stops early: the step budget ends it
TRIAL_SEED = 0  # the training seed of every trial (the finals use --seeds)
TRIAL_STEPS = 1250  # per trial: 2.8M tokens, 5 evaluations
EVAL_EVERY = 250  # steps between evaluations (trials and finals)
EVAL_TOKENS = 40_000  # validation during training: the first 40k tokens of the split
FINAL_STEPS = 5000  # the finals: 11.2M tokens, the replication's budget
TRIALS = 16  # finished trials (complete + pruned) per study
# The search.
SAMPLER_SEED = 0  # the TPE sampler of trial n (n finished before it) is seeded SAMPLER_SEED + n
TPE_STARTUP = 6  # trials sampled at random before TPE models the results
PRUNER_STARTUP = 4  # completed trials before the median pruner may prune
PRUNER_WARMUP = 2  # evaluations of a trial that are never pruned (nor is its last)
MAX_RETRY = 3  # retries of a trial whose process stopped (killed, interrupted, crashed)
HEARTBEAT_S = 60  # Optuna's heartbeat: a running trial silent for GRACE_S is stale
GRACE_S = 180

# The search space, the same ranges for both models: name -> (low, high, log scale).
FLOATS = {
    "dropout_input": (0.0, 0.7, False),  # on the embeddings
    "dropout_output": (0.0, 0.7, False),  # before the decoder
    "dropout_layer": (0.0, 0.6, False),  # between the two layers
    "dropout_state": (0.0, 0.6, False),  # on the recurrent state h
    "weight_drop": (0.0, 0.6, False),  # DropConnect on the hidden-to-hidden weights
    "lr": (5e-4, 5e-3, True),
    "l2": (1e-7, 1e-4, True),  # Adam weight decay; log-uniform, no 0 option
}
# The Mogrifier's own: rounds and the rank of its low-rank maps (as the paper uses for PTB).
CHOICES = {"rounds": (4, 5, 6), "rank": (16, 32, 64)}
PARAMS = [*FLOATS, *CHOICES]
MODELS = ("lstm", "mogrifier")

# A child process (training or evaluation) that dies with this one, so a killed tuner leaves no
# training going on in a run directory that its rerun will resume (Linux: PR_SET_PDEATHSIG).
CHILD = """import ctypes, importlib, os, signal, sys
parent, target, *argv = sys.argv[1:]
if sys.platform.startswith("linux"):
    try:
        ctypes.CDLL(None).prctl(1, signal.SIGKILL)
    except (OSError, AttributeError):
        pass
    if os.getppid() != int(parent):
        sys.exit(1)
module, function = target.split(":")
getattr(importlib.import_module(module), function)(argv)
"""
LOSS = re.compile(
    r"\bloss\s+(?P<loss>[-+]?(?:\d+\.?\d*|\.\d+)(?:[eE][-+]?\d+)?|nan|inf)\s+nats per token",
    re.IGNORECASE,
)


class TuneError(RuntimeError):
    """A stop with a one-line reason."""


def say(message: str) -> None:
    print(message, flush=True)


@dataclass(frozen=True)
class Protocol:
    """What a study fixes (stored with it: a study is only continued under the same)."""

    data: str
    emb: int
    target_hidden: int
    trial_steps: int
    eval_every: int
    eval_tokens: int
    layers: int = LAYERS
    bptt: int = BPTT
    batch: int = BATCH

    @property
    def label(self) -> str:
        return Path(self.data).name

    def study_name(self, model: str) -> str:
        return f"{self.label}-{model}"


# ----------------------------------------------------------------------------- sizes, runs


def sizes(protocol: Protocol, vocab: int, model: str, params: dict) -> tuple[int, int, int]:
    """(hidden size, parameter count, target count): the LSTM at the fixed hidden size, the
    Mogrifier at the hidden size that matches the LSTM's count best for its rounds and rank."""
    target = parameters(vocab, protocol.emb, protocol.target_hidden, 0, None, protocol.layers)
    if model == "lstm":
        return protocol.target_hidden, target, target
    rounds, rank = params["rounds"], params["rank"]
    hidden = matched_hidden(vocab, protocol.emb, target, rounds, rank, protocol.layers)
    return hidden, parameters(vocab, protocol.emb, hidden, rounds, rank, protocol.layers), target


def run_config(
    protocol: Protocol, model: str, hidden: int, params: dict, seed: int, eval_every: int
) -> dict:
    """The config.json entries a run of these settings has (checked before resuming one)."""
    config = {
        "data": protocol.data,
        "emb": protocol.emb,
        "hidden": hidden,
        "layers": protocol.layers,
        "rounds": params["rounds"] if model == "mogrifier" else 0,
        "rank": params["rank"] if model == "mogrifier" else None,
        "tie": True,
        "bptt": protocol.bptt,
        "batch_size": protocol.batch,
        "beta1": BETA1,
        "clip": CLIP,
        "lr_decay": LR_DECAY,
        "patience": PATIENCE,
        "eval_every": eval_every,
        "max_eval_tokens": protocol.eval_tokens,
        "seed": seed,
    }
    return config | {name: params[name] for name in FLOATS}


def train_arguments(config: dict, model: str, out: Path, steps: int, resume: bool) -> list[str]:
    """``mogrifier-train`` arguments for a run of ``config`` (a run_config) up to ``steps``."""
    args = ["--data", config["data"], "--model", model, "--emb", str(config["emb"]),
            "--hidden", str(config["hidden"]), "--layers", str(config["layers"]),
            "--bptt", str(config["bptt"]), "--batch-size", str(config["batch_size"]),
            "--beta1", repr(config["beta1"]), "--clip", repr(config["clip"]),
            "--lr-decay", repr(config["lr_decay"]), "--patience", str(config["patience"]),
            "--eval-every", str(config["eval_every"]), "--max-eval-tokens", str(config["max_eval_tokens"]),
            "--seed", str(config["seed"]), "--epochs", "1000", "--no-progress",
            "--out", str(out), "--max-steps", str(steps), "--no-test"]  # fmt: skip
    # (--epochs 1000: the step budget, not the epoch count, ends every run; --no-test: the
    # finals' test evaluations are mogrifier-eval's, trials have none)
    for name in FLOATS:
        args += [f"--{name.replace('_', '-')}", repr(config[name])]
    if model == "mogrifier":
        args += ["--rounds", str(config["rounds"]), "--rank", str(config["rank"])]
    return [*args, "--resume"] if resume else args


def prepare_run(out: Path, config: dict) -> bool:
    """Whether ``out`` holds a run to resume; refuses one of other settings. A run stopped
    before its first checkpoint is started again."""
    if not any(out.glob("checkpoint-*.pt")):
        for name in ("config.json", "metrics.csv"):
            (out / name).unlink(missing_ok=True)
        return False
    saved = json.loads((out / "config.json").read_text())
    differing = [key for key, value in config.items() if saved.get(key) != value]
    if differing:
        shown = ", ".join(f"{key} {saved.get(key)!r} (wanted {config[key]!r})" for key in differing)
        raise TuneError(
            f"{out} holds a run of other settings: {shown}; remove the directory or use another --runs"
        )
    return True


@dataclass
class Evaluation:
    step: int
    loss: float
    elapsed_s: float


def valid_rows(out: Path) -> list[Evaluation]:
    """The run's validation evaluations, in step order (a row being written is skipped)."""
    path = out / "metrics.csv"
    if not path.exists():
        return []
    rows = []
    with open(path, newline="") as file:
        for row in csv.DictReader(file):
            try:
                if row["split"] == "valid":
                    rows.append(
                        Evaluation(int(row["step"]), float(row["loss"]), float(row["elapsed_s"]))
                    )
            except (KeyError, TypeError, ValueError):
                continue
    return rows


def new_evaluations(out: Path, seen: set[int], last: int) -> list[Evaluation]:
    """The run's validation evaluations up to step ``last`` whose steps are not in ``seen``
    (they are added to it): what a watcher of a running run has not reported yet."""
    fresh = [row for row in valid_rows(out) if row.step not in seen and row.step <= last]
    seen.update(row.step for row in fresh)
    return fresh


def run_child(
    target: str,
    argv: list[str],
    log: Path,
    watch: Callable[[], None] | None = None,
) -> tuple[int, str]:
    """Run ``target`` ("module:function", called with argv) in a child process that dies with
    this one; its output goes to ``log`` (appended). ``watch`` is called every few seconds
    while it runs. Returns (exit code, this call's output)."""
    log.parent.mkdir(parents=True, exist_ok=True)
    shown = "-m mogrifier_fast.lm.train" if target.endswith(":main_train") else f"-c '{target}'"
    with open(log, "a") as file:
        start = file.tell()
        file.write(f"$ python {shown} {' '.join(argv)}\n")
        file.flush()
        child = subprocess.Popen(
            [sys.executable, "-c", CHILD, str(os.getpid()), target, *argv],
            stdout=file,
            stderr=subprocess.STDOUT,
            stdin=subprocess.DEVNULL,
        )
        try:
            while True:
                try:
                    code = child.wait(timeout=5)
                    break
                except subprocess.TimeoutExpired:
                    if watch is not None:
                        watch()
        except BaseException:  # interrupted: stop the child too, then pass it on
            child.kill()
            child.wait()
            raise
    with open(log) as file:
        file.seek(start)
        output = file.read()
    return code, output


def tail(output: str, lines: int = 8) -> str:
    return "\n".join(output.strip().splitlines()[-lines:])


# ----------------------------------------------------------------------------- studies


def storage(runs: Path) -> RDBStorage:
    runs.mkdir(parents=True, exist_ok=True)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # experimental / deprecation notes of the heartbeat API
        return RDBStorage(
            f"sqlite:///{runs / 'tune.db'}",
            heartbeat_interval=HEARTBEAT_S,
            grace_period=GRACE_S,
            heartbeat_stale_trial_callback=RetryHeartbeatStaleTrialCallback(max_retry=MAX_RETRY),
        )


@contextlib.contextmanager
def locked(path: Path, wait: bool = False) -> Iterator[None]:
    """One process at a time per study (or per model's finals): another gets a clear error, or
    with ``wait`` waits its turn (a short update of a shared file)."""
    try:
        import fcntl
    except ImportError:  # not POSIX: no lock
        yield
        return
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path, "w") as file:
        try:
            fcntl.flock(file, fcntl.LOCK_EX if wait else fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            raise TuneError(f"another process is running this ({path} is locked)") from None
        yield


def check_protocol(study: optuna.Study, protocol: Protocol, keys: tuple[str, ...]) -> None:
    saved = study.user_attrs.get("protocol", {})
    differing = [key for key in keys if saved.get(key) != getattr(protocol, key)]
    if differing:
        shown = ", ".join(f"{k} {saved.get(k)!r} (now {getattr(protocol, k)!r})" for k in differing)
        raise TuneError(
            f"study {study.study_name} was run with other settings: {shown}; pass the same "
            "sizes, or another --runs"
        )


def finished(study: optuna.Study) -> list[FrozenTrial]:
    return study.get_trials(deepcopy=False, states=(TrialState.COMPLETE, TrialState.PRUNED))


def retry_stopped_trials(study: optuna.Study, store: RDBStorage, runs: Path) -> None:
    """Retry each trial a stopped process left running or failed, with its parameters and run
    directory (its user attribute ``run``), as the heartbeat would once the trial is stale: with
    the study's lock held no other process runs it, so it is stale now."""
    callback = store.get_heartbeat_stale_trial_callback()
    trials = study.get_trials(deepcopy=False)
    retried = {n for t in trials for n in t.system_attrs.get("retry_history", [])}
    for trial in trials:
        if trial.number in retried or trial.state not in (TrialState.RUNNING, TrialState.FAIL):
            continue
        how = (
            "was left running by a stopped process"
            if trial.state == TrialState.RUNNING
            else "failed (interrupted or crashed)"
        )
        if trial.state == TrialState.RUNNING:
            store.set_trial_state_values(trial._trial_id, TrialState.FAIL)
        count = len(study.get_trials(deepcopy=False))
        callback(study, store.get_trial(trial._trial_id))
        run = trial.user_attrs.get("run", "(not started)")
        if len(study.get_trials(deepcopy=False)) > count:
            say(
                f"{study.study_name}: trial {trial.number} {how}; "
                f"retrying it with the same parameters, continuing run {run}"
            )
        else:
            say(
                f"{study.study_name}: trial {trial.number} {how}; not retried "
                f"(it failed {MAX_RETRY + 1} times: see {runs / 'trials' / run / 'train.log'})"
            )


def sample(trial: Trial, model: str) -> dict:
    params = {
        name: trial.suggest_float(name, low, high, log=log)
        for name, (low, high, log) in FLOATS.items()
    }
    if model == "mogrifier":
        params |= {
            name: trial.suggest_categorical(name, list(values)) for name, values in CHOICES.items()
        }
    return params


def objective(protocol: Protocol, vocab: int, model: str, runs: Path) -> Callable[[Trial], float]:
    def run_trial(trial: Trial) -> float:
        params = sample(trial, model)
        # a retried trial inherits its original's user attributes, and so its run directory
        run = trial.user_attrs.get("run", f"{model}-{trial.number:03d}")
        hidden, count, target = sizes(protocol, vocab, model, params)
        for key, value in {
            "run": run,
            "hidden": hidden,
            "parameters": count,
            "target_parameters": target,
        }.items():
            trial.set_user_attr(key, value)
        out = runs / "trials" / run
        config = run_config(protocol, model, hidden, params, TRIAL_SEED, protocol.eval_every)
        name = f"{model} trial {trial.number}" + (
            f" (run {run})" if run != f"{model}-{trial.number:03d}" else ""
        )
        shown = ", ".join(
            f"{k} {v:.3g}" if isinstance(v, float) else f"{k} {v}" for k, v in params.items()
        )
        say(f"{name}: hidden {hidden}, {count:,} parameters (target {target:,}); {shown}")
        evaluations = protocol.trial_steps // protocol.eval_every
        reported: set[int] = set()
        best = math.inf

        def report() -> None:
            """Report the run's new evaluations to the pruner; raise TrialPruned if it says so."""
            nonlocal best
            for row in new_evaluations(out, reported, protocol.trial_steps):
                best = min(best, row.loss)
                trial.report(best, row.step)
                say(
                    f"{name} evaluation {row.step // protocol.eval_every}/{evaluations} (step "
                    f"{row.step}, {row.elapsed_s:.0f} s): valid loss {row.loss:.4f}, best {best:.4f} "
                    f"(perplexity {math.exp(best):.1f})"
                )
                if row.step < protocol.trial_steps and trial.should_prune():
                    say(f"{name}: pruned at step {row.step}")
                    raise optuna.TrialPruned(f"step {row.step}")

        report()  # a continued run's earlier evaluations (they may prune it at once)
        if protocol.trial_steps not in reported:
            resume = prepare_run(out, config)
            # one process per trial; the pruner reads each evaluation as it is written and
            # stops the process (run_child kills it when report raises)
            code, output = run_child(
                "mogrifier_fast.lm.train:main_train",
                train_arguments(config, model, out, protocol.trial_steps, resume),
                out / "train.log",
                watch=report,
            )
            if code == 1 and "non-finite" in output:
                trial.set_user_attr("diverged", True)
                say(f"{name}: diverged (non-finite loss); pruned")
                raise optuna.TrialPruned("diverged")
            if code != 0:
                raise TuneError(f"{name}: mogrifier-train exited with {code}:\n{tail(output)}")
            report()
        if protocol.trial_steps not in reported:
            raise TuneError(
                f"{name}: {out}/metrics.csv has no validation row at step {protocol.trial_steps}"
            )
        say(f"{name}: complete, best valid perplexity {math.exp(best):.2f}")
        return best

    return run_trial


def open_study(
    protocol: Protocol, model: str, runs: Path, create: bool
) -> tuple[optuna.Study, RDBStorage]:
    store = storage(runs)
    name = protocol.study_name(model)
    if not create and name not in optuna.get_all_study_names(store):
        raise TuneError(
            f"no study {name} in {runs / 'tune.db'}; run `tune.py study --model {model}` first"
        )
    pruner = optuna.pruners.MedianPruner(
        n_startup_trials=PRUNER_STARTUP, n_warmup_steps=PRUNER_WARMUP * protocol.eval_every + 1
    )
    study = optuna.create_study(
        study_name=name, storage=store, direction="minimize", pruner=pruner, load_if_exists=True
    )
    if "protocol" not in study.user_attrs:
        study.set_user_attr("protocol", asdict(protocol))
    return study, store


def cmd_study(args: argparse.Namespace, protocol: Protocol) -> None:
    if args.model == "mogrifier" and protocol.emb < max(CHOICES["rank"]):
        raise TuneError(
            f"--emb: expected >= {max(CHOICES['rank'])} (the largest Mogrifier rank searched), got {protocol.emb}"
        )
    vocab = len(load_corpus(protocol.data).vocab)
    name = protocol.study_name(args.model)
    with locked(args.runs / f"{name}.lock"):
        study, store = open_study(protocol, args.model, args.runs, create=True)
        check_protocol(study, protocol, tuple(asdict(protocol)))
        retry_stopped_trials(study, store, args.runs)
        run_trial = objective(protocol, vocab, args.model, args.runs)
        say(
            f"study {name}: {len(finished(study))} of {args.trials} trials finished "
            f"({protocol.trial_steps} steps each, evaluated every {protocol.eval_every})"
        )
        while (done := len(finished(study))) < args.trials:
            # seeded by the count of finished trials: a resumed study samples what it would have
            study.sampler = optuna.samplers.TPESampler(
                seed=SAMPLER_SEED + done, n_startup_trials=TPE_STARTUP
            )
            study.optimize(run_trial, n_trials=1, gc_after_trial=False)
        complete = study.get_trials(deepcopy=False, states=(TrialState.COMPLETE,))
        best = min(complete, key=lambda t: t.value, default=None)
        say(
            f"study {name}: {len(finished(study))} trials finished; "
            + (
                f"best valid perplexity {math.exp(best.value):.2f} (trial {best.number})"
                if best
                else "none completed"
            )
        )


# ----------------------------------------------------------------------------- trials


def trial_rows(study: optuna.Study, model: str, runs: Path) -> list[dict]:
    """A row per trial; work of a retried trial is in its retry's row (same run directory)."""
    trials = study.get_trials(deepcopy=False)
    retry_of = {t.number: t.system_attrs.get("retry_history", [""])[-1] for t in trials}
    retried_as = {of: number for number, of in retry_of.items() if of != ""}
    rows = []
    for trial in trials:
        run = trial.user_attrs.get("run", "")
        row = {
            "model": model,
            "trial": trial.number,
            "run": run,
            "retry_of": retry_of[trial.number],  # the trial it retries directly
            "retried_as": retried_as.get(trial.number, ""),
            "state": {
                TrialState.COMPLETE: "complete",
                TrialState.PRUNED: "pruned",
                TrialState.FAIL: "failed",
                TrialState.RUNNING: "running",
                TrialState.WAITING: "waiting",
            }[trial.state],
            "diverged": bool(trial.user_attrs.get("diverged", False)),
        }
        row |= {name: trial.params.get(name, "") for name in PARAMS}
        evaluations = (
            valid_rows(runs / "trials" / run) if run and trial.number not in retried_as else []
        )
        config_path = runs / "trials" / run / "config.json"
        per_step = BATCH * BPTT
        if evaluations and config_path.exists():
            config = json.loads(config_path.read_text())
            per_step = config["batch_size"] * config["bptt"]
        best = min((e.loss for e in evaluations), default=None)
        steps = (
            evaluations[-1].step if evaluations else (0 if trial.number not in retried_as else "")
        )
        row |= {
            "best_valid_loss": "" if best is None else round(best, 6),
            "best_valid_perplexity": "" if best is None else round(math.exp(best), 3),
            "steps": steps,
            "tokens": steps * per_step if steps != "" else "",
            # the run's training time to its last evaluation (over all its processes), and the
            # tuner's time on this trial (process start, evaluations; a retry's part only)
            "wall_s": round(evaluations[-1].elapsed_s, 1) if evaluations else "",
            "trial_s": round((trial.datetime_complete - trial.datetime_start).total_seconds(), 1)
            if trial.state in (TrialState.COMPLETE, TrialState.PRUNED)
            else "",
            "parameters": trial.user_attrs.get("parameters", ""),
            "target_parameters": trial.user_attrs.get("target_parameters", ""),
            "hidden": trial.user_attrs.get("hidden", ""),
        }
        rows.append(row)
    return rows


def importances(study: optuna.Study, model: str) -> list[dict]:
    """Each searched parameter's share of the variance of the best validation loss over the
    study's completed trials (fANOVA, seeded: Optuna's default evaluator); none with fewer
    than 2 completed trials. Few trials make these rough."""
    complete = study.get_trials(deepcopy=False, states=(TrialState.COMPLETE,))
    if len(complete) < 2:
        return []
    evaluator = optuna.importance.FanovaImportanceEvaluator(seed=0)
    found = optuna.importance.get_param_importances(study, evaluator=evaluator)
    return [
        {
            "model": model,
            "parameter": name,
            "importance": round(float(value), 4),
            "complete_trials": len(complete),
        }
        for name, value in found.items()
    ]


def write_csv(path: Path, rows: list[dict]) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    temporary = path.with_name(f".{path.name}.tmp")
    with open(temporary, "w", newline="") as file:
        writer = csv.DictWriter(file, fieldnames=list(rows[0]))
        writer.writeheader()
        writer.writerows(rows)
    os.replace(temporary, path)


def cmd_trials(args: argparse.Namespace, protocol: Protocol) -> None:
    rows, importance_rows, totals, counts, budgets, hours = [], [], {}, {}, {}, {}
    for model in MODELS:
        study, _ = open_study(protocol, model, args.runs, create=False)
        model_rows = trial_rows(study, model, args.runs)
        rows += model_rows
        importance_rows += importances(study, model)
        counts[model] = len(finished(study))
        totals[model] = sum(row["tokens"] for row in model_rows if row["tokens"] != "")
        hours[model] = sum(row["trial_s"] for row in model_rows if row["trial_s"] != "") / 3600
        budgets[model] = study.user_attrs.get("protocol", {}).get("trial_steps")
    write_csv(args.out, rows)
    say(f"wrote {args.out} ({len(rows)} trials)")
    if importance_rows:
        write_csv(args.importances, importance_rows)
        say(f"wrote {args.importances} (fANOVA on each study's completed trials)")
    for model in MODELS:
        say(
            f"{model}: {counts[model]} finished trials (complete + pruned), {budgets[model]} steps "
            f"per trial, {totals[model]:,} tokens trained in all; the tuner's time on its "
            f"finished trials {hours[model]:.2f} h"
        )
    if budgets["lstm"] != budgets["mogrifier"]:
        say(
            f"WARNING: unequal per-trial budgets: {budgets['lstm']} vs {budgets['mogrifier']} steps"
        )
    if counts["lstm"] != counts["mogrifier"]:
        say(
            f"WARNING: unequal tuning effort: {counts['lstm']} vs {counts['mogrifier']} finished trials"
        )
    if totals["mogrifier"]:
        ratio = totals["lstm"] / totals["mogrifier"]
        within = abs(ratio - 1) <= 0.1
        say(f"tokens lstm / mogrifier: {ratio:.3f}" + (" (within 10%)" if within else ""))
        if not within:
            say(
                "WARNING: the studies' token totals differ by more than 10% (unequal trial "
                "counts, or pruning cut one study's trials more): the tuning effort is not equal"
            )


# ----------------------------------------------------------------------------- finals


def loss_line(output: str, split: str = "test") -> tuple[float, str]:
    """The loss in mogrifier-eval's output ("... loss 4.6052 nats per token ...") and its
    line; of several, the last on a line starting with ``split``, else the last."""
    found = [(line, m) for line in output.splitlines() for m in LOSS.finditer(line)]
    if not found:
        raise TuneError(
            f"no 'loss <number> nats per token' in mogrifier-eval's output:\n{tail(output)}"
        )
    preferred = [(line, m) for line, m in found if line.strip().lower().startswith(split)]
    line, match = (preferred or found)[-1]
    return float(match["loss"]), line.strip()


def setting(line: str) -> str:
    """How mogrifier-eval says it evaluated: the line's last parenthesis ("dynamic evaluation,
    lr 0.0001, decay 0.02, segment 5"), or ""."""
    found = re.findall(r"\(([^()]*)\)", line)
    return found[-1] if found else ""


def dynamic_flags(chosen: str | None) -> list[str]:
    """mogrifier-eval's dynamic-evaluation flags: the learning rate and decay chosen on the
    validation split (--dynamic-tune) or, given how the model's first seed was evaluated (its
    ``dynamic_setting``, "dynamic evaluation, lr X, decay Y, ..."), the pair chosen there
    (dynamic evaluation's hyperparameters are tuned once per model)."""
    if chosen is None:
        return ["--dynamic", "--dynamic-tune"]
    found = re.search(r"\blr ([^,\s]+), decay ([^,\s]+)", chosen)
    if found is None:
        raise TuneError(f"no 'lr X, decay Y' in the first seed's dynamic setting {chosen!r}")
    return ["--dynamic", "--dynamic-lr", found[1], "--dynamic-decay", found[2]]


def evaluate_final(out: Path, dynamic: list[str] | None) -> dict:
    """Static and (given ``dynamic``, mogrifier-eval's flags) dynamic test losses of a final
    run, cached in ``out/tune-eval.json`` for the run as it stands (its last evaluation and best
    loss) and the flags used."""
    rows = valid_rows(out)
    key = {"step": rows[-1].step, "best_valid": min(r.loss for r in rows)}
    path = out / "tune-eval.json"
    cache = json.loads(path.read_text()) if path.exists() else {}
    if cache.get("key") != key:
        cache = {"key": key}
    kinds = {"static": []} | ({} if dynamic is None else {"dynamic": dynamic})
    for kind, flags in kinds.items():
        if cache.get(kind, {}).get("flags") == flags:
            say(f"{out.name}: {kind} test loss {cache[kind]['loss']:.4f} (cached)")
            continue
        clock = time.perf_counter()
        code, output = run_child(
            "mogrifier_fast.lm.train:main_eval",
            [str(out), "--split", "test", *flags, "--no-progress"],
            out / "eval.log",
        )
        if code != 0:
            raise TuneError(
                f"{out.name}: mogrifier-eval ({kind}) exited with {code}:\n{tail(output)}"
            )
        loss, line = loss_line(output)
        cache[kind] = {
            "loss": loss,
            "line": line,
            "flags": flags,
            "wall_s": round(time.perf_counter() - clock, 1),
        }
        path.write_text(json.dumps(cache, indent=2) + "\n")
        say(
            f"{out.name}: {kind} test loss {loss:.4f} (perplexity {math.exp(loss):.2f}) in {cache[kind]['wall_s']:.0f} s"
        )
    return cache


def train_final(out: Path, config: dict, model: str, steps: int) -> list[Evaluation]:
    """Train (or continue) the final run ``out`` of ``config`` up to ``steps``, reporting each
    evaluation as it is written; returns its evaluations. A run already there is left alone."""
    resume = prepare_run(out, config)
    done = valid_rows(out) if resume else []
    if done and done[-1].step >= steps:
        say(f"{out.name}: trained ({done[-1].step} steps)")
        return done
    say(f"{out.name}: training steps {done[-1].step if done else 0}-{steps}")
    seen = {row.step for row in done}

    def report() -> None:
        for row in new_evaluations(out, seen, steps):
            say(
                f"{out.name}: step {row.step}/{steps}, valid loss {row.loss:.4f} "
                f"(perplexity {math.exp(row.loss):.1f}), {row.elapsed_s:.0f} s"
            )

    code, output = run_child(
        "mogrifier_fast.lm.train:main_train",
        train_arguments(config, model, out, steps, resume),
        out / "train.log",
        watch=report,
    )
    if code != 0:
        raise TuneError(f"{out.name}: mogrifier-train exited with {code}:\n{tail(output)}")
    report()
    return valid_rows(out)


def read_csv(path: Path) -> list[dict]:
    if not path.exists():
        return []
    with open(path, newline="") as file:
        return list(csv.DictReader(file))


def record(path: Path, rows: list[dict], model: str, seed: int) -> None:
    """Put ``rows`` into the CSV at ``path`` in place of its rows of (model, seed), under a lock
    (finals of both models may run side by side); rows in model, seed, step order."""
    with locked(path.with_name(f".{path.name}.lock"), wait=True):
        kept = [r for r in read_csv(path) if (r["model"], str(r["seed"])) != (model, str(seed))]
        merged = sorted(
            [*kept, *rows],
            key=lambda r: (MODELS.index(r["model"]), int(r["seed"]), int(r.get("step", 0))),
        )
        write_csv(path, merged)


def best_configuration(path: Path, protocol: Protocol, vocab: int, model: str) -> dict:
    """The model's best completed trial in the trials CSV (``tune.py trials`` writes it from
    the study; the finals need no study database). Refuses a CSV tuned under other settings."""
    if not path.exists():
        raise TuneError(
            f"--trials: {path} does not exist; run the studies and `tune.py trials` first"
        )
    rows = [r for r in read_csv(path) if r["model"] == model and r["state"] == "complete"]
    if not rows:
        raise TuneError(
            f"--trials: {path} holds no completed {model} trial; run the studies and "
            "`tune.py trials` first"
        )
    best = min(rows, key=lambda r: float(r["best_valid_loss"]))
    params = {name: float(best[name]) for name in FLOATS}
    if model == "mogrifier":
        params |= {name: int(best[name]) for name in CHOICES}
    hidden, count, _ = sizes(protocol, vocab, model, params)
    tuned = (
        int(best["hidden"]),
        int(best["parameters"]),
        int(best["tokens"]) // int(best["steps"]),
    )
    if tuned != (hidden, count, protocol.batch * protocol.bptt):
        raise TuneError(
            f"--trials: {model} trial {best['trial']} in {path} was tuned under other settings "
            f"(hidden {tuned[0]}, {tuned[1]:,} parameters, {tuned[2]} tokens per step; these "
            f"give hidden {hidden}, {count:,} parameters, {protocol.batch * protocol.bptt})"
        )
    return best | {"params": params}


def final_row(
    model: str, seed: int, best: dict, evaluations: list[Evaluation], cache: dict, per_step: int
) -> dict:
    """The finals CSV row of a trained and tested run."""
    best_valid = min(e.loss for e in evaluations)
    static = cache["static"]["loss"]
    dynamic = cache.get("dynamic", {}).get("loss")
    return (
        {
            "model": model,
            "seed": seed,
            "trial": int(best["trial"]),
            "parameters": int(best["parameters"]),
            "target_parameters": int(best["target_parameters"]),
            "hidden": int(best["hidden"]),
        }
        | {name: best["params"].get(name, "") for name in PARAMS}
        | {
            "steps": evaluations[-1].step,
            "tokens": evaluations[-1].step * per_step,
            "best_valid_loss": round(best_valid, 6),
            "best_valid_perplexity": round(math.exp(best_valid), 3),
            "static_test_loss": round(static, 6),
            "static_test_perplexity": round(math.exp(static), 3),
            "dynamic_test_loss": "" if dynamic is None else round(dynamic, 6),
            "dynamic_test_perplexity": "" if dynamic is None else round(math.exp(dynamic), 3),
            "dynamic_setting": setting(cache.get("dynamic", {}).get("line", "")),
            "train_wall_s": round(evaluations[-1].elapsed_s, 1),
            "eval_wall_s": round(sum(c["wall_s"] for k, c in cache.items() if k != "key"), 1),
        }
    )


def is_recorded(row: dict | None, best: dict, steps: int, dynamic: bool) -> bool:
    """Whether a finals CSV row is the result of this configuration and budget (and holds a
    dynamic evaluation if one is asked for)."""
    return (
        row is not None
        and row["trial"] == str(best["trial"])
        and all(row[name] == best[name] for name in PARAMS)
        and row["steps"] == str(steps)
        and (not dynamic or row["dynamic_test_loss"] != "")
    )


def cmd_finals(args: argparse.Namespace, protocol: Protocol) -> None:
    vocab = len(load_corpus(protocol.data).vocab)
    models = MODELS if args.model is None else (args.model,)
    per_step = protocol.batch * protocol.bptt
    with contextlib.ExitStack() as stack:
        for model in models:  # one process per model at a time
            stack.enter_context(locked(args.runs / f"finals-{model}.lock"))
        for model in models:
            best = best_configuration(args.trials, protocol, vocab, model)
            config = run_config(protocol, model, int(best["hidden"]), best["params"], 0, args.eval_every)  # fmt: skip
            say(
                f"{model}: the best completed trial is {best['trial']} (valid perplexity "
                f"{float(best['best_valid_perplexity']):.2f}); hidden {best['hidden']}, "
                f"{int(best['parameters']):,} parameters"
            )
            recorded = {int(r["seed"]): r for r in read_csv(args.out) if r["model"] == model}
            # dynamic evaluation's (lr, decay): chosen by the first seed evaluated, then reused
            settings = [(s, recorded[s]["dynamic_setting"]) for s in sorted(recorded)]
            chosen = next(((s, text) for s, text in settings if text), None)
            for seed in args.seeds:
                out = args.runs / "finals" / f"{model}-seed{seed}"
                row = recorded.get(seed)
                if not any(out.glob("checkpoint-*.pt")) and is_recorded(
                    row, best, args.final_steps, not args.no_dynamic
                ):
                    # the CSVs are the record; a run directory is a cache that may be gone
                    say(f"{out.name}: recorded in {args.out.name} (no run directory; kept)")
                    continue
                config["seed"] = seed
                evaluations = train_final(out, config, model, args.final_steps)
                flags = None
                if not args.no_dynamic:
                    flags = dynamic_flags(
                        None if chosen is None or chosen[0] == seed else chosen[1]
                    )
                cache = evaluate_final(out, flags)
                row = final_row(model, seed, best, evaluations, cache, per_step)
                if chosen is None and row["dynamic_setting"]:
                    chosen = (seed, row["dynamic_setting"])
                curves = [
                    {
                        "model": model,
                        "seed": seed,
                        "step": e.step,
                        "tokens": e.step * per_step,
                        "loss": round(e.loss, 6),
                        "perplexity": round(math.exp(e.loss), 3),
                        "wall_s": round(e.elapsed_s, 1),
                    }
                    for e in evaluations
                ]
                record(args.curves, curves, model, seed)
                record(args.out, [row], model, seed)
                say(f"{out.name}: recorded in {args.out} and {args.curves}")
    summarize(read_csv(args.out))


# ----------------------------------------------------------------------------- summary


def summarize(rows: list[dict]) -> None:
    """Mean +- std over seeds of each model's test perplexity, and Welch's t-test."""
    for kind in ("static", "dynamic"):
        column = f"{kind}_test_perplexity"
        values = {
            m: [float(r[column]) for r in rows if r["model"] == m and r[column] != ""]
            for m in MODELS
        }
        if not any(values.values()):
            say(f"{kind}: no results")
            continue
        for model in MODELS:
            v = values[model]
            spread = f" +- {statistics.stdev(v):.2f}" if len(v) > 1 else ""
            say(
                f"{kind} test perplexity, {model}: "
                + (f"{statistics.mean(v):.2f}{spread} ({len(v)} seeds)" if v else "none")
            )
        a, b = values["lstm"], values["mogrifier"]
        if len(a) > 1 and len(b) > 1:
            from scipy import stats  # the dev extra has it

            test = stats.ttest_ind(b, a, equal_var=False)
            say(
                f"{kind}: mogrifier - lstm = {statistics.mean(b) - statistics.mean(a):+.2f} perplexity; "
                f"Welch's t = {test.statistic:.2f}, p = {test.pvalue:.3g}"
            )
        else:
            say(f"{kind}: Welch's t-test needs at least 2 seeds per model")
    for model in MODELS:
        mine = [r for r in rows if r["model"] == model]
        if mine:
            hours = {c: sum(float(r[c] or 0) for r in mine) / 3600 for c in ("train_wall_s", "eval_wall_s")}  # fmt: skip
            say(
                f"{model}: {len(mine)} final runs, training {hours['train_wall_s']:.2f} h, "
                f"test evaluation {hours['eval_wall_s']:.2f} h"
            )


def cmd_summary(args: argparse.Namespace, protocol: Protocol) -> None:
    if not args.finals.exists():
        raise TuneError(f"--finals: {args.finals} does not exist; run `tune.py finals` first")
    summarize(read_csv(args.finals))


# ----------------------------------------------------------------------------- command line


def positive(text: str) -> int:
    try:
        value = int(text)
    except ValueError:
        value = 0
    if value < 1:
        raise argparse.ArgumentTypeError(f"expected an integer >= 1, got {text!r}")
    return value


def seed_list(text: str) -> list[int]:
    try:
        seeds = [int(s) for s in text.split(",")]
    except ValueError:
        seeds = []
    if not seeds or any(s < 0 for s in seeds) or len(set(seeds)) != len(seeds):
        raise argparse.ArgumentTypeError(
            f"expected distinct comma-separated integers >= 0, got {text!r}"
        )
    return seeds


def build_parser() -> argparse.ArgumentParser:
    common = argparse.ArgumentParser(add_help=False)
    common.add_argument(
        "--runs",
        type=Path,
        default=ROOT / "runs" / "tune",
        help="the study database and run directories (default runs/tune)",
    )
    common.add_argument(
        "--data", default=DATA, help="ptb (default) or a corpus directory (train/valid/test.txt)"
    )
    for flag, default, what in (
        ("--trial-steps", TRIAL_STEPS, "updates per trial"),
        (
            "--eval-every",
            EVAL_EVERY,
            "steps between evaluations, where the pruner may stop a trial",
        ),
        ("--final-steps", FINAL_STEPS, "updates per final run"),
        ("--eval-tokens", EVAL_TOKENS, "validation tokens per evaluation"),
        ("--emb", EMB, "embedding size"),
        (
            "--target-hidden",
            TARGET_HIDDEN,
            "the LSTM's hidden size; the Mogrifiers match its count",
        ),
    ):
        common.add_argument(
            flag, type=positive, default=default, help=f"{what} (default {default})"
        )
    parser = argparse.ArgumentParser(
        prog="tune.py",
        description=__doc__,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    commands = parser.add_subparsers(
        dest="command", required=True, metavar="{study,trials,finals,summary}"
    )
    study = commands.add_parser("study", parents=[common], help="run (or resume) one model's study")
    study.add_argument("--model", required=True, choices=MODELS)
    study.add_argument(
        "--trials",
        type=positive,
        default=TRIALS,
        help=f"finished trials to reach (default {TRIALS})",
    )
    trials = commands.add_parser(
        "trials", parents=[common], help="every trial of both studies as a CSV"
    )
    trials.add_argument("--out", type=Path, default=RESULTS / "tune-trials.csv")
    trials.add_argument("--importances", type=Path, default=RESULTS / "tune-importances.csv")
    finals = commands.add_parser(
        "finals", parents=[common], help="the best trials at the final budget, tested"
    )
    finals.add_argument(
        "--seeds", type=seed_list, default=[0, 1, 2], help="comma-separated seeds (default 0,1,2)"
    )
    finals.add_argument(
        "--trials",
        type=Path,
        default=RESULTS / "tune-trials.csv",
        help="the trials CSV the best configurations are read from (default %(default)s)",
    )
    finals.add_argument("--out", type=Path, default=RESULTS / "tune-finals.csv")
    finals.add_argument("--curves", type=Path, default=RESULTS / "tune-final-curves.csv")
    finals.add_argument("--no-dynamic", action="store_true", help="static test evaluation only")
    finals.add_argument(
        "--model",
        choices=MODELS,
        help="this model's runs only (one process per model can run side by side; each adds "
        "its finished runs to the CSVs)",
    )
    summary = commands.add_parser(
        "summary", parents=[common], help="mean +- std over seeds, Welch's t-test"
    )
    summary.add_argument("--finals", type=Path, default=RESULTS / "tune-finals.csv")
    return parser


def main(argv: list[str] | None = None) -> None:
    parser = build_parser()
    args = parser.parse_args(argv)
    if args.trial_steps % args.eval_every:
        parser.error(
            f"--trial-steps: expected a multiple of --eval-every ({args.eval_every}), got {args.trial_steps}"
        )
    protocol = Protocol(
        args.data, args.emb, args.target_hidden, args.trial_steps, args.eval_every, args.eval_tokens
    )
    optuna.logging.set_verbosity(optuna.logging.ERROR)  # failures: our own messages
    commands = {
        "study": cmd_study,
        "trials": cmd_trials,
        "finals": cmd_finals,
        "summary": cmd_summary,
    }

    def stop(signum, frame):  # a plain kill stops the training child and marks the trial failed
        raise KeyboardInterrupt

    previous = signal.signal(signal.SIGTERM, stop)
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", optuna.exceptions.ExperimentalWarning)
            commands[args.command](args, protocol)
    except (TuneError, CorpusError) as error:
        print(f"tune.py {args.command}: error: {error}", file=sys.stderr)
        raise SystemExit(1) from None
    except KeyboardInterrupt:
        print(
            f"\ntune.py {args.command}: interrupted; run the same command again to continue",
            file=sys.stderr,
        )
        raise SystemExit(130) from None
    finally:
        signal.signal(signal.SIGTERM, previous)


if __name__ == "__main__":
    main()
