"""The timing harness behind ``mogrifier-bench``: CSV speed tables of every backend.

For each configuration of a grid (sequence length, batch, sizes, rounds, rank, layers, dtype,
mode, threads) it times, side by side in one process with interleaved repeats: every available
backend of :class:`~mogrifier_fast.MogrifierLSTM` (the pure-Python ``reference`` included),
``nn.LSTM`` (a plain LSTM of the same sizes: the ceiling) and ``LSTMCell loop`` (the usual user
pattern: an ``nn.LSTMCell`` in a Python loop with one ``nn.Linear`` per round). On request also
``fused[<variant>]`` (backend ``fused`` with one variant of its C++ loops forced, or
``fused[python]``, its Python loops), ``persistent[rows]`` / ``persistent[grid]`` (backend
``persistent`` with its plan forced) and ``MogrifierLSTMCell`` (stacked cells, stepped in a
Python loop). Mode ``generation`` times single-token generation: T=1 calls, the state carried.
Rows are appended to one CSV per device, CPU model and default variant as each configuration
finishes, so an interrupted run keeps every finished row.

    mogrifier-bench                          # the quick preset
    mogrifier-bench --preset seed --repeats 5
    mogrifier-bench --preset isa             # every C++ variant this CPU runs, side by side
    mogrifier-bench --preset generation      # one token at a time, batch 1, 1 thread
    mogrifier-bench --hidden-size 128,256 --rounds 0,5 --mode training
    mogrifier-bench --grid my_grid.toml
"""

from __future__ import annotations

import argparse
import contextlib
import dataclasses
import functools
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
from mogrifier_fast.backends import fused_chain
from mogrifier_fast.progress import progress_bar

LOOP = "LSTMCell loop"
LSTM = "nn.LSTM"
CELL = "MogrifierLSTMCell"
FUSED = "fused"
PERSISTENT = "persistent"
REFERENCE = "reference"
MODES = ("inference", "training", "generation")
DEFAULT_MODES = ("inference", "training")  # what grids without a mode, and the presets, time
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
    threads: int = 0  # torch's intra-op threads while measuring; 0: leave torch's setting

    def describe(self) -> str:
        rank = "full" if self.rank is None else f"k={self.rank}"
        shared = " shared" if self.share_rounds else ""
        threads = f" {self.threads} thread{'s' if self.threads > 1 else ''}" if self.threads else ""
        return (
            f"T={self.steps} N={self.batch} I={self.input_size} H={self.hidden_size} "
            f"r={self.rounds}{shared} {rank} L={self.layers} {self.dtype} {self.mode}{threads}"
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


QUICK_BASE = {"steps": 35, "batch": 16, "rounds": 5, "mode": list(DEFAULT_MODES)}
PRESETS: dict[str, list[dict]] = {
    # The `make bench` default: the S and M sizes, both modes (a few minutes at most).
    "quick": [{**QUICK_BASE, "hidden_size": 64}, {**QUICK_BASE, "batch": 32, "hidden_size": 256}],
    # One axis at a time around a base size: what the analysis notebook plots.
    "full": sweeps(
        {"steps": 35, "batch": 32, "hidden_size": 128, "rounds": 5, "mode": list(DEFAULT_MODES)},
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
            "mode": list(DEFAULT_MODES),
        }
    ],
    # The GPU targets (benchmarks/gpu_check.py): T=70, batch 64, I=H=512, r=5, then the seed and
    # paper settings below.
    "gpu": [
        {"steps": 70, "batch": 64, "hidden_size": 512, "rounds": 5, "mode": list(DEFAULT_MODES)}
    ],
    # The paper's PTB setting: hidden ~1000 (input 1000), r=5, rank 84, batch 64, bptt 70.
    "paper": [
        {
            "steps": 70,
            "batch": 64,
            "hidden_size": 1000,
            "rounds": 5,
            "rank": 84,
            "mode": list(DEFAULT_MODES),
        }
    ],
    # Single-token generation (a language model sampling): 32 T=1 calls per timed call, the
    # state carried, batch 1, two layers, one thread; candidates: GENERATION_CANDIDATES.
    "generation": [
        {
            "steps": 32,
            "batch": 1,
            "hidden_size": 256,
            "rounds": 5,
            "layers": 2,
            "threads": 1,
            "mode": "generation",
        }
    ],
}


