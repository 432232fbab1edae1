"""The timing harness behind ``mogrifier-bench``: CSV speed tables of every backend.

For each configuration of a grid (sequence length, batch, sizes, rounds, rank, layers, dtype,
mode) it times, side by side in one process with interleaved repeats: every available backend of
:class:`~mogrifier_fast.MogrifierLSTM` (the pure-Python ``reference`` included), ``nn.LSTM`` (a
plain LSTM of the same sizes: the ceiling) and ``LSTMCell loop`` (the usual user pattern: an
``nn.LSTMCell`` in a Python loop with one ``nn.Linear`` per round). Rows are appended to one CSV
per device as each configuration finishes, so an interrupted run keeps every finished row.

    mogrifier-bench                          # the quick preset
    mogrifier-bench --preset seed --repeats 5
    mogrifier-bench --hidden 128,256 --rounds 0,5 --mode training
    mogrifier-bench --grid my_grid.toml
"""

from __future__ import annotations

import argparse
import contextlib
import dataclasses
import itertools
import math
import os
import platform
import statistics
import subprocess
import sys
import time
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass
from pathlib import Path

import torch
from torch import nn

import mogrifier_fast as mf
from mogrifier_fast.progress import progress_bar

LOOP = "LSTMCell loop"
LSTM = "nn.LSTM"
REFERENCE = "reference"
MODES = ("inference", "training")
DTYPES = {"float32": torch.float32, "float64": torch.float64, "bfloat16": torch.bfloat16}


@dataclass(frozen=True)
class Config:
    """One point of the grid."""

    steps: int = 35
    batch: int = 16
    input_size: int = 64
    hidden_size: int = 64
    rounds: int = 5
    rank: int | None = None
    layers: int = 1
    share_rounds: bool = False
    dtype: str = "float32"
    mode: str = "training"

    def describe(self) -> str:
        rank = "full" if self.rank is None else f"k={self.rank}"
        shared = " shared" if self.share_rounds else ""
        return (
            f"T={self.steps} N={self.batch} I={self.input_size} H={self.hidden_size} "
            f"r={self.rounds}{shared} {rank} L={self.layers} {self.dtype} {self.mode}"
        )


GRID_KEYS = {f.name for f in dataclasses.fields(Config)}


def expand(grid: dict) -> list[Config]:
    """All configurations of a grid: each key maps to a value or a list of values."""
    unknown = set(grid) - GRID_KEYS
    if unknown:
        raise ValueError(
            f"grid: unknown column(s) {sorted(unknown)}; expected some of {sorted(GRID_KEYS)}"
        )
    keys = list(grid)
    values = [v if isinstance(v, list) else [v] for v in grid.values()]
    configs = []
    for combination in itertools.product(*values):
        fields = dict(zip(keys, combination, strict=True))
        fields.setdefault("input_size", fields.get("hidden_size", Config.input_size))
        configs.append(Config(**fields))
    return configs


def sweeps(base: dict, **axes: list) -> list[dict]:
    """One grid per axis: the base configuration with that one axis varied."""
    return [{**base, axis: values} for axis, values in axes.items()]


QUICK_BASE = {"steps": 35, "batch": 16, "rounds": 5, "mode": list(MODES)}
PRESETS: dict[str, list[dict]] = {
    # The `make bench` default: the S and M sizes, both modes (a few minutes at most).
    "quick": [{**QUICK_BASE, "hidden_size": 64}, {**QUICK_BASE, "batch": 32, "hidden_size": 256}],
    # One axis at a time around a base size: what the analysis notebook plots.
    "full": sweeps(
        {"steps": 35, "batch": 32, "hidden_size": 128, "rounds": 5, "mode": list(MODES)},
        hidden_size=[32, 64, 128, 256, 512],
        batch=[1, 8, 32, 64],
        rounds=[0, 1, 2, 3, 4, 5, 6],
        steps=[35, 140],
        rank=[None, 16],
        layers=[1, 2],
    ),
    # The original notebook's character model: embedding 50, hidden 125, r=5 shared maps.
    "seed": [
        {
            "steps": 500,
            "batch": 32,
            "input_size": 50,
            "hidden_size": 125,
            "rounds": 5,
            "share_rounds": True,
            "mode": list(MODES),
        }
    ],
    # The GPU targets (benchmarks/gpu_check.py): T=70, batch 64, I=H=512, r=5, then the seed and
    # paper settings below.
    "gpu": [{"steps": 70, "batch": 64, "hidden_size": 512, "rounds": 5, "mode": list(MODES)}],
    # The paper's PTB setting: hidden ~1000 (input 1000), r=5, rank 84, batch 64, bptt 70.
    "paper": [
        {
            "steps": 70,
            "batch": 64,
            "hidden_size": 1000,
            "rounds": 5,
            "rank": 84,
            "mode": list(MODES),
        }
    ],
}


