"""``mogrifier-train``, ``mogrifier-eval`` and ``mogrifier-sample``: language-model training that
survives faults.

A run directory holds ``config.json``, ``metrics.csv`` (one row per evaluation) and checkpoints
(``checkpoint-<step>.pt``, the last few kept, and ``best.pt``). Checkpoints are written
atomically and hold the model, the optimizer, the random states, the data position and the
hidden state carried across segments, so ``--resume`` continues exactly where a run stopped.
Run under ``torchrun`` for multi-process data-parallel training (gloo on CPU, NCCL on GPU).

    mogrifier-train --data ptb-char --model mogrifier --hidden 256 --max-steps 2000 --out runs/a
    mogrifier-train --out runs/a --resume --max-steps 4000
    mogrifier-eval runs/a --split test
    mogrifier-sample runs/a --prime "the " --length 200
    torchrun --standalone --nproc-per-node 2 -m mogrifier_fast.lm.train --data ptb --out runs/d
"""

from __future__ import annotations

import argparse
import csv
import json
import math
import os
import random
import sys
import time
from collections.abc import Iterator
from dataclasses import asdict, dataclass
from pathlib import Path

import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch import Tensor, nn

from mogrifier_fast.lm.data import Corpus, CorpusError, batchify, load_corpus
from mogrifier_fast.lm.dynamic import (
    DEFAULT_DECAY,
    DEFAULT_LR,
    DEFAULT_SEGMENT,
    DEFAULT_VALID_TOKENS,
    Stats,
    choose_dynamic,
    default_hyperparameters,
    dynamic_evaluate,
    gradient_statistics,
)
from mogrifier_fast.lm.model import LanguageModel, State
from mogrifier_fast.progress import progress_bar

METRIC_FIELDS = [
    "step",
    "epoch",
    "split",
    "loss",
    "perplexity",
    "bits_per_char",
    "tokens_per_s",
    "elapsed_s",
]
MODEL_KEYS = [
    "emb",
    "hidden",
    "layers",
    "rounds",
    "rank",
    "share_rounds",
    "tie",
    "dropout_input",
    "dropout_layer",
    "dropout_state",
    "dropout_output",
    "backend",
    "weight_drop",
]
# Model keys added after runs were first saved, with the value that rebuilds such older runs.
MODEL_KEY_DEFAULTS = {"weight_drop": 0.0}


class TrainingError(RuntimeError):
    """A run that must stop, with a one-line reason (non-finite loss, no checkpoint to resume)."""