PRESETS["gpu"] += PRESETS["seed"] + PRESETS["paper"]
# Every variant of the C++ loops this CPU runs (candidates: isa_candidates()) at S, M and the
# seed notebook's size.
PRESETS["isa"] = PRESETS["quick"] + PRESETS["seed"]


State = list[tuple[torch.Tensor, torch.Tensor]]


class StepLoop(nn.Module):
    """A stack of cells run one step at a time in a Python loop: subclasses define ``step``.
    Input (T, N, input_size) -> output (T, N, hidden), zero initial state."""

    def step(self, x_t: torch.Tensor, state: State | None) -> tuple[torch.Tensor, State]:
        """One step of every layer: x_t (N, input_size), state one (h, c) per layer, each
        (N, hidden), or None for zeros -> (the last layer's h (N, hidden), the new state)."""
        raise NotImplementedError

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        state, outputs = None, []
        for x_t in x:
            h, state = self.step(x_t, state)
            outputs.append(h)
        return torch.stack(outputs)


class LSTMCellLoop(StepLoop):
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

    def step(self, x_t: torch.Tensor, state: State | None) -> tuple[torch.Tensor, State]:
        new_state = []
        for layer, (cell, maps) in enumerate(zip(self.cells, self.maps, strict=True)):
            if state is None:
                h = c = x_t.new_zeros(x_t.shape[0], cell.hidden_size)
            else:
                h, c = state[layer]
            for j in range(1, self.rounds + 1):
                linear = maps[(j - 1) % len(maps)]
                if j % 2:
                    x_t = 2 * torch.sigmoid(linear(h)) * x_t
                else:
                    h = 2 * torch.sigmoid(linear(x_t)) * h
            h, c = cell(x_t, (h, c))
            new_state.append((h, c))
            x_t = h
        return x_t, new_state


class MogrifierCellStack(StepLoop):
    """Candidate ``MogrifierLSTMCell``: one :class:`~mogrifier_fast.MogrifierLSTMCell` per layer,
    stepped in a Python loop. Input (T, N, input_size) -> output (T, N, hidden)."""

    def __init__(self, config: Config) -> None:
        super().__init__()
        self.cells = nn.ModuleList(
            mf.MogrifierLSTMCell(
                config.input_size if layer == 0 else config.hidden_size,
                config.hidden_size,
                rounds=config.rounds,
                rank=config.rank,
                share_rounds=config.share_rounds,
            )
            for layer in range(config.layers)
        )

    def step(self, x_t: torch.Tensor, state: State | None) -> tuple[torch.Tensor, State]:
        new_state = []
        for layer, cell in enumerate(self.cells):
            x_t, c = cell(x_t, None if state is None else state[layer])
            new_state.append((x_t, c))
        return x_t, new_state


def variant_of(name: str) -> str | None:
    """The variant a candidate name forces: "fused[avx2]" -> "avx2"; None for other names."""
    prefix = f"{FUSED}["
    return name[len(prefix) : -1] if name.startswith(prefix) and name.endswith("]") else None


def variant_candidate(variant: str) -> str:
    """The candidate name that runs backend "fused" with ``variant`` forced: "fused[avx2]"."""
    return f"{FUSED}[{variant}]"


def plan_of(name: str) -> str | None:
    """The persistent plan a candidate name forces: "persistent[grid]" -> "grid", else None."""
    prefix = f"{PERSISTENT}["
    return name[len(prefix) : -1] if name.startswith(prefix) and name.endswith("]") else None


@contextlib.contextmanager
def _plan_forced(plan: str) -> Iterator[None]:
    """Within: backend "persistent" runs ``plan`` (``MOGRIFIER_PERSISTENT_PLAN``)."""
    saved = os.environ.get("MOGRIFIER_PERSISTENT_PLAN")
    os.environ["MOGRIFIER_PERSISTENT_PLAN"] = plan
    try:
        yield
    finally:
        if saved is None:
            del os.environ["MOGRIFIER_PERSISTENT_PLAN"]
        else:
            os.environ["MOGRIFIER_PERSISTENT_PLAN"] = saved


def backend_of(name: str) -> str:
    """The backend a candidate name runs: "fused[avx2]" -> "fused", "persistent[grid]" ->
    "persistent", a backend's own name -> itself."""
    if variant_of(name) is not None:
        return FUSED
    return PERSISTENT if plan_of(name) is not None else name