PRESETS["gpu"] += PRESETS["seed"] + PRESETS["paper"]


class LSTMCellLoop(nn.Module):
    """The usual user pattern: per layer an ``nn.LSTMCell`` in a Python loop, with one
    ``nn.Linear`` (with bias) per round (two, the first without bias, for a low-rank map;
    one per parity with shared rounds). Input (T, N, input_size) -> output (T, N, hidden)."""

    def __init__(self, config: Config) -> None:
        super().__init__()
        self.cells = nn.ModuleList()
        self.maps = nn.ModuleList()
        for layer in range(config.layers):
            x_size = config.input_size if layer == 0 else config.hidden_size
            self.cells.append(nn.LSTMCell(x_size, config.hidden_size))
            stored = min(config.rounds, 2) if config.share_rounds else config.rounds
            maps = []
            for j in range(1, stored + 1):
                out_size, in_size = (
                    (x_size, config.hidden_size) if j % 2 else (config.hidden_size, x_size)
                )
                if config.rank is None:
                    maps.append(nn.Linear(in_size, out_size))
                else:
                    maps.append(
                        nn.Sequential(
                            nn.Linear(in_size, config.rank, bias=False),
                            nn.Linear(config.rank, out_size),
                        )
                    )
            self.maps.append(nn.ModuleList(maps))
        self.rounds = config.rounds

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        for cell, maps in zip(self.cells, self.maps, strict=True):
            h = x.new_zeros(x.shape[1], cell.hidden_size)
            c = h
            outputs = []
            for x_t in x:
                for j in range(1, self.rounds + 1):
                    linear = maps[(j - 1) % len(maps)]
                    if j % 2:
                        x_t = 2 * torch.sigmoid(linear(h)) * x_t
                    else:
                        h = 2 * torch.sigmoid(linear(x_t)) * h
                h, c = cell(x_t, (h, c))
                outputs.append(h)
            x = torch.stack(outputs)
        return x


def build_model(name: str, config: Config, device: torch.device) -> nn.Module:
    """The model a candidate name stands for, at ``config``'s sizes, seeded."""
    torch.manual_seed(0)
    if name == LOOP:
        model = LSTMCellLoop(config)
    elif name == LSTM:
        model = nn.LSTM(config.input_size, config.hidden_size, num_layers=config.layers)
    else:
        model = mf.MogrifierLSTM(
            config.input_size,
            config.hidden_size,
            num_layers=config.layers,
            rounds=config.rounds,
            rank=config.rank,
            share_rounds=config.share_rounds,
            backend=name,
        )
    return model.to(device=device, dtype=DTYPES[config.dtype])


def step_function(model: nn.Module, x: torch.Tensor, mode: str) -> Callable[[], None]:
    """One timed call: a forward under no_grad (inference), or forward and backward (training)."""

    def output() -> torch.Tensor:
        result = model(x)
        return result[0] if isinstance(result, tuple) else result

    def inference() -> None:
        with torch.no_grad():
            output()

    def training() -> None:
        output().sum().backward()

    return training if mode == "training" else inference


