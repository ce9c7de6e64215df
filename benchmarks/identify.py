"""Identify's scoring latency over 1,000, 10,000 and 100,000 synthetic enrolled speakers.

What is measured: `SpeakerIndex.search`, the part of Identify that grows with the number of
enrolled speakers (the probe's own embedding and MFCC statistics cost the same as one Verify
side and are not included): the int8 first pass over every voiceprint (ONNX Runtime
MatMulInteger over prepacked blocks, above `int8_min_rows`), the float32 rescoring of the
rows its error bound cannot rule out, and the top k. Beside it, for comparison: the same index
before its blocks are packed (right after changes, `index_unpacked`), the index's float32-only
path, and plain float32 numpy (`X @ p` + argpartition over all 486-dimensional rows).

Speakers are random unit voiceprints (256) and unit standardised MFCC statistics (230); each
query is a noisy copy of one enrolled speaker (cosine ~0.7 to it), so there is a true match,
as in real identification. Every query's top k is checked against the float32 brute force.

Latency is per query, in one thread (the service's scoring thread), `--rounds` rounds of
`--queries` queries each; reported per size: the median over rounds of each round's p50, p90
and p99, and the spread (max - min) / median of the per-round p50s. The machine is shared: the
load of other processes during each size is reported as `machine_busy` (CPU-seconds of all
processes per wall second, out of `cores`).

    .venv/bin/python -m benchmarks.identify [--sizes 1000 10000 100000] [--json identify.json]
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
from collections.abc import Callable
from functools import partial
from typing import Any

import numpy as np

from benchmarks.common import log, machine_busy_seconds, median_and_spread, percentile
from server.mfcc import MFCC_DIMENSION
from server.speaker_index import SpeakerIndex

GE2E_WEIGHT = 18.8  # about the shipped calibration's weights
MFCC_WEIGHT = 10.1
MODEL_KEY = ("ge2e_int8", "ge2e_int8@1")


def unit_rows(rng: np.random.Generator, n: int, d: int) -> np.ndarray:
    rows = rng.standard_normal((n, d)).astype(np.float32)
    return rows / np.linalg.norm(rows, axis=1, keepdims=True)


def noisy_copy(rng: np.random.Generator, row: np.ndarray, noise: float) -> np.ndarray:
    out = row + noise * unit_rows(rng, 1, len(row))[0]
    return (out / np.linalg.norm(out)).astype(np.float32)


def timed(function: Callable[[], Any]) -> tuple[float, Any]:
    start = time.perf_counter()
    result = function()
    return time.perf_counter() - start, result


def measure(size: int, queries: int, rounds: int, top_k: int, seed: int) -> dict[str, Any]:
    rng = np.random.default_rng(seed)
    voiceprints = unit_rows(rng, size, 256)
    mfcc = unit_rows(rng, size, MFCC_DIMENSION)
    ids = [f"speaker-{i:06d}" for i in range(size)]
    index = SpeakerIndex(MFCC_DIMENSION)
    build_s, _ = timed(lambda: index.put_many(ids, voiceprints, mfcc, [MODEL_KEY] * size))
    pack_s, _ = timed(index.pack_now)  # the service packs in the background
    # The same index right after changes, before its blocks are packed again.
    unpacked = SpeakerIndex(MFCC_DIMENSION, pack_delay_s=float("inf"))
    unpacked.put_many(ids, voiceprints, mfcc, [MODEL_KEY] * size)
    exact = SpeakerIndex(MFCC_DIMENSION, int8=False)
    exact.put_many(ids, voiceprints, mfcc, [MODEL_KEY] * size)
    matrix = np.concatenate([voiceprints, mfcc], axis=1)

    figures: dict[str, list[dict[str, float]]] = {
        "index": [],
        "index_unpacked": [],
        "index_float32": [],
        "numpy": [],
    }
    rescored: list[int] = []
    mismatches = 0
    busy_before, wall_before = machine_busy_seconds(), time.monotonic()
    for _ in range(rounds):
        targets = rng.integers(size, size=queries)
        probes = [
            (noisy_copy(rng, voiceprints[t], 1.0), noisy_copy(rng, mfcc[t], 1.3)) for t in targets
        ]
        latencies: dict[str, list[float]] = {name: [] for name in figures}
        for embedding, statistics in probes:
            query = np.concatenate([GE2E_WEIGHT * embedding, MFCC_WEIGHT * statistics])
            search = partial(
                index.search, embedding, statistics, GE2E_WEIGHT, MFCC_WEIGHT, top_k, MODEL_KEY
            )
            seconds, result = timed(search)
            latencies["index"].append(seconds)
            rescored.append(result.rescored)
            for name, other in (("index_unpacked", unpacked), ("index_float32", exact)):
                search = partial(
                    other.search, embedding, statistics, GE2E_WEIGHT, MFCC_WEIGHT, top_k, MODEL_KEY
                )
                seconds, _ = timed(search)
                latencies[name].append(seconds)

            def brute(q: np.ndarray = query) -> np.ndarray:
                logits = matrix @ q
                best = np.argpartition(logits, size - top_k)[size - top_k :]
                return best[np.argsort(-logits[best])]

            seconds, best = timed(brute)
            latencies["numpy"].append(seconds)
            if [m.speaker_id for m in result.matches] != [ids[i] for i in best]:
                mismatches += 1
        for name, values in latencies.items():
            ms = [1e3 * v for v in values]
            figures[name].append(
                {q: percentile(ms, p) for q, p in (("p50", 50), ("p90", 90), ("p99", 99))}
                | {"max": max(ms)}
            )
    wall = time.monotonic() - wall_before
    for used in (index, unpacked, exact):
        used.close()
    report: dict[str, Any] = {
        "speakers": size,
        "top_k": top_k,
        "queries": queries * rounds,
        "build_seconds": round(build_s, 3),
        "pack_seconds": round(pack_s, 3),
        "top_k_mismatches_vs_float32": mismatches,
        "rows_rescored_median": float(np.median(rescored)),
        "machine_busy": round((machine_busy_seconds() - busy_before) / wall, 2),
    }
    for name, per_round in figures.items():
        p50 = median_and_spread([r["p50"] for r in per_round])
        report[name] = {
            "p50_ms": round(p50["median"], 3),
            "p90_ms": round(float(np.median([r["p90"] for r in per_round])), 3),
            "p99_ms": round(float(np.median([r["p99"] for r in per_round])), 3),
            "max_ms": round(max(r["max"] for r in per_round), 3),
            "p50_spread": round(p50["spread"], 3),
            "p50_by_round_ms": [round(r["p50"], 3) for r in per_round],
        }
    return report


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--sizes", type=int, nargs="+", default=[1000, 10_000, 100_000])
    parser.add_argument("--queries", type=int, default=100, help="queries per round")
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--top-k", type=int, default=5)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--json", help="also write the report here")
    args = parser.parse_args(argv)
    for name in ("OPENBLAS_NUM_THREADS", "OMP_NUM_THREADS", "MKL_NUM_THREADS"):
        if os.environ.get(name) != "1":
            parser.error(f"set {name}=1 (the service's setting) before starting Python")
    reports = []
    for size in args.sizes:
        log(f"{size} speakers: {args.rounds} rounds of {args.queries} queries")
        report = measure(size, args.queries, args.rounds, args.top_k, args.seed)
        reports.append(report)
        log(
            f"{size:>7} speakers: index p50 {report['index']['p50_ms']:.2f} ms "
            f"(p90 {report['index']['p90_ms']:.2f}, p99 {report['index']['p99_ms']:.2f}, "
            f"spread {report['index']['p50_spread']:.0%}); float32 numpy p50 "
            f"{report['numpy']['p50_ms']:.2f} ms; machine busy {report['machine_busy']}"
        )
    result = {"cores": os.cpu_count(), "sizes": reports}
    text = json.dumps(result, indent=2)
    print(text)
    if args.json:
        with open(args.json, "w", encoding="utf-8") as handle:
            handle.write(text + "\n")
    return 0 if all(r["top_k_mismatches_vs_float32"] == 0 for r in reports) else 1


if __name__ == "__main__":
    sys.exit(main())