def candidate_context(name: str) -> contextlib.AbstractContextManager:
    """What a candidate's build and calls run within: its C++ variant or persistent plan
    forced, or nothing."""
    variant, plan = variant_of(name), plan_of(name)
    if variant is not None:
        return fused_chain.variant(variant)
    return contextlib.nullcontext() if plan is None else _plan_forced(plan)


def build_model(name: str, config: Config, device: torch.device) -> nn.Module:
    """The model a candidate name stands for, at ``config``'s sizes, seeded."""
    torch.manual_seed(0)
    if name == LOOP:
        model = LSTMCellLoop(config)
    elif name == CELL:
        model = MogrifierCellStack(config)
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
            backend=backend_of(name),
        )
    return model.to(device=device, dtype=DTYPES[config.dtype])


def step_function(model: nn.Module, x: torch.Tensor, mode: str) -> Callable[[], None]:
    """One timed call on x (T, N, input_size): a forward under no_grad (inference), forward and
    backward (training), or T single-step calls under no_grad, each call's state fed to the next
    (generation: ``out, hx = model(x[t:t+1], hx)``; ``model.step(x[t], state)`` for a StepLoop)."""

    def output() -> torch.Tensor:
        result = model(x)
        return result[0] if isinstance(result, tuple) else result

    def inference() -> None:
        with torch.no_grad():
            output()

    def training() -> None:
        output().sum().backward()

    def generation() -> None:
        with torch.no_grad():
            if isinstance(model, StepLoop):
                state = None
                for x_t in x:
                    _, state = model.step(x_t, state)
            else:
                hx = None
                for t in range(x.shape[0]):
                    _, hx = model(x[t : t + 1], hx)

    return {"training": training, "inference": inference, "generation": generation}[mode]


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
    """The columns that say where a row was measured: the device and its model, the default
    variant of the C++ loops (CPU; "python" where they are not built), the CPU's vector
    instructions, versions. (The threads a row ran with are its ``threads`` column.)"""
    device_name = torch.cuda.get_device_name(device) if device.type == "cuda" else _cpu_model()
    return {
        "device": device.type,
        "device_name": device_name,
        "variant": fused_chain.default_variant() if device.type == "cpu" else "",
        "isa_flags": isa_flags(),
        "torch_version": torch.__version__,
        "git_commit": _git_commit(),
        "python": platform.python_version(),
    }


def isa_flags(cpuinfo: str | None = None, machine: str | None = None) -> str:
    """The CPU's widest vector instructions, from /proc/cpuinfo's flags (or the text
    ``cpuinfo``): "avx512f", "avx2+fma", "neon" (ARM's asimd), "baseline", or "unknown"."""
    if cpuinfo is None:
        try:
            cpuinfo = Path("/proc/cpuinfo").read_text()
        except OSError:
            cpuinfo = ""
    flags: set[str] = set()
    for line in cpuinfo.splitlines():
        key, _, value = line.partition(":")
        if key.strip() in ("flags", "Features"):
            flags = set(value.split())
            break
    machine = machine or platform.machine()
    if "avx512f" in flags:
        return "avx512f"
    if {"avx2", "fma"} <= flags:
        return "avx2+fma"
    if "asimd" in flags or (not flags and machine.lower() in ("arm64", "aarch64")):
        return "neon"
    return "baseline" if flags else "unknown"


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
    """Time every candidate at one configuration, with ``config.threads`` torch threads (0:
    torch's setting); one result row per candidate. Its ``threads`` column: the threads used."""
    with torch_threads(config.threads) as threads:
        return _measure(config, candidates, device, repeats, memory, threads)


@contextlib.contextmanager
def torch_threads(count: int) -> Iterator[int]:
    """Within the block torch runs ``count`` intra-op threads (0: its setting as it is); yields
    the count in force. The setting before is restored after."""
    previous = torch.get_num_threads()
    if count:
        torch.set_num_threads(count)
    try:
        yield torch.get_num_threads()
    finally:
        if count:
            torch.set_num_threads(previous)


def _within(
    context: Callable[[], contextlib.AbstractContextManager], function: Callable[[], None]
) -> Callable[[], None]:
    """``function`` run inside a fresh ``context()`` at every call."""

    def call() -> None:
        with context():
            function()

    return call


