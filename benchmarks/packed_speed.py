"""Packed variable-length batch against the padded batch it comes from, on one backend.

At the M size (T=35, N=32, I=H=256, r=5, training: forward and backward), lengths drawn
uniformly from [T/2, T]: a packed batch does about 75% of the padded batch's work, and should
take no more than 0.85x its time. Both run interleaved in one process; medians are printed.

    python benchmarks/packed_speed.py --repeats 11 --out benchmarks/results

With ``--out``, one row per run is appended to ``<out>/packed-speed.csv`` (the machine columns
of ``mogrifier-bench``: device model, C++ variant, ISA flags, versions).
"""

from __future__ import annotations

import argparse
import statistics
import time
from pathlib import Path

import pandas as pd
import torch
from torch.nn.utils.rnn import pack_padded_sequence

import mogrifier_fast as mf
from mogrifier_fast.bench import machine_columns


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--steps", type=int, default=35)
    parser.add_argument("--batch", type=int, default=32)
    parser.add_argument("--size", type=int, default=256)
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--backend", default="fused")
    parser.add_argument("--repeats", type=int, default=11)
    parser.add_argument("--inference", action="store_true", help="forward only, no_grad")
    parser.add_argument("--out", type=Path, help="append a row to <out>/packed-speed.csv")
    args = parser.parse_args()
    torch.manual_seed(0)
    steps, batch, size = args.steps, args.batch, args.size
    layer = mf.MogrifierLSTM(size, size, rounds=args.rounds, backend=args.backend)
    x = torch.randn(steps, batch, size)
    lengths = torch.randint(steps // 2, steps + 1, (batch,))
    lengths[0] = steps
    share = lengths.sum().item() / (steps * batch)

    def run(packed: bool) -> float:
        inputs = x.clone().requires_grad_(not args.inference)
        start = time.perf_counter()
        with torch.set_grad_enabled(not args.inference):
            data = pack_padded_sequence(inputs, lengths, enforce_sorted=False) if packed else inputs
            output, (h_n, c_n) = layer(data)
            out = output.data if packed else output
            if not args.inference:
                (out.sum() + h_n.sum() + c_n.sum()).backward()
        return time.perf_counter() - start

    for packed in (False, True):  # warm-up: builds, caches
        run(packed)
    times: dict[bool, list[float]] = {False: [], True: []}
    for _ in range(args.repeats):
        for packed in (False, True):
            times[packed].append(run(packed))
    padded, packed = (statistics.median(times[k]) * 1e3 for k in (False, True))
    mode = "inference" if args.inference else "training"
    print(
        f"{args.backend} {mode} T={steps} N={batch} I=H={size} r={args.rounds}, "
        f"{torch.get_num_threads()} threads, {args.repeats} interleaved repeats (medians)"
    )
    print(f"rows run: packed {share:.1%} of padded")
    print(f"padded {padded:.2f} ms, packed {packed:.2f} ms, packed/padded {packed / padded:.3f}")
    if args.out is not None:
        row = {
            "backend": args.backend, "mode": mode, "steps": steps, "batch": batch,
            "size": size, "rounds": args.rounds, "threads": torch.get_num_threads(),
            "repeats": args.repeats, "rows_share": round(share, 4),
            "padded_ms": round(padded, 3), "packed_ms": round(packed, 3),
            "packed_over_padded": round(packed / padded, 4),
            **machine_columns(torch.device("cpu")),
        }  # fmt: skip
        args.out.mkdir(parents=True, exist_ok=True)
        path = args.out / "packed-speed.csv"
        pd.DataFrame([row]).to_csv(path, mode="a", header=not path.exists(), index=False)
        print(f"appended to {path}")


if __name__ == "__main__":
    main()