@dataclass
class Progress:
    """Where training stands: saved in every checkpoint."""

    step: int = 0
    epoch: int = 0
    position: int = 0  # the next training segment's first row in the batchified data
    best_valid: float = math.inf
    bad_evaluations: int = 0
    lr: float = 0.0
    elapsed_s: float = 0.0


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="mogrifier-train", description="Train a Mogrifier (or plain LSTM) language model."
    )
    p.add_argument(
        "--data",
        default="ptb-char",
        help="ptb, ptb-char, shakespeare, or a directory with train/valid/test.txt",
    )
    p.add_argument(
        "--level", choices=["word", "char"], help="for a directory corpus: word (default) or char"
    )
    p.add_argument(
        "--model",
        choices=["lstm", "mogrifier"],
        default="mogrifier",
        help="lstm is rounds=0 through the same code",
    )
    p.add_argument("--rounds", type=int, default=5)
    p.add_argument(
        "--rank", type=int, default=None, help="low-rank mogrifier maps (default: full rank)"
    )
    p.add_argument("--share-rounds", action="store_true")
    p.add_argument("--emb", type=int, default=128)
    p.add_argument("--hidden", type=int, default=256)
    p.add_argument("--layers", type=int, default=1)
    p.add_argument(
        "--no-tie", dest="tie", action="store_false", help="untie input and output embeddings"
    )
    p.add_argument("--dropout-input", type=float, default=0.0)
    p.add_argument("--dropout-layer", type=float, default=0.0)
    p.add_argument("--dropout-state", type=float, default=0.0)
    p.add_argument("--dropout-output", type=float, default=0.0)
    p.add_argument(
        "--weight-drop",
        type=float,
        default=0.0,
        help="DropConnect probability on each layer's hidden-to-hidden weights (AWD-LSTM's weight "
        "drop): one mask per training segment, shared by its steps (default 0: off)",
    )
    p.add_argument("--bptt", type=int, default=70)
    p.add_argument(
        "--batch-size",
        type=int,
        default=32,
        help="global batch: split across processes under torchrun",
    )
    p.add_argument("--eval-batch-size", type=int, default=16)
    p.add_argument("--lr", type=float, default=2e-3)
    p.add_argument(
        "--beta1", type=float, default=0.0, help="Adam's beta1 (the official setting is 0)"
    )
    p.add_argument("--l2", type=float, default=0.0, help="L2 penalty (Adam weight decay)")
    p.add_argument("--clip", type=float, default=1.0, help="gradient-norm clipping (0: none)")
    p.add_argument(
        "--lr-decay",
        type=float,
        default=0.5,
        help="multiply the learning rate by this when validation does not improve",
    )
    p.add_argument(
        "--patience",
        type=int,
        default=3,
        help="stop after this many evaluations without improvement (0: never)",
    )
    p.add_argument(
        "--epochs",
        type=int,
        default=None,
        help="passes over the training split (default 1; on --resume: as saved)",
    )
    p.add_argument("--max-steps", type=int, default=None, help="stop after this many updates")
    p.add_argument(
        "--eval-every",
        type=int,
        default=200,
        help="evaluate on the validation split (and checkpoint) every N steps",
    )
    p.add_argument(
        "--max-eval-tokens",
        type=int,
        default=None,
        help="validate on at most this many tokens during training (the final test uses the whole split)",
    )
    p.add_argument("--keep", type=int, default=2, help="checkpoints kept besides best.pt")
    p.add_argument("--backend", default="auto", help="MogrifierLSTM backend")
    p.add_argument(
        "--device", default="cpu", help="cpu or cuda (under torchrun: each process its local GPU)"
    )
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--out", type=Path, required=True, help="run directory")
    p.add_argument(
        "--resume",
        action="store_true",
        help="continue the run in --out from its latest readable checkpoint",
    )
    p.add_argument("--no-progress", action="store_true", help="no progress bar")
    p.add_argument(
        "--no-test",
        action="store_true",
        help="skip the test evaluation at the end (a tuner's trials; mogrifier-eval runs it later)",
    )
    return p


def main_train(argv: list[str] | None = None) -> None:
    args = build_parser().parse_args(argv)
    _run_cli("mogrifier-train", lambda: train(args))


def _run_cli(program: str, function) -> None:
    try:
        function()
    except (CorpusError, ValueError, TrainingError) as error:
        print(f"{program}: error: {error}", file=sys.stderr)
        raise SystemExit(1 if isinstance(error, TrainingError) else 2) from None
    except KeyboardInterrupt:
        print(f"\n{program}: interrupted; the latest checkpoint is kept", file=sys.stderr)
        raise SystemExit(130) from None


# ----------------------------------------------------------------------------- setup


def _check_args(args: argparse.Namespace) -> None:
    for name in (
        "hidden",
        "emb",
        "layers",
        "bptt",
        "batch_size",
        "eval_batch_size",
        "eval_every",
        "keep",
    ):
        if getattr(args, name) < 1:
            raise ValueError(
                f"--{name.replace('_', '-')}: expected >= 1, got {getattr(args, name)}"
            )
    for name in ("max_steps", "epochs"):
        if getattr(args, name) is not None and getattr(args, name) < 1:
            raise ValueError(
                f"--{name.replace('_', '-')}: expected >= 1, got {getattr(args, name)}"
            )
    if args.lr <= 0:
        raise ValueError(f"--lr: expected > 0, got {args.lr}")
    for name in (
        "dropout_input",
        "dropout_layer",
        "dropout_state",
        "dropout_output",
        "weight_drop",
    ):
        if not 0 <= getattr(args, name) < 1:
            raise ValueError(
                f"--{name.replace('_', '-')}: expected a probability in [0, 1), got {getattr(args, name)}"
            )
    if args.model == "lstm":
        args.rounds = 0