def _measure(
    config: Config,
    candidates: list[str],
    device: torch.device,
    repeats: int,
    memory: bool,
    threads: int,
) -> list[dict]:
    dtype = DTYPES[config.dtype]
    torch.manual_seed(1)
    x = torch.randn(config.steps, config.batch, config.input_size, device=device, dtype=dtype)
    timer = Timer(device)
    functions, warmup_s = {}, {}
    for name in candidates:
        with candidate_context(name):
            model = build_model(name, config, device)
        function = step_function(model, x, config.mode)
        if backend_of(name) != name:
            function = _within(functools.partial(candidate_context, name), function)
        functions[name] = function
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
                "threads": threads,
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
    """A summary: one line per configuration and candidate: median time (per call and per step:
    per token in mode generation), ratios, the first call (timed apart: it includes compilation
    for "compile"), peak memory and the threads it ran with."""
    header = [
        "configuration",
        "candidate",
        "median ms",
        "ms per step",
        "vs reference",
        "vs loop",
        "time vs nn.LSTM",
        "tokens/s",
        "first call s",
        "peak MB",
        "threads",
    ]
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    for row in rows:
        fields = {k: row[k] for k in GRID_KEYS if k not in ("rank", "threads")}
        config = Config(**fields, rank=row["rank"] or None)  # threads: a column of its own
        cells = [
            config.describe(),
            row["candidate"],
            f"{row['median_ms']:.2f}",
            f"{row['ms_per_step']:.3f}",
            _ratio(row["speedup_vs_reference"]),
            _ratio(row["speedup_vs_loop"]),
            _ratio(row["time_vs_lstm"]),
            f"{row['tokens_per_s']:,.0f}",
            f"{row['warmup_s']:.2f}",
            "" if math.isnan(row["peak_memory_mb"]) else f"{row['peak_memory_mb']:.1f}",
            str(row["threads"]),
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
    "threads": int,
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
        help=f"what to time: backends, {LSTM!r}, {LOOP!r}, {CELL!r}, 'fused[<variant>]' (a "
        "variant of the C++ loops forced, or 'fused[python]'), 'persistent[rows]' or "
        "'persistent[grid]' (a persistent plan forced); default: all available backends, "
        f"{LSTM!r} and {LOOP!r}, or the preset's own (isa, generation)",
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
        default=None,
        help="directory of the CSV and markdown files (default bench-results; with --predict: "
        "only printed unless given)",
    )
    parser.add_argument(
        "--predict",
        action="store_true",
        help="measure nothing: print the modelled time of the GPU backends and nn.LSTM on one "
        "NVIDIA H200 for the grid's configurations (float32, tf32, bfloat16 unless --dtype; "
        "see mogrifier_fast.predict), and write --out/predicted-h200.csv when --out is given",
    )
    parser.add_argument(
        "--name",
        help="CSV file stem (default: the device type and model, and on CPU the default variant)",
    )
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
            [{**g, **flag_grid} for g in grids]
            if grids
            else [{"mode": list(DEFAULT_MODES), **flag_grid}]
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
    if config.threads < 0:
        raise ValueError(f"threads: expected >= 0 (0: torch's setting), got {config.threads}")


def known_candidates(device: torch.device) -> list[str]:
    """Every candidate name that runs on ``device``: the available backends, on CPU
    "fused[<variant>]" for each variant that runs here, "persistent[rows]" and
    "persistent[grid]" where it runs, then the Python-loop patterns."""
    available = mf.available_backends(device)
    variants = fused_chain.variants() if device.type == "cpu" and FUSED in available else []
    plans = [f"{PERSISTENT}[{p}]" for p in ("rows", "grid")] if PERSISTENT in available else []
    return [*available, *map(variant_candidate, variants), *plans, CELL, LSTM, LOOP]


def isa_candidates() -> list[str]:
    """Preset isa's candidates: the loop and nn.LSTM, then "fused[<variant>]" for every variant
    that runs here, best first, "fused[python]" last."""
    return [LOOP, LSTM, *map(variant_candidate, fused_chain.variants())]


GENERATION_CANDIDATES = [LOOP, LSTM, CELL, FUSED, variant_candidate(fused_chain.PYTHON_LOOPS)]
# The candidates of a preset that has its own (the others: every backend, nn.LSTM, the loop).
PRESET_CANDIDATES: dict[str, Callable[[], list[str]]] = {
    "isa": isa_candidates,
    "generation": lambda: list(GENERATION_CANDIDATES),
}