class Timer:
    """Wall-clock seconds of one call: perf_counter on CPU; CUDA events with synchronisation."""

    def __init__(self, device: torch.device) -> None:
        self.cuda = device.type == "cuda"

    def __call__(self, function: Callable[[], None]) -> float:
        if self.cuda:
            start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            torch.cuda.synchronize()
            start.record()
            function()
            end.record()
            torch.cuda.synchronize()
            return start.elapsed_time(end) / 1e3
        begin = time.perf_counter()
        function()
        return time.perf_counter() - begin


def time_interleaved(
    candidates: dict[str, Callable[[], object]],
    repeats: int,
    warmup: int = 2,
    timer: Callable | None = None,
) -> dict[str, list[float]]:
    """Seconds per call of each candidate, the candidates run in turn within each repeat."""
    timer = timer or Timer(torch.device("cpu"))
    for function in candidates.values():
        for _ in range(warmup):
            function()
    times: dict[str, list[float]] = {name: [] for name in candidates}
    for _ in range(repeats):
        for name, function in candidates.items():
            times[name].append(timer(function))
    return times


def peak_memory_mb(function: Callable[[], None], device: torch.device) -> float:
    """Peak tensor memory (MB) allocated during one call, above what was allocated before it.

    CUDA: the caching allocator's peak statistic. CPU: torch.profiler's allocation records,
    summed in time order (each op's own allocations and frees)."""
    if device.type == "cuda":
        torch.cuda.synchronize()
        before = torch.cuda.memory_allocated(device)
        torch.cuda.reset_peak_memory_stats(device)
        function()
        torch.cuda.synchronize()
        return (torch.cuda.max_memory_allocated(device) - before) / 2**20
    from torch.profiler import ProfilerActivity, profile

    with (
        _native_stderr_silenced(),
        profile(activities=[ProfilerActivity.CPU], profile_memory=True) as prof,
    ):
        function()
    current = peak = 0
    for event in sorted(prof.events(), key=lambda e: e.time_range.start):
        current += (
            event.cpu_memory_usage if event.name == "[memory]" else event.self_cpu_memory_usage
        )
        peak = max(peak, current)
    return peak / 2**20


@contextlib.contextmanager
def _native_stderr_silenced() -> Iterator[None]:
    """Send file descriptor 2 to /dev/null for a moment: the profiler's native library logs two
    lines per session there, with no setting to turn them off."""
    sys.stderr.flush()
    saved = os.dup(2)
    try:
        with open(os.devnull, "w") as devnull:
            os.dup2(devnull.fileno(), 2)
            yield
    finally:
        os.dup2(saved, 2)
        os.close(saved)


def estimated_bytes(config: Config) -> int:
    """A generous estimate of one candidate's working memory: activations kept for the backward
    (about 8(r+4) values per hidden unit, per step, row and layer) plus parameters."""
    width = max(config.input_size, config.hidden_size)
    element = torch.finfo(DTYPES[config.dtype]).bits // 8
    activations = config.steps * config.batch * config.layers * width * 8 * (config.rounds + 4)
    parameters = config.layers * width * width * (8 + 2 * config.rounds)
    return element * (activations + parameters)


def available_memory(device: torch.device) -> int:
    """Bytes free for tensors on ``device`` (CPU: the machine's available memory)."""
    if device.type == "cuda":
        free, _ = torch.cuda.mem_get_info(device)
        return free
    try:
        with open("/proc/meminfo") as meminfo:
            fields = dict(line.split(":", 1) for line in meminfo)
        return int(fields["MemAvailable"].split()[0]) * 1024
    except (OSError, KeyError, ValueError):
        return os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_AVPHYS_PAGES")


def machine_columns(device: torch.device) -> dict[str, str]:
    """The columns that say where a row was measured."""
    device_name = torch.cuda.get_device_name(device) if device.type == "cuda" else _cpu_model()
    return {
        "device": device.type,
        "device_name": device_name,
        "torch_version": torch.__version__,
        "threads": str(torch.get_num_threads()),
        "git_commit": _git_commit(),
        "python": platform.python_version(),
    }