def _distributed(device: str) -> tuple[int, int, torch.device]:
    """(rank, world size, device); initialises torch.distributed under torchrun."""
    world = int(os.environ.get("WORLD_SIZE", "1"))
    if world == 1:
        return 0, 1, torch.device(device)
    if not dist.is_initialized():
        dist.init_process_group("nccl" if device.startswith("cuda") else "gloo")
    rank = dist.get_rank()
    if device.startswith("cuda"):
        local = int(os.environ.get("LOCAL_RANK", "0"))
        torch.cuda.set_device(local)
        return rank, world, torch.device("cuda", local)
    return rank, world, torch.device(device)


def build_model(config: dict, vocab_size: int) -> LanguageModel:
    """The model a run's config describes (a key added after the run was saved: its default)."""
    config = {**MODEL_KEY_DEFAULTS, **config}
    return LanguageModel(vocab_size, **{key: config[key] for key in MODEL_KEYS})


def _checkpoints(out: Path) -> list[Path]:
    """Checkpoint files, newest step first."""
    return sorted(out.glob("checkpoint-*.pt"), reverse=True)


def save_atomic(obj: dict, path: Path) -> None:
    """torch.save to a temporary file beside ``path``, flushed to disk, then renamed over it."""
    temporary = path.with_name(f".{path.name}.tmp")
    with open(temporary, "wb") as file:
        torch.save(obj, file)
        file.flush()
        os.fsync(file.fileno())
    os.replace(temporary, path)


RESUMABLE = ("model", "optimizer", "progress", "rng", "hidden")


def load_checkpoint(path: Path, required: tuple[str, ...] = RESUMABLE) -> dict:
    """A checkpoint read with ``weights_only=True``, holding the ``required`` entries;
    ValueError naming the file when it is unreadable or incomplete."""
    try:
        checkpoint = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as error:  # truncated, corrupt or foreign: all mean "unreadable"
        reason = str(error).splitlines()[0][:120] if str(error) else type(error).__name__
        raise ValueError(f"checkpoint {path} is unreadable ({reason})") from error
    missing = set(required) - set(checkpoint) if isinstance(checkpoint, dict) else set(required)
    if missing:
        raise ValueError(f"checkpoint {path} is incomplete (missing {sorted(missing)})")
    return checkpoint


def latest_readable_checkpoint(out: Path, log) -> dict:
    for path in _checkpoints(out):
        try:
            checkpoint = load_checkpoint(path)
        except ValueError as error:
            log(f"{error}; trying the previous one")
            continue
        log(f"resuming from {path.name} (step {checkpoint['progress']['step']})")
        return checkpoint
    raise TrainingError(f"--resume: no readable checkpoint in {out}")


# ----------------------------------------------------------------------------- loops


def segments(data: Tensor, bptt: int, start: int = 0) -> Iterator[tuple[int, Tensor, Tensor]]:
    """(position, inputs (L, B), targets (L, B)) over batchified data, from row ``start``."""
    for position in range(start, data.shape[0] - 1, bptt):
        length = min(bptt, data.shape[0] - 1 - position)
        yield (
            position,
            data[position : position + length],
            data[position + 1 : position + 1 + length],
        )


def detach(state: State) -> State:
    return [(h.detach(), c.detach()) for h, c in state]


@torch.no_grad()
def evaluate(model: LanguageModel, data: Tensor, bptt: int, max_tokens: int | None = None) -> float:
    """Mean cross-entropy (nats per token) over a batchified split, state carried across segments."""
    was_training = model.training
    model.eval()
    state, total, count = None, 0.0, 0
    for _, inputs, targets in segments(data, bptt):
        logits, state = model(inputs, state)
        total += F.cross_entropy(
            logits.reshape(-1, logits.shape[-1]), targets.reshape(-1), reduction="sum"
        ).item()
        count += targets.numel()
        if max_tokens is not None and count >= max_tokens:
            break
    model.train(was_training)
    return total / count


def metric_row(
    progress: Progress, split: str, loss: float, level: str, tokens_per_s: float
) -> dict:
    return {
        "step": progress.step,
        "epoch": progress.epoch,
        "split": split,
        "loss": f"{loss:.6f}",
        "perplexity": f"{math.exp(loss):.4f}" if level == "word" and loss < 700 else "",
        "bits_per_char": f"{loss / math.log(2):.6f}" if level == "char" else "",
        "tokens_per_s": f"{tokens_per_s:.1f}",
        "elapsed_s": f"{progress.elapsed_s:.2f}",
    }


