"""LSTM vs Mogrifier at matched parameter count and token budget, on ptb-char and ptb.

Each run is one ``mogrifier-train`` process with the same schedule for both models; the LSTM's
hidden size is chosen so that its parameter count matches the Mogrifier's as closely as
possible. Every evaluation of every run becomes a row of
``benchmarks/results/replication-<dataset>.csv``.

    python benchmarks/replicate.py --seeds 0,1          # what the README reports (about 2.5 hours)
    python benchmarks/replicate.py --datasets ptb-char --steps 50 --eval-every 25   # a quick look
    python benchmarks/replicate.py --seeds 0,1 --collect-only   # rebuild the CSVs from runs/

A run directory that exists is resumed (and extended if --steps grew); the final test uses the
best validation checkpoint on the whole test split.
"""

from __future__ import annotations

import argparse
import csv
import functools
import json
import math
import subprocess
import sys
from pathlib import Path

import torch

from mogrifier_fast.lm.data import load_corpus
from mogrifier_fast.lm.model import LanguageModel

ROOT = Path(__file__).resolve().parents[1]

# Shared by both models of a dataset: the same budget, schedule and regularisation. Nothing was
# tuned per model; the learning rate 2e-3 (Adam, beta1 = 0) was the one value tried.
COMMON = ["--bptt", "70", "--batch-size", "32", "--lr", "2e-3", "--clip", "1.0", "--lr-decay", "0.5", "--patience", "0",
          "--dropout-input", "0.1", "--dropout-output", "0.1", "--no-progress", "--epochs", "1000"]  # fmt: skip
# (--epochs 1000: the step budget, not the epoch count, ends every run)
# Per dataset: sizes, updates (the token budget: steps x 32 x 70) and evaluation cadence, chosen
# so that each run takes 10-20 minutes on a 2-core CPU.
DATASETS = {
    "ptb-char": {
        "emb": 64,
        "hidden": 192,
        "rounds": 5,
        "rank": None,
        "steps": 20000,
        "eval_every": 500,
        "eval_tokens": 100_000,
    },
    "ptb": {
        "emb": 128,
        "hidden": 192,
        "rounds": 5,
        "rank": 32,
        "steps": 5000,
        "eval_every": 250,
        "eval_tokens": 40_000,
    },
}


@functools.cache
def parameters(
    vocab: int, emb: int, hidden: int, rounds: int = 0, rank: int | None = None, layers: int = 1
) -> int:
    """The parameter count of ``LanguageModel`` (tied embeddings) with these sizes; built on the
    meta device, so no memory is allocated (about a millisecond each)."""
    with torch.device("meta"):
        model = LanguageModel(
            vocab, emb=emb, hidden=hidden, layers=layers, rounds=rounds, rank=rank
        )
    return sum(p.numel() for p in model.parameters())