def _cpu_model() -> str:
    try:
        with open("/proc/cpuinfo") as cpuinfo:
            for line in cpuinfo:
                if line.startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def _git_commit() -> str:
    try:
        result = subprocess.run(
            ["git", "rev-parse", "--short", "HEAD"],
            cwd=Path(__file__).resolve().parent,
            capture_output=True,
            text=True,
            timeout=5,
            check=True,
        )
        return result.stdout.strip()
    except (OSError, subprocess.SubprocessError):
        return "unknown"


def measure(
    config: Config, candidates: list[str], device: torch.device, repeats: int, memory: bool
) -> list[dict]:
    """Time every candidate at one configuration; one result row per candidate."""
    dtype = DTYPES[config.dtype]
    torch.manual_seed(1)
    x = torch.randn(config.steps, config.batch, config.input_size, device=device, dtype=dtype)
    timer = Timer(device)
    functions, warmup_s = {}, {}
    for name in candidates:
        model = build_model(name, config, device)
        functions[name] = step_function(model, x, config.mode)
        warmup_s[name] = timer(functions[name])  # the first call: compilation, caches, allocation
    times = time_interleaved(functions, repeats, warmup=1, timer=timer)
    medians = {name: statistics.median(t) for name, t in times.items()}
    tokens = config.steps * config.batch
    rows = []
    for name, t in times.items():
        median = medians[name]
        rows.append(
            {
                "candidate": name,
                **dataclasses.asdict(config),
                "rank": "" if config.rank is None else config.rank,
                "repeats": repeats,
                "median_ms": 1e3 * median,
                "min_ms": 1e3 * min(t),
                "max_ms": 1e3 * max(t),
                "ms_per_step": 1e3 * median / config.steps,
                "tokens_per_s": tokens / median,
                "speedup_vs_reference": medians[REFERENCE] / median
                if REFERENCE in medians
                else math.nan,
                "speedup_vs_loop": medians[LOOP] / median if LOOP in medians else math.nan,
                "time_vs_lstm": median / medians[LSTM] if LSTM in medians else math.nan,
                "warmup_s": warmup_s[name],
                "peak_memory_mb": peak_memory_mb(functions[name], device) if memory else math.nan,
            }
        )
    return rows


def append_rows(path: Path, rows: list[dict]) -> None:
    """Append rows to a CSV as complete lines, flushed to disk: an interrupted run leaves a valid
    file holding every row written before it. A file with other columns is refused."""
    import pandas as pd

    frame = pd.DataFrame(rows)
    if path.exists() and path.stat().st_size > 0:
        existing = list(pd.read_csv(path, nrows=0).columns)
        if existing != list(frame.columns):
            raise ValueError(
                f"{path}: existing columns {existing} differ from this harness's; write to another --out"
            )
        text = frame.to_csv(index=False, header=False)
    else:
        path.parent.mkdir(parents=True, exist_ok=True)
        text = frame.to_csv(index=False)
    with open(path, "a") as file:
        file.write(text)
        file.flush()
        os.fsync(file.fileno())


def markdown_table(rows: list[dict]) -> str:
    """A summary: one line per configuration and candidate: median time, ratios, the first call
    (timed apart: it includes compilation for "compile") and peak memory."""
    header = [
        "configuration",
        "candidate",
        "median ms",
        "vs reference",
        "vs loop",
        "time vs nn.LSTM",
        "tokens/s",
        "first call s",
        "peak MB",
    ]
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    for row in rows:
        config = Config(**{k: row[k] for k in GRID_KEYS if k != "rank"}, rank=row["rank"] or None)
        cells = [
            config.describe(),
            row["candidate"],
            f"{row['median_ms']:.2f}",
            _ratio(row["speedup_vs_reference"]),
            _ratio(row["speedup_vs_loop"]),
            _ratio(row["time_vs_lstm"]),
            f"{row['tokens_per_s']:,.0f}",
            f"{row['warmup_s']:.2f}",
            "" if math.isnan(row["peak_memory_mb"]) else f"{row['peak_memory_mb']:.1f}",
        ]
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines)


def _ratio(value: float) -> str:
    return "" if math.isnan(value) else f"{value:.2f}x"