class Metrics:
    """``metrics.csv``: one row per evaluation, appended and flushed as it happens."""

    def __init__(self, path: Path, resume_step: int | None) -> None:
        self.path = path
        if resume_step is not None and path.exists():
            with open(path, newline="") as file:  # drop rows from after the checkpoint resumed
                rows = [row for row in csv.DictReader(file) if int(row["step"]) <= resume_step]
            self._write_all(rows)
        elif not path.exists():
            self._write_all([])

    def _write_all(self, rows: list[dict]) -> None:
        temporary = self.path.with_name(f".{self.path.name}.tmp")
        with open(temporary, "w", newline="") as file:
            writer = csv.DictWriter(file, fieldnames=METRIC_FIELDS)
            writer.writeheader()
            writer.writerows(rows)
        os.replace(temporary, self.path)

    def append(self, row: dict) -> None:
        with open(self.path, "a", newline="") as file:
            csv.DictWriter(file, fieldnames=METRIC_FIELDS).writerow(row)
            file.flush()
            os.fsync(file.fileno())


def train(args: argparse.Namespace) -> Path:
    """Train (or resume) a run; returns the run directory."""
    _check_args(args)
    rank, world, device = _distributed(args.device)
    main_process = rank == 0

    def log(message: str) -> None:
        if main_process:
            print(f"mogrifier-train: {message}", file=sys.stderr)

    out = args.out
    checkpoint = None
    if args.resume:
        if not (out / "config.json").exists():
            raise TrainingError(f"--resume: {out} holds no run (no config.json)")
        config = json.loads((out / "config.json").read_text())
        config.update(
            {k: getattr(args, k) for k in ("max_steps", "epochs") if getattr(args, k) is not None}
        )
        # how this call reports, not a setting of the run
        config.update({k: getattr(args, k) for k in ("no_progress", "no_test")})
        checkpoint = latest_readable_checkpoint(out, log)
    else:
        if _checkpoints(out):
            raise ValueError(
                f"--out: {out} already holds a run; pass --resume to continue it, or choose another directory"
            )
        config = {
            key: (str(value) if isinstance(value, Path) else value)
            for key, value in vars(args).items()
        }
        config["epochs"] = config["epochs"] or 1
    if config["batch_size"] % world:
        raise ValueError(
            f"--batch-size: {config['batch_size']} does not split evenly across {world} processes"
        )

    corpus: Corpus = load_corpus(config["data"], config.get("level"))
    columns = config["batch_size"] // world
    train_data = batchify(corpus.train, config["batch_size"])[
        :, rank * columns : (rank + 1) * columns
    ].to(device)
    valid_data = batchify(corpus.valid, config["eval_batch_size"]).to(device)

    torch.manual_seed(config["seed"])
    random.seed(config["seed"])
    model = build_model(config, len(corpus.vocab)).to(device)
    optimizer = torch.optim.Adam(
        model.parameters(),
        lr=config["lr"],
        betas=(config["beta1"], 0.999),
        weight_decay=config["l2"],
    )
    progress = Progress(lr=config["lr"])
    state: State | None = None
    if checkpoint is not None:
        model.load_state_dict(checkpoint["model"])
        optimizer.load_state_dict(checkpoint["optimizer"])
        progress = Progress(**checkpoint["progress"])
        if len(checkpoint["rng"]["torch"]) != world:
            raise ValueError(
                f"--resume: the run was saved by {len(checkpoint['rng']['torch'])} processes; resume it with as many"
            )
        torch.set_rng_state(checkpoint["rng"]["torch"][rank])
        random.setstate(_to_random_state(checkpoint["rng"]["python"]))
        if checkpoint["hidden"]:
            state = [
                (
                    h[:, rank * columns : (rank + 1) * columns].to(device),
                    c[:, rank * columns : (rank + 1) * columns].to(device),
                )
                for h, c in checkpoint["hidden"]
            ]
    elif main_process:
        out.mkdir(parents=True, exist_ok=True)
        (out / "config.json").write_text(json.dumps(config, indent=2, sort_keys=True) + "\n")
    network: nn.Module = nn.parallel.DistributedDataParallel(model) if world > 1 else model
    metrics = (
        Metrics(out / "metrics.csv", progress.step if checkpoint is not None else None)
        if main_process
        else None
    )

    def save(name: str) -> None:
        """A checkpoint of everything needed to continue exactly (every process joins in)."""
        hidden = _gather_state(state, world)
        rng = _gather_rng(world)
        if main_process:
            payload = {
                "model": model.state_dict(),
                "optimizer": optimizer.state_dict(),
                "progress": asdict(progress),
                "rng": {"torch": rng, "python": _from_random_state(random.getstate())},
                "hidden": hidden,
                "config": {
                    k: v
                    for k, v in config.items()
                    if isinstance(v, (int, float, str, bool)) or v is None
                },
            }
            save_atomic(payload, out / name)
            for old in _checkpoints(out)[config["keep"] :]:
                old.unlink()

    def evaluate_and_checkpoint(tokens_per_s: float) -> bool:
        """Validation loss, metrics row, schedule, early stopping, checkpoints. True: stop."""
        loss = (
            evaluate(model, valid_data, config["bptt"], config["max_eval_tokens"])
            if main_process
            else 0.0
        )
        loss = _broadcast_float(loss, world)
        if not math.isfinite(loss):
            raise TrainingError(
                f"non-finite validation loss at step {progress.step}; stopped, the last good checkpoint is kept in {out}"
            )
        if metrics is not None:
            metrics.append(metric_row(progress, "valid", loss, corpus.level, tokens_per_s))
        improved = loss < progress.best_valid
        if improved:
            progress.best_valid, progress.bad_evaluations = loss, 0
        else:
            progress.bad_evaluations += 1
            progress.lr *= config["lr_decay"]
            for group in optimizer.param_groups:
                group["lr"] = progress.lr
        save(f"checkpoint-{progress.step:08d}.pt")
        if improved and main_process:
            save_atomic(
                {
                    "model": model.state_dict(),
                    "config": json.loads(json.dumps(config, default=str)),
                    "step": progress.step,
                },
                out / "best.pt",
            )
        return config["patience"] > 0 and progress.bad_evaluations >= config["patience"]

    total_steps = config["max_steps"] or config["epochs"] * math.ceil(
        (train_data.shape[0] - 1) / config["bptt"]
    )
    if checkpoint is None:
        save(f"checkpoint-{0:08d}.pt")  # a good checkpoint to fall back on from the start
    bar = None
    if main_process and not config.get("no_progress", False):
        bar = progress_bar(total=total_steps, initial=progress.step, desc="training", unit="step")
    started, tokens_since, clock = time.perf_counter() - progress.elapsed_s, 0, time.perf_counter()
    stop = False
    network.train()
    while not stop and progress.epoch < config["epochs"] and progress.step < total_steps:
        for position, inputs, targets in segments(train_data, config["bptt"], progress.position):
            state = detach(state) if state is not None else None
            logits, state = network(inputs, state)
            loss = F.cross_entropy(logits.reshape(-1, logits.shape[-1]), targets.reshape(-1))
            if not _finite_everywhere(loss, world):
                raise TrainingError(
                    f"non-finite training loss at step {progress.step + 1}; stopped, the last good checkpoint is kept in {out}"
                )
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            if config["clip"] > 0:
                nn.utils.clip_grad_norm_(model.parameters(), config["clip"])
            optimizer.step()
            progress.step += 1
            progress.position = position + inputs.shape[0]
            progress.elapsed_s = time.perf_counter() - started
            tokens_since += targets.numel() * world
            if bar is not None:
                bar.update(1)
                bar.set_postfix(loss=f"{loss.item():.3f}", lr=f"{progress.lr:.2g}")
            if progress.step % config["eval_every"] == 0 or progress.step >= total_steps:
                now = time.perf_counter()
                stop = evaluate_and_checkpoint(tokens_since / (now - clock))
                tokens_since, clock = 0, time.perf_counter()
            if stop or progress.step >= total_steps:
                break
        else:
            progress.epoch, progress.position, state = progress.epoch + 1, 0, None
    if bar is not None:
        bar.close()
    if progress.step % config["eval_every"] != 0 and progress.step < total_steps:
        evaluate_and_checkpoint(tokens_since / max(time.perf_counter() - clock, 1e-9))
    if main_process and not config.get("no_test", False):
        best = load_checkpoint(out / "best.pt", required=("model", "step"))
        model.load_state_dict(best["model"])
        test_loss = evaluate(
            model,
            batchify(corpus.test, config["eval_batch_size"]).to(device),
            config["bptt"],
        )
        metrics.append(metric_row(progress, "test", test_loss, corpus.level, 0.0))
        unit = (
            f"perplexity {math.exp(test_loss):.2f}"
            if corpus.level == "word"
            else f"{test_loss / math.log(2):.4f} bits per char"
        )
        log(
            f"step {progress.step}: test loss {test_loss:.4f} ({unit}) with the best validation checkpoint (step {best['step']})"
        )
    if world > 1:
        dist.barrier()
    return out


