"""ONNX Runtime throughput of an exported model on this machine, to size Triton's batching.

`python -m export.throughput model_repository` prints partials/s per model, batch size and
intra-op thread count. Short runs: on a shared 2-core machine the spread is reported too.
"""

from __future__ import annotations

import argparse
import statistics
import time
from pathlib import Path
from typing import Any

from export.onnx_export import run, session
from export.validation import random_partials

BATCHES = (1, 8, 32, 64)
THREADS = (1, 2)


def partials_per_second(
    model: Path, batch: int, threads: int, seconds: float = 0.5, repeats: int = 3
) -> dict[str, Any]:
    """Median and spread of partials/s over `repeats` timed runs of about `seconds` each."""
    sess = session(model, threads)
    mels = random_partials(batch, seed=batch)
    run(sess, mels)  # first run allocates and plans
    rates = []
    for _ in range(repeats):
        done, start = 0, time.perf_counter()
        while (elapsed := time.perf_counter() - start) < seconds:
            run(sess, mels)
            done += batch
        rates.append(done / elapsed)
    return {
        "batch": batch,
        "threads": threads,
        "partials_per_s": round(statistics.median(rates), 1),
        "spread": round((max(rates) - min(rates)) / statistics.median(rates), 3),
    }


def compare(
    models: dict[str, Path],
    batches: tuple[int, ...] = (1, 8, 32),
    rounds: int = 3,
    seconds: float = 0.3,
    threads: int = 1,
) -> dict[str, dict[str, Any]]:
    """Partials/s of several models measured in the same run, interleaved.

    Each round times every (batch, model) pair for about `seconds` of CPU time, the model
    order reversed every other round, so load from other jobs on a shared machine hits all
    alike. Per model and batch: the median over rounds of partials per second of wall time
    and per second of this process's CPU time (with one intra-op thread that is the compute
    itself, and time lost to other processes does not count), and the spread
    ((max - min) / median) of the CPU figure.
    """
    sessions = {name: session(path, threads) for name, path in models.items()}
    inputs = {batch: random_partials(batch, seed=batch) for batch in batches}
    wall: dict[tuple[str, int], list[float]] = {}
    cpu: dict[tuple[str, int], list[float]] = {}
    for sess in sessions.values():
        for mels in inputs.values():
            run(sess, mels)  # first run allocates and plans
    for index in range(rounds):
        names = list(sessions) if index % 2 == 0 else list(sessions)[::-1]
        for batch, mels in inputs.items():
            for name in names:
                sess, done = sessions[name], 0
                cpu_start, wall_start = time.process_time(), time.perf_counter()
                while (cpu_used := time.process_time() - cpu_start) < seconds:
                    run(sess, mels)
                    done += batch
                wall.setdefault((name, batch), []).append(done / (time.perf_counter() - wall_start))
                cpu.setdefault((name, batch), []).append(done / cpu_used)
    results: dict[str, dict[str, Any]] = {}
    for name in sessions:
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


def measure(model: Path, seconds: float = 0.5) -> list[dict[str, Any]]:
    return [partials_per_second(model, b, t, seconds) for t in THREADS for b in BATCHES]


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("repository", type=Path)
    parser.add_argument("--seconds", type=float, default=0.5)
    args = parser.parse_args(argv)
    for model in sorted(args.repository.glob("*/1/model.onnx")):
        for row in measure(model, args.seconds):
            print(
                f"{model.parent.parent.name:10s} threads={row['threads']} batch={row['batch']:3d} "
                f"{row['partials_per_s']:8.1f} partials/s  (spread {row['spread']:.0%})"
            )


if __name__ == "__main__":
    main()