def matched_hidden(
    vocab: int, emb: int, target: int, rounds: int = 0, rank: int | None = None, layers: int = 1
) -> int:
    """The hidden size whose model (``rounds`` 0: a plain LSTM) has the parameter count closest
    to ``target``; the smaller one on a tie. Sizes run from 8 (at least ``rank``) up.

    The count grows with the hidden size except at hidden == emb, where the tied decoder needs
    no down-projection (hidden x emb fewer weights); so the closest size is found by bisection
    on each side of ``emb`` and a look at ``emb`` itself.
    """
    low = max(8, rank or 1)

    def count(hidden: int) -> int:
        return parameters(vocab, emb, hidden, rounds, rank, layers)

    def closest(lo: int, hi: int | None) -> list[int]:
        """The candidates in [lo, hi] (hi None: unbounded), where the count increases."""
        if hi is not None and lo > hi:
            return []
        if hi is None:  # an upper end with count >= target (the count is unbounded above)
            hi = lo
            while count(hi) < target:
                hi *= 2
        a, b = lo, hi  # the first size in [lo, hi] with count >= target, or hi
        while a < b:
            middle = (a + b) // 2
            a, b = (middle + 1, b) if count(middle) < target else (a, middle)
        return [h for h in (a - 1, a) if lo <= h <= hi]

    candidates = [
        *closest(low, emb - 1),
        *([emb] if emb >= low else []),
        *closest(max(low, emb + 1), None),
    ]
    return min(sorted(candidates), key=lambda h: abs(count(h) - target))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--datasets", default="ptb-char,ptb")
    parser.add_argument("--seeds", default="0", help="comma-separated seeds")
    parser.add_argument(
        "--steps", type=int, help="updates per run (default: the dataset's, in DATASETS)"
    )
    parser.add_argument(
        "--eval-every", type=int, help="steps between evaluations (default: the dataset's)"
    )
    parser.add_argument(
        "--collect-only",
        action="store_true",
        help="rebuild the CSVs from the run directories without training",
    )
    parser.add_argument(
        "--runs",
        type=Path,
        default=ROOT / "runs" / "replication",
        help="run directories (not committed)",
    )
    args = parser.parse_args()
    for dataset in args.datasets.split(","):
        spec = DATASETS[dataset]
        vocab = len(load_corpus(dataset).vocab)
        mogrifier_params = parameters(
            vocab, spec["emb"], spec["hidden"], spec["rounds"], spec["rank"]
        )
        lstm_hidden = matched_hidden(vocab, spec["emb"], mogrifier_params)
        models = {
            "mogrifier": (["--model", "mogrifier", "--hidden", str(spec["hidden"]), "--rounds", str(spec["rounds"])]
                          + ([] if spec["rank"] is None else ["--rank", str(spec["rank"])]), mogrifier_params),
            "lstm": (["--model", "lstm", "--hidden", str(lstm_hidden)], parameters(vocab, spec["emb"], lstm_hidden, 0, None)),
        }  # fmt: skip
        rows = []
        for seed in [int(s) for s in args.seeds.split(",")]:
            for model, (flags, count) in models.items():
                out = args.runs / f"{dataset}-{model}-seed{seed}"
                command = [sys.executable, "-m", "mogrifier_fast.lm.train", "--data", dataset, "--emb", str(spec["emb"]), *flags,
                           *COMMON, "--max-steps", str(args.steps or spec["steps"]), "--eval-every", str(args.eval_every or spec["eval_every"]),
                           "--max-eval-tokens", str(spec["eval_tokens"]), "--seed", str(seed), "--out", str(out)]  # fmt: skip
                if (out / "config.json").exists():
                    command.append("--resume")
                print(f"{dataset} {model} seed {seed}: {count:,} parameters", flush=True)
                if not args.collect_only:
                    subprocess.run(command, check=True)
                config = json.loads((out / "config.json").read_text())
                with open(out / "metrics.csv", newline="") as file:
                    evaluations = list(csv.DictReader(file))
                last_step = int(evaluations[-1]["step"])
                for row in evaluations:
                    if row["split"] == "test" and int(row["step"]) != last_step:
                        continue  # a test of an earlier, shorter budget that this run extended
                    tokens = int(row["step"]) * config["batch_size"] * config["bptt"]
                    loss = float(row["loss"])
                    rows.append({
                        "dataset": dataset, "model": model, "seed": seed, "parameters": count, "hidden": config["hidden"],
                        "rounds": config["rounds"], "rank": config["rank"] or "", "step": int(row["step"]), "tokens": tokens,
                        "wall_s": float(row["elapsed_s"]), "split": row["split"], "loss": loss,
                        "perplexity": math.exp(loss) if dataset == "ptb" else "",
                        "bits_per_char": loss / math.log(2) if dataset != "ptb" else "",
                    })  # fmt: skip
        path = ROOT / "benchmarks" / "results" / f"replication-{dataset}.csv"
        with open(path, "w", newline="") as file:
            writer = csv.DictWriter(file, fieldnames=list(rows[0]))
            writer.writeheader()
            writer.writerows(rows)
        print(f"wrote {path}", flush=True)


if __name__ == "__main__":
    main()