def _gather_state(state: State | None, world: int) -> list[tuple[Tensor, Tensor]]:
    """The carried hidden state of the whole global batch, on CPU ([] when there is none)."""
    if state is None:
        return []
    if world == 1:
        return [(h.cpu(), c.cpu()) for h, c in state]
    gathered = []
    for h, c in state:
        parts = [[torch.empty_like(t) for _ in range(world)] for t in (h, c)]
        dist.all_gather(parts[0], h.contiguous())
        dist.all_gather(parts[1], c.contiguous())
        gathered.append((torch.cat(parts[0], dim=1).cpu(), torch.cat(parts[1], dim=1).cpu()))
    return gathered


def _gather_rng(world: int) -> list[Tensor]:
    """Every process's torch random state, in rank order."""
    mine = torch.get_rng_state()
    if world == 1:
        return [mine]
    states = [None] * world
    dist.all_gather_object(states, mine)
    return states


def _finite_everywhere(loss: Tensor, world: int) -> bool:
    """Whether the loss is finite in every process (all stop together, none waits forever)."""
    finite = torch.isfinite(loss.detach()).to(torch.int32)
    if world > 1:
        dist.all_reduce(finite, op=dist.ReduceOp.MIN)
    return bool(finite.item())


def _broadcast_float(value: float, world: int) -> float:
    if world == 1:
        return value
    box = [value]
    dist.broadcast_object_list(box, src=0)
    return box[0]