def resolve_candidates(
    requested: list[str] | None, device: torch.device, preset: str | None = None
) -> list[str]:
    """The candidates to time: ``requested`` (each checked), else the preset's own, else every
    available backend, nn.LSTM and the loop."""
    known = known_candidates(device)
    if requested is None:
        if preset in PRESET_CANDIDATES:
            return [name for name in PRESET_CANDIDATES[preset]() if name in known]
        return [LOOP, LSTM, *mf.available_backends(device)]
    for name in requested:
        if name not in known:
            raise ValueError(
                f"--candidates: unknown or unavailable candidate {name!r} on {device}"
                f"{_why_not(name, device)}; expected some of {known}"
            )
    return requested


def _why_not(name: str, device: torch.device) -> str:
    """Why a "fused[<variant>]" candidate does not run here ("" for other names)."""
    variant = variant_of(name)
    if variant is None:
        return ""
    if device.type != "cpu":
        return " (the C++ loops' variants run on CPU only)"
    if variant in fused_chain.unrunnable_isas():
        return f" (variant {variant!r} is built, but this CPU lacks its instructions)"
    reason = fused_chain.unavailable_reason()
    return f" (the C++ loops are not built: {reason})" if reason else ""


def _check_float32(candidates: list[str], configs: list[Config]) -> None:
    """Refuse forced C++ variants at a dtype the C++ loops do not run (they take float32)."""
    forced = [n for n in candidates if variant_of(n) not in (None, fused_chain.PYTHON_LOOPS)]
    for config in configs:
        if forced and config.dtype != "float32":
            raise ValueError(
                f"--candidates: {forced} force the C++ loops, which run float32 only; got dtype "
                f"{config.dtype!r} in {config.describe()}; drop them or use --dtype float32"
            )


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


def file_stem(columns: dict[str, str]) -> str:
    """The CSV's default stem, from machine_columns: "<device>-<model>", and on CPU the default
    variant after it ("cpu-amd-epyc-avx2"), so machines (or variants) never share a file."""
    stem = f"{columns['device']}-{_slug(columns['device_name'])}"
    return f"{stem}-{columns['variant']}" if columns["device"] == "cpu" else stem


def _slug(text: str) -> str:
    kept = "".join(ch.lower() if ch.isalnum() else "-" for ch in text)
    return "-".join(part for part in kept.split("-") if part)[:60]


def run(args: argparse.Namespace) -> Path:
    """Run the grid the arguments ask for; return the CSV path."""
    device = resolve_device(args.device)
    if args.out is None:
        args.out = Path("bench-results")
    configs = grid_from_args(args)
    candidates = resolve_candidates(args.candidates, device, args.preset)
    _check_float32(candidates, configs)
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
    stem = args.name or file_stem(columns)
    label = args.preset or (
        "grid" if args.grid or any(getattr(args, a) is not None for a in FLAG_AXES) else "quick"
    )
    csv_path, md_path = args.out / f"{stem}.csv", args.out / f"{stem}-{label}.md"
    variant = f", variant {columns['variant']}" if columns["variant"] else ""
    print(
        f"mogrifier-bench: {len(configs)} configurations x {len(candidates)} candidates on {device} ({columns['device_name']}{variant}), {args.repeats} interleaved repeats"
    )
    notes = []
    if args.preset == "isa" and device.type == "cpu":
        if fused_chain.unavailable_reason() is not None:
            notes.append(f"C++ loops not measured: {fused_chain.unavailable_reason()}")
        elif lacking := fused_chain.unrunnable_isas():
            notes.append(f"not measured here (CPU lacks them): {', '.join(lacking)}")
    for note in notes:
        print(f"mogrifier-bench: {note}")
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
    notes_text = "".join(f"{note}\n\n" for note in notes)
    md_path.write_text(
        f"# mogrifier-bench on {columns['device_name']}{variant}\n\n`{args.command}`, commit {columns['git_commit']}, torch {columns['torch_version']}, {torch.get_num_threads()} threads unless a row says otherwise, CPU {columns['isa_flags']}\n\n{notes_text}{table}\n"
    )
    print(table)
    print(f"\nrows appended to {csv_path}; summary written to {md_path}")
    return csv_path


def main(argv: list[str] | None = None) -> None:
    argv = sys.argv[1:] if argv is None else argv
    args = parse_args(argv)
    args.command = " ".join(["mogrifier-bench", *argv])
    try:
        if args.predict:
            from mogrifier_fast import predict

            predict.run(args)
        else:
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
