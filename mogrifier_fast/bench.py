"""The timing harness behind ``mogrifier-bench``.

For now it times the pure-Python reference against ``nn.LSTM`` at one small configuration,
forward and backward, with interleaved repeats; the full grid, presets and CSV tables come with
the benchmark harness.
"""

from __future__ import annotations

import argparse
import statistics
import time
from collections.abc import Callable

import torch
from torch import nn

import mogrifier_fast as mf


def time_interleaved(
    candidates: dict[str, Callable[[], object]], repeats: int, warmup: int = 2
) -> dict[str, list[float]]:
    """Seconds per call of each candidate, the candidates run in turn within each repeat."""
    for function in candidates.values():
        for _ in range(warmup):
            function()
    times: dict[str, list[float]] = {name: [] for name in candidates}
    for _ in range(repeats):
        for name, function in candidates.items():
            start = time.perf_counter()
            function()
            times[name].append(time.perf_counter() - start)
    return times


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(prog="mogrifier-bench", description=__doc__.splitlines()[0])
    parser.add_argument("--steps", type=int, default=35, help="sequence length T (default 35)")
    parser.add_argument("--batch", type=int, default=16, help="batch size (default 16)")
    parser.add_argument("--hidden", type=int, default=64, help="input and hidden size (default 64)")
    parser.add_argument("--rounds", type=int, default=5, help="mogrifier rounds (default 5)")
    parser.add_argument("--repeats", type=int, default=20, help="timed repeats (default 20)")
    args = parser.parse_args(argv)
    torch.manual_seed(0)
    x = torch.randn(args.steps, args.batch, args.hidden)
    layers = {
        "reference": mf.MogrifierLSTM(
            args.hidden, args.hidden, rounds=args.rounds, backend="reference"
        ),
        "nn.LSTM": nn.LSTM(args.hidden, args.hidden),
    }

    def train_step(layer: nn.Module) -> Callable[[], None]:
        return lambda: layer(x)[0].sum().backward()

    times = time_interleaved(
        {name: train_step(layer) for name, layer in layers.items()}, args.repeats
    )
    medians = {name: statistics.median(t) for name, t in times.items()}
    print(
        f"forward+backward, T={args.steps} N={args.batch} I=H={args.hidden} r={args.rounds}, "
        f"float32, {torch.get_num_threads()} threads, median of {args.repeats} interleaved repeats"
    )
    for name, median in medians.items():
        ratio = median / medians["nn.LSTM"]
        print(f"  {name:10s} {1e3 * median:8.2f} ms   {ratio:5.1f}x nn.LSTM's time")


if __name__ == "__main__":
    main()