def _from_random_state(state: tuple) -> list:
    version, internal, gauss = state
    return [version, list(internal), gauss]


def _to_random_state(saved: list) -> tuple:
    version, internal, gauss = saved
    return version, tuple(internal), gauss


# ----------------------------------------------------------------------------- eval and sample


def _run_checkpoint(
    path: Path, device: str
) -> tuple[LanguageModel, Corpus, dict, Path, dict, os.stat_result]:
    """:func:`_load_run`, and the checkpoint file read, its whole content and its stat from
    before it was read."""
    checkpoint_path = path / "best.pt" if path.is_dir() else path
    if not checkpoint_path.exists():
        raise ValueError(
            f"run: {checkpoint_path} does not exist; pass a run directory holding best.pt, or a checkpoint file"
        )
    read = checkpoint_path.stat()
    checkpoint = load_checkpoint(checkpoint_path, required=("model", "config"))
    config = checkpoint["config"]
    corpus = load_corpus(config["data"], config.get("level"))
    model = build_model(config, len(corpus.vocab)).to(device)
    model.load_state_dict(checkpoint["model"])
    return model.eval(), corpus, config, checkpoint_path, checkpoint, read


def _load_run(path: Path, device: str) -> tuple[LanguageModel, Corpus, dict]:
    """The model of a run directory's best.pt (or of a given .pt file) and its corpus."""
    return _run_checkpoint(path, device)[:3]


def _dynamic_stats_usable(stored: object, model: LanguageModel, config: dict) -> bool:
    """Whether a checkpoint's ``dynamic_stats`` entry fits this model and run."""
    if not isinstance(stored, dict) or not isinstance(stored.get("mean_squared"), dict):
        return False
    shapes = {name: p.shape for name, p in model.named_parameters() if p.requires_grad}
    mean_squared = stored["mean_squared"]
    return (
        stored.get("batch_size") == config["batch_size"]
        and stored.get("bptt") == config["bptt"]
        and isinstance(stored.get("tokens"), int)
        and set(mean_squared) == set(shapes)
        and all(
            isinstance(t, Tensor) and t.shape == shapes[name] for name, t in mean_squared.items()
        )
    )


