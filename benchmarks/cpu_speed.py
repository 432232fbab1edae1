"""CPU speed of the Mogrifier backends against the usual user pattern, side by side in one process.

The usual pattern is an ``nn.LSTMCell`` in a Python loop with one ``nn.Linear`` (with bias) per
round. Every candidate runs the same configuration; repeats are interleaved (each repeat runs every
candidate once, in turn) and the median is reported, with min and max. Peak tensor memory of one
forward+backward is measured apart, from torch.profiler's allocation records.

    python benchmarks/cpu_speed.py                 # S and M, train and inference
    python benchmarks/cpu_speed.py --repeats 30 --memory
"""

from __future__ import annotations

import argparse
import statistics

import torch
from torch import nn
from torch.profiler import ProfilerActivity, profile

import mogrifier_fast as mf
from mogrifier_fast.bench import time_interleaved

CONFIGS = {
    "S": {"steps": 35, "batch": 16, "size": 64, "rounds": 5},
    "M": {"steps": 35, "batch": 32, "size": 256, "rounds": 5},
}


class LSTMCellLoop(nn.Module):
    """The common user pattern: nn.LSTMCell in a Python loop, one nn.Linear per round."""

    def __init__(self, input_size: int, hidden_size: int, rounds: int) -> None:
        super().__init__()
        self.cell = nn.LSTMCell(input_size, hidden_size)
        self.maps = nn.ModuleList(
            nn.Linear(hidden_size, input_size) if j % 2 else nn.Linear(input_size, hidden_size)
            for j in range(1, rounds + 1)
        )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = x.new_zeros(x.shape[1], self.cell.hidden_size)
        c = h
        outputs = []
        for x_t in x:
            for j, linear in enumerate(self.maps, start=1):
                if j % 2:
                    x_t = 2 * torch.sigmoid(linear(h)) * x_t
                else:
                    h = 2 * torch.sigmoid(linear(x_t)) * h
            h, c = self.cell(x_t, (h, c))
            outputs.append(h)
        return torch.stack(outputs)


def candidates(size: int, rounds: int) -> dict[str, nn.Module]:
    """Every model timed, by name: the user pattern, nn.LSTM, and each CPU backend."""
    torch.manual_seed(0)
    models: dict[str, nn.Module] = {
        "LSTMCell loop": LSTMCellLoop(size, size, rounds),
        "nn.LSTM": nn.LSTM(size, size),
    }
    for backend in mf.available_backends("cpu"):
        models[backend] = mf.MogrifierLSTM(size, size, rounds=rounds, backend=backend)
    return models


def output_of(model: nn.Module, x: torch.Tensor) -> torch.Tensor:
    result = model(x)
    return result[0] if isinstance(result, tuple) else result


def step(model: nn.Module, x: torch.Tensor, train: bool):
    def train_step() -> None:
        output_of(model, x).sum().backward()

    def inference_step() -> None:
        with torch.no_grad():
            output_of(model, x)

    return train_step if train else inference_step


def peak_memory_mb(model: nn.Module, x: torch.Tensor) -> float:
    """Peak tensor memory (MB) of one forward+backward, from torch.profiler's allocation records:
    the running sum of every op's own allocations and frees, in time order, from the state
    after a warm-up step with gradients cleared (parameters and input not counted)."""
    train_step = step(model, x, True)
    train_step()
    model.zero_grad(set_to_none=True)
    with profile(activities=[ProfilerActivity.CPU], profile_memory=True) as prof:
        train_step()
    current = peak = 0
    for event in sorted(prof.events(), key=lambda e: e.time_range.start):
        current += (
            event.cpu_memory_usage if event.name == "[memory]" else event.self_cpu_memory_usage
        )
        peak = max(peak, current)
    return peak / 2**20


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--configs", default="S,M", help="comma-separated names from CONFIGS")
    parser.add_argument("--repeats", type=int, default=21, help="interleaved timed repeats")
    parser.add_argument("--memory", action="store_true", help="also measure peak memory (train)")
    args = parser.parse_args()
    print(
        f"torch {torch.__version__}, {torch.get_num_threads()} threads, float32, median of {args.repeats} interleaved repeats"
    )
    for config in args.configs.split(","):
        c = CONFIGS[config]
        x = torch.randn(c["steps"], c["batch"], c["size"])
        models = candidates(c["size"], c["rounds"])
        for train in (True, False):
            times = time_interleaved(
                {name: step(m, x, train) for name, m in models.items()}, args.repeats
            )
            baseline = statistics.median(times["LSTMCell loop"])
            lstm = statistics.median(times["nn.LSTM"])
            mode = "forward+backward" if train else "forward (no_grad)"
            print(
                f"\n{config}: T={c['steps']} N={c['batch']} I=H={c['size']} r={c['rounds']}, {mode}"
            )
            print(
                f"  {'model':15s} {'median ms':>10s} {'min':>8s} {'max':>8s} {'vs loop':>8s} {'vs nn.LSTM':>10s}"
            )
            for name, t in times.items():
                median = statistics.median(t)
                print(
                    f"  {name:15s} {1e3 * median:10.2f} {1e3 * min(t):8.2f} {1e3 * max(t):8.2f}"
                    f" {baseline / median:7.2f}x {median / lstm:9.2f}x"
                )
        if args.memory:
            print(f"\n{config}: peak tensor memory of one forward+backward (torch.profiler)")
            for name, model in models.items():
                print(f"  {name:15s} {peak_memory_mb(model, x):8.1f} MB")


if __name__ == "__main__":
    main()
