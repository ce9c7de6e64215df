"""ONNX Runtime throughput of exported encoders on this machine, to size Triton's batching.

`python -m export.throughput model_repository` prints partials/s per encoder, batch size and
intra-op thread count. Short runs: on a shared 2-core machine the spread is reported too.
"""

from __future__ import annotations

import argparse
import functools
import statistics
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from export.onnx_export import run, session
from export.validation import Embed, random_partials

BATCHES = (1, 8, 32, 64)
THREADS = (1, 2)


def compare(
    embeds: dict[str, Embed],
    batches: Sequence[int] = (1, 8, 32),
    rounds: int = 3,
    seconds: float = 0.3,
    threads: int = 1,
) -> dict[str, dict[str, Any]]:
    """Partials/s of several models (name -> embed function) measured in the same run,
    interleaved; `threads`, the intra-op threads their sessions use, is reported with them.

    Each round times every (batch, model) pair for about `seconds` of CPU time, the model
    order reversed every other round, so load from other jobs on a shared machine hits all
    alike. Per model and batch: the median over rounds of partials per second of wall time
    and per second of this process's CPU time (with one intra-op thread that is the compute
    itself, and time lost to other processes does not count), and the spread
    ((max - min) / median) of the CPU figure.
    """
    inputs = {batch: random_partials(batch, seed=batch) for batch in batches}
    wall: dict[tuple[str, int], list[float]] = {}
    cpu: dict[tuple[str, int], list[float]] = {}
    for embed in embeds.values():
        for mels in inputs.values():
            embed(mels)  # first run allocates and plans
    for index in range(rounds):
        names = list(embeds) if index % 2 == 0 else list(embeds)[::-1]
        for batch, mels in inputs.items():
            for name in names:
                embed, done = embeds[name], 0
                cpu_start, wall_start = time.process_time(), time.perf_counter()
                while (cpu_used := time.process_time() - cpu_start) < seconds:
                    embed(mels)
                    done += batch
                wall.setdefault((name, batch), []).append(done / (time.perf_counter() - wall_start))
                cpu.setdefault((name, batch), []).append(done / cpu_used)
    results: dict[str, dict[str, Any]] = {}
    for name in embeds:
        rows = {}
        for batch in batches:
            rates = cpu[(name, batch)]
            rows[str(batch)] = {
                "partials_per_s": round(statistics.median(wall[(name, batch)]), 1),
                "partials_per_cpu_s": round(statistics.median(rates), 1),
                "spread": round((max(rates) - min(rates)) / statistics.median(rates), 3),
            }
        results[name] = {"threads": threads, "rounds": rounds, "by_batch": rows}
    return results


def speedup(results: dict[str, dict[str, Any]], model: str, baseline: str, batch: int) -> float:
    """Ratio of CPU-time partials/s of `model` to `baseline` at `batch`."""
    ours = results[model]["by_batch"][str(batch)]["partials_per_cpu_s"]
    theirs = results[baseline]["by_batch"][str(batch)]["partials_per_cpu_s"]
    return round(float(ours) / float(theirs), 3)


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("repository", type=Path)
    parser.add_argument("--seconds", type=float, default=0.5, help="CPU seconds per timing")
    args = parser.parse_args(argv)
    models = {p.parent.parent.name: p for p in sorted(args.repository.glob("ge2e_*/1/model.onnx"))}
    for threads in THREADS:
        embeds: dict[str, Embed] = {
            name: functools.partial(run, session(p, threads)) for name, p in models.items()
        }
        results = compare(embeds, BATCHES, seconds=args.seconds, threads=threads)
        for name, figures in results.items():
            for batch, row in figures["by_batch"].items():
                print(
                    f"{name:10s} threads={threads} batch={int(batch):3d} "
                    f"{row['partials_per_s']:8.1f} partials/s  (spread {row['spread']:.0%})"
                )


if __name__ == "__main__":
    main()