def _dynamic_stats(
    model: LanguageModel,
    corpus: Corpus,
    config: dict,
    path: Path,
    checkpoint: dict,
    read: os.stat_result,
    device: str,
    progress: bool,
) -> Stats:
    """The RMS statistics of dynamic evaluation: those stored in the checkpoint file under
    ``"dynamic_stats"``, or computed on the training split (batchified as the run trained) and
    then stored there, atomically, with the token count they came from."""

    def log(message: str) -> None:
        print(f"mogrifier-eval: {message}", file=sys.stderr)

    stored = checkpoint.get("dynamic_stats")
    if _dynamic_stats_usable(stored, model, config):
        log(f"RMS statistics read from {path} ({stored['tokens']:,} training tokens)")
        return {name: t.to(device) for name, t in stored["mean_squared"].items()}
    train_data = batchify(corpus.train, config["batch_size"]).to(device)
    stats = gradient_statistics(model, train_data, config["bptt"], progress=progress)
    entry = {
        "mean_squared": {name: t.detach().cpu() for name, t in stats.items()},
        "tokens": (train_data.shape[0] - 1) * train_data.shape[1],
        "batch_size": config["batch_size"],
        "bptt": config["bptt"],
    }
    now = path.stat()
    if (now.st_mtime_ns, now.st_size) != (read.st_mtime_ns, read.st_size):
        log(f"{path} changed since it was read; the RMS statistics are not stored in it")
        return stats
    try:
        save_atomic({**checkpoint, "dynamic_stats": entry}, path)
    except OSError as error:
        log(f"could not store the RMS statistics in {path} ({error.strerror or error})")
    else:
        log(f"RMS statistics of {entry['tokens']:,} training tokens stored in {path}")
    return stats


def _check_dynamic_args(args: argparse.Namespace) -> None:
    given = {
        "--dynamic-lr": args.dynamic_lr,
        "--dynamic-decay": args.dynamic_decay,
        "--dynamic-tune": args.dynamic_tune or None,
        "--dynamic-valid-tokens": args.dynamic_valid_tokens,
        "--dynamic-segment": args.dynamic_segment,
    }
    if not args.dynamic:
        for flag, value in given.items():
            if value is not None:
                raise ValueError(f"{flag}: applies to dynamic evaluation only; add --dynamic")
        return
    if args.dynamic_tune:
        for flag in ("--dynamic-lr", "--dynamic-decay"):
            if given[flag] is not None:
                raise ValueError(
                    f"--dynamic-tune: chooses --dynamic-lr and --dynamic-decay on the validation "
                    f"split; got {flag} {given[flag]} as well (give explicit values or --dynamic-tune)"
                )
    elif args.dynamic_valid_tokens is not None:
        raise ValueError("--dynamic-valid-tokens: applies to --dynamic-tune only")
    if args.dynamic_lr is not None and not (args.dynamic_lr > 0 and math.isfinite(args.dynamic_lr)):
        raise ValueError(f"--dynamic-lr: expected a finite value > 0, got {args.dynamic_lr}")
    if args.dynamic_decay is not None and not 0 <= args.dynamic_decay <= 1:
        raise ValueError(f"--dynamic-decay: expected a value in [0, 1], got {args.dynamic_decay}")
    for flag, value in (
        ("--dynamic-segment", args.dynamic_segment),
        ("--dynamic-valid-tokens", args.dynamic_valid_tokens),
    ):
        if value is not None and value < 1:
            raise ValueError(f"{flag}: expected >= 1, got {value}")


