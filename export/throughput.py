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