def _csv_list(kind: Callable[[str], object]) -> Callable[[str], list]:
    def parse(text: str) -> list:
        return [kind(part) for part in text.split(",") if part]

    return parse


def _rank(text: str) -> int | None:
    return None if text.lower() in ("none", "full") else int(text)


def _bool(text: str) -> bool:
    if text.lower() not in ("true", "false", "1", "0"):
        raise ValueError(f"expected true or false, got {text!r}")
    return text.lower() in ("true", "1")


FLAG_AXES = {
    "steps": int,
    "batch": int,
    "input_size": int,
    "hidden_size": int,
    "rounds": int,
    "rank": _rank,
    "layers": int,
    "share_rounds": _bool,
    "dtype": str,
    "mode": str,
}


def parse_args(argv: Iterable[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        prog="mogrifier-bench",
        description="Time every MogrifierLSTM backend against nn.LSTM and the LSTMCell-loop pattern; write CSV tables.",
    )
    parser.add_argument(
        "--preset", default=None, help=f"a named grid: {', '.join(PRESETS)} (default quick)"
    )
    parser.add_argument(
        "--grid", type=Path, help="a TOML file whose keys are grid columns, each a value or a list"
    )
    for axis, kind in FLAG_AXES.items():
        flag = "--" + axis.replace("_", "-")
        parser.add_argument(
            flag, type=_csv_list(kind), help=f"comma-separated {axis} values (a grid of its own)"
        )
    parser.add_argument(
        "--candidates",
        type=_csv_list(str),
        help=f"what to time (default: all available backends, {LSTM!r}, {LOOP!r})",
    )
    parser.add_argument("--device", default="cpu", help="cpu or cuda[:N] (default cpu)")
    parser.add_argument(
        "--repeats",
        type=int,
        default=7,
        help="interleaved timed repeats per configuration (default 7)",
    )
    parser.add_argument("--no-memory", action="store_true", help="skip the peak-memory measurement")
    parser.add_argument(
        "--out",
        type=Path,
        default=Path("bench-results"),
        help="directory of the CSV and markdown files (default bench-results)",
    )
    parser.add_argument("--name", help="CSV file stem (default: the device type and model)")
    return parser.parse_args(argv)


def grid_from_args(args: argparse.Namespace) -> list[Config]:
    """The configurations the flags ask for: a preset, a TOML grid, and/or axis flags."""
    flag_grid = {axis: getattr(args, axis) for axis in FLAG_AXES if getattr(args, axis) is not None}
    grids: list[dict] = []
    if args.grid is not None:
        grids.append(_load_toml(args.grid))
    if args.preset is not None or (not grids and not flag_grid):
        preset = args.preset or "quick"
        if preset not in PRESETS:
            raise ValueError(
                f"--preset: unknown preset {preset!r}; expected one of {list(PRESETS)}"
            )
        grids.extend(PRESETS[preset])
    if flag_grid:
        grids = (
            [{**g, **flag_grid} for g in grids] if grids else [{"mode": list(MODES), **flag_grid}]
        )
    configs = [config for grid in grids for config in expand(grid)]
    for config in configs:
        _check_config(config)
    return list(dict.fromkeys(configs))


def _load_toml(path: Path) -> dict:
    try:
        import tomllib
    except ImportError as error:  # pragma: no cover - Python 3.10
        raise ValueError("--grid: reading TOML needs Python 3.11 or later") from error
    try:
        with open(path, "rb") as file:
            return tomllib.load(file)
    except OSError as error:
        raise ValueError(f"--grid: cannot read {path}: {error.strerror}") from error
    except tomllib.TOMLDecodeError as error:
        raise ValueError(f"--grid: {path} is not valid TOML: {error}") from error


def _check_config(config: Config) -> None:
    if config.dtype not in DTYPES:
        raise ValueError(f"dtype: unknown dtype {config.dtype!r}; expected one of {list(DTYPES)}")
    if config.mode not in MODES:
        raise ValueError(f"mode: unknown mode {config.mode!r}; expected one of {list(MODES)}")
    for name in ("steps", "batch", "input_size", "hidden_size", "layers"):
        if getattr(config, name) < 1:
            raise ValueError(
                f"{name}: expected >= 1, got {getattr(config, name)} in {config.describe()}"
            )
    if config.rounds < 0:
        raise ValueError(f"rounds: expected >= 0, got {config.rounds}")


def resolve_candidates(requested: list[str] | None, device: torch.device) -> list[str]:
    available = mf.available_backends(device)
    known = [*available, LSTM, LOOP]
    if requested is None:
        return [LOOP, LSTM, *available]
    for name in requested:
        if name not in known:
            raise ValueError(
                f"--candidates: unknown or unavailable candidate {name!r} on {device}; expected some of {known}"
            )
    return requested


def resolve_device(text: str) -> torch.device:
    try:
        device = torch.device(text)
    except RuntimeError as error:
        raise ValueError(f"--device: {error}") from error
    if device.type == "cuda" and not torch.cuda.is_available():
        raise ValueError(
            "--device: CUDA was asked for, but torch.cuda.is_available() is False on this machine"
        )
    if device.type not in ("cpu", "cuda"):
        raise ValueError(f"--device: expected cpu or cuda, got {text!r}")
    return device


def _slug(text: str) -> str:
    kept = "".join(ch.lower() if ch.isalnum() else "-" for ch in text)
    return "-".join(part for part in kept.split("-") if part)[:60]


def run(args: argparse.Namespace) -> Path:
    """Run the grid the arguments ask for; return the CSV path."""
    device = resolve_device(args.device)
    configs = grid_from_args(args)
    candidates = resolve_candidates(args.candidates, device)
    if args.repeats < 1:
        raise ValueError(f"--repeats: expected >= 1, got {args.repeats}")
    budget = available_memory(device)
    for config in configs:
        need = estimated_bytes(config) * 3  # the candidates' models are alive together
        if need > budget:
            raise ValueError(
                f"grid: {config.describe()} needs about {need / 2**30:.1f} GiB, more than the "
                f"{budget / 2**30:.1f} GiB free on {device}; use smaller sizes"
            )
    columns = machine_columns(device)
    stem = args.name or f"{device.type}-{_slug(columns['device_name'])}"
    label = args.preset or (
        "grid" if args.grid or any(getattr(args, a) is not None for a in FLAG_AXES) else "quick"
    )
    csv_path, md_path = args.out / f"{stem}.csv", args.out / f"{stem}-{label}.md"
    print(
        f"mogrifier-bench: {len(configs)} configurations x {len(candidates)} candidates on {device} ({columns['device_name']}), {args.repeats} interleaved repeats"
    )
    all_rows = []
    bar = progress_bar(total=len(configs), desc="configurations", unit="config")
    for config in configs:
        if bar is not None:
            bar.set_postfix_str(config.describe())
        rows = [
            {**columns, **row}
            for row in measure(config, candidates, device, args.repeats, not args.no_memory)
        ]
        append_rows(csv_path, rows)
        all_rows.extend(rows)
        if bar is not None:
            bar.update(1)
    if bar is not None:
        bar.close()
    table = markdown_table(all_rows)
    md_path.write_text(
        f"# mogrifier-bench on {columns['device_name']}\n\n`{args.command}`, commit {columns['git_commit']}, torch {columns['torch_version']}, {columns['threads']} threads\n\n{table}\n"
    )
    print(table)
    print(f"\nrows appended to {csv_path}; summary written to {md_path}")
    return csv_path


def main(argv: list[str] | None = None) -> None:
    argv = sys.argv[1:] if argv is None else argv
    args = parse_args(argv)
    args.command = " ".join(["mogrifier-bench", *argv])
    try:
        run(args)
    except ValueError as error:
        print(f"mogrifier-bench: error: {error}", file=sys.stderr)
        raise SystemExit(2) from None
    except KeyboardInterrupt:
        print(
            "\nmogrifier-bench: interrupted; every finished configuration is in the CSV",
            file=sys.stderr,
        )
        raise SystemExit(130) from None


if __name__ == "__main__":
    main()