def main_eval(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(
        prog="mogrifier-eval",
        description="Evaluate a trained language model on a split or a text file.",
    )
    p.add_argument("run", type=Path, help="a run directory (its best.pt) or a checkpoint file")
    p.add_argument("--split", choices=["train", "valid", "test"], default="test")
    p.add_argument("--text", type=Path, help="evaluate on this text file instead of a split")
    p.add_argument("--device", default="cpu")
    p.add_argument(
        "--dynamic",
        action="store_true",
        help="dynamic evaluation (Krause et al. 2018, RMS with a global prior): the model adapts "
        "to the text as it is scored; RMS statistics of the training split are computed once "
        "and stored in the checkpoint file",
    )
    p.add_argument(
        "--dynamic-lr",
        type=float,
        help=f"learning rate eta (default {DEFAULT_LR:g} x segment / {DEFAULT_SEGMENT})",
    )
    p.add_argument(
        "--dynamic-decay",
        type=float,
        help=f"decay rate lambda toward the trained weights, in [0, 1] (default {DEFAULT_DECAY:g} "
        f"x segment / {DEFAULT_SEGMENT})",
    )
    p.add_argument(
        "--dynamic-tune",
        action="store_true",
        help="choose --dynamic-lr and --dynamic-decay by a grid search on the validation split",
    )
    p.add_argument(
        "--dynamic-valid-tokens",
        type=int,
        help=f"validation tokens --dynamic-tune uses (default {DEFAULT_VALID_TOKENS:,})",
    )
    p.add_argument(
        "--dynamic-segment",
        type=int,
        help=f"tokens per adaptation step (default {DEFAULT_SEGMENT}, Krause et al.'s word-level PTB setting)",
    )
    p.add_argument("--no-progress", action="store_true", help="no progress bar")
    args = p.parse_args(argv)

    def run() -> None:
        _check_dynamic_args(args)
        model, corpus, config, path, checkpoint, read = _run_checkpoint(args.run, args.device)
        if args.text is not None:
            try:
                ids = corpus.encode(args.text.read_text(encoding="utf-8"))
            except OSError as error:
                raise ValueError(f"--text: cannot read {args.text}: {error.strerror}") from error
            name = str(args.text)
        else:
            ids, name = corpus.split(args.split), args.split
        data = batchify(ids, 1).to(args.device)
        if not args.dynamic:
            loss, how = evaluate(model, data, config["bptt"]), "static evaluation"
        else:
            progress = not args.no_progress
            segment = args.dynamic_segment or DEFAULT_SEGMENT
            lr, decay = default_hyperparameters(segment)
            lr = lr if args.dynamic_lr is None else args.dynamic_lr
            decay = decay if args.dynamic_decay is None else args.dynamic_decay
            stats = _dynamic_stats(
                model, corpus, config, path, checkpoint, read, args.device, progress
            )
            if args.dynamic_tune:
                valid_tokens = args.dynamic_valid_tokens or DEFAULT_VALID_TOKENS
                valid = batchify(corpus.valid, 1).to(args.device)
                lr, decay, valid_loss = choose_dynamic(
                    model, valid, segment, stats, max_tokens=valid_tokens, progress=progress
                )
                used = min(valid_tokens, valid.shape[0] - 1)
                print(
                    f"chosen on the first {used:,} validation tokens: --dynamic-lr {lr:g} "
                    f"--dynamic-decay {decay:g} (validation loss {valid_loss:.4f})"
                )
            loss = dynamic_evaluate(model, data, segment, lr, decay, stats, progress=progress)
            if not math.isfinite(loss):
                raise ValueError(
                    f"--dynamic-lr: {lr:g} made the loss non-finite ({loss}); try a smaller value"
                )
            how = f"dynamic evaluation, lr {lr:g}, decay {decay:g}, segment {segment}"
        unit = (
            f"perplexity {math.exp(loss):.3f}"
            if corpus.level == "word"
            else f"bits per char {loss / math.log(2):.4f}"
        )
        print(f"{name}: loss {loss:.4f} nats per token, {unit}, {ids.numel():,} tokens ({how})")

    _run_cli("mogrifier-eval", run)


def main_sample(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(
        prog="mogrifier-sample", description="Sample text from a trained language model."
    )
    p.add_argument("run", type=Path, help="a run directory (its best.pt) or a checkpoint file")
    p.add_argument("--prime", default="", help="text to start from (default: an end of line)")
    p.add_argument("--length", type=int, default=200, help="symbols to sample")
    p.add_argument("--temperature", type=float, default=1.0)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--device", default="cpu")
    args = p.parse_args(argv)

    def run() -> None:
        if args.length < 1:
            raise ValueError(f"--length: expected >= 1, got {args.length}")
        model, corpus, _ = _load_run(args.run, args.device)
        prime = (
            corpus.encode(args.prime) if args.prime else torch.tensor([0])
        )  # id 0: <eos> or the first character
        generator = torch.Generator(device=args.device).manual_seed(args.seed)
        ids = model.sample(prime.to(args.device), args.length, args.temperature, generator)
        print(
            args.prime + (" " if corpus.level == "word" and args.prime else "") + corpus.decode(ids)
        )

    _run_cli("mogrifier-sample", run)


if __name__ == "__main__":
    main_train()
