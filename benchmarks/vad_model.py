"""Silero VAD through the real Triton: how many frames per Triton request (the window) to ship.

    .venv/bin/python -m benchmarks.vad_model [--rounds 5] [--recordings 8] [--seconds 15] [--json F]

Starts the embedded Triton with only `silero_vad` from model_repository/ (export it first:
`voicegate export --target cpu --vad-only`), then measures, in the same run and interleaved:

- `ort-sequence` (baseline): the wheel's silero_vad_16k_sequence.onnx in process, ONNX Runtime
  with one thread, one whole recording per run: the model's cost without any serving.
- `chunk`: server/vad_model.TritonVad with 1 frame per request, state carried (what a
  per-chunk client such as silero's own VADIterator does);
- `window-16/32/64/128`: windows of 16, 32, 64 or 128 frames per request (0.5 to 4 s);
- `whole`: the whole recording in one request.

Each at client concurrency 1 (the recordings one after another) and 8 (eight streams at once,
each its own recording). Reported per mode: frames/s (all frames / wall time), the latency
per second of audio (each stream's wall time / its audio seconds; median over streams), CPU
seconds per 1 000 frames (this process plus tritonserver and its Python stub, from /proc: the
figure least disturbed by other jobs on a shared machine), `others` (cores other processes
used meanwhile), and each figure as a ratio to the baseline of the same round, median over
rounds with its spread. Every mode's probabilities are also checked against the baseline's
(max abs diff).
"""

from __future__ import annotations

import argparse
import asyncio
import json
import statistics
import sys
import tempfile
import time
from collections.abc import Awaitable, Callable
from pathlib import Path
from typing import Any

import numpy as np

from benchmarks.common import (
    MODEL_REPOSITORY,
    add_data_dir_argument,
    cpu_meter,
    log,
    median_and_spread,
    process_tree,
    require_data_dir,
    wait_for_quiet,
)

BASELINE = "ort-sequence"
# 16/32/64 are the candidates; 128 shows where the per-request overhead stops mattering.
WINDOWS = (16, 32, 64, 128)
CONCURRENCY = (1, 8)


def load_recordings(data_dir: Path, count: int, seconds: float) -> list[np.ndarray]:
    from server.audio import load_file
    from server.vad_model import FRAME_SAMPLES, SAMPLE_RATE

    files = sorted(data_dir.glob("*.flac"))[:count]
    out = []
    for path in files:
        samples = load_file(str(path))[: int(seconds * SAMPLE_RATE)]
        out.append(samples[: len(samples) // FRAME_SAMPLES * FRAME_SAMPLES])
    return out


Stream = Callable[[np.ndarray], Awaitable[np.ndarray]]


async def measure(
    run: Stream, recordings: list[np.ndarray], concurrency: int, pids: list[int]
) -> tuple[dict[str, float], list[np.ndarray]]:
    """Run every recording as one stream, `concurrency` streams at a time."""
    from server.vad_model import FRAME_SAMPLES, SAMPLE_RATE

    latencies: list[float] = []
    results: list[np.ndarray] = [np.zeros(0)] * len(recordings)
    queue = list(enumerate(recordings))

    async def worker() -> None:
        while queue:
            index, samples = queue.pop(0)
            started = time.perf_counter()
            results[index] = await run(samples)
            latencies.append((time.perf_counter() - started) / (len(samples) / SAMPLE_RATE))

    frames = sum(len(r) // FRAME_SAMPLES for r in recordings)
    with cpu_meter(pids) as used:
        started = time.perf_counter()
        await asyncio.gather(*(worker() for _ in range(concurrency)))
        wall = time.perf_counter() - started
    ours = sum(v for k, v in used.items() if k != "machine")
    return {
        "frames_per_s": frames / wall,
        "ms_per_audio_s": 1000 * statistics.median(latencies),
        "cpu_s_per_1k_frames": 1000 * ours / frames,
        "others_cores": max(0.0, used["machine"] - ours) / wall,
    }, results


async def benchmark(args: argparse.Namespace) -> dict[str, Any]:
    from export.vad import sequence_model_path, session
    from server.config import Settings
    from server.triton_client import TritonClient
    from server.triton_process import EmbeddedTriton
    from server.vad_model import TritonVad

    recordings = load_recordings(args.data_dir, args.recordings, args.seconds)
    sequence = session(sequence_model_path())

    async def baseline(samples: np.ndarray) -> np.ndarray:
        from server.vad_model import VadState, frames_of

        h = np.zeros((1, 1, 128), np.float32)
        (probs, _, _) = sequence.run(
            None, {"input": frames_of(samples, VadState.initial().context), "h": h, "c": h}
        )
        return np.asarray(probs, np.float32)

    with tempfile.TemporaryDirectory(prefix="voicegate-bench-") as tmp:
        settings = Settings.load(
            {"model_repository": args.model_repository, "state_dir": Path(tmp)}, environ={}
        )
        async with (
            EmbeddedTriton(settings, models=["silero_vad"]) as triton,
            TritonClient(triton.grpc_url) as client,
        ):
            assert triton.pid is not None
            pids = [*process_tree(triton.pid), *process_tree(_own_pid())]

            def triton_mode(window: int | None) -> Stream:
                async def run(samples: np.ndarray) -> np.ndarray:
                    frames = window or max(1, len(samples) // 512)
                    probs, _ = await TritonVad(client, window_frames=frames).probabilities(samples)
                    return probs

                return run

            modes: dict[str, Stream] = {
                BASELINE: baseline,
                "chunk": triton_mode(1),
                **{f"window-{w}": triton_mode(w) for w in WINDOWS},
                "whole": triton_mode(None),
            }
            await modes["window-32"](recordings[0])  # warm-up: first load of the ORT session
            rows: dict[str, list[dict[str, float]]] = {}
            accuracy: dict[str, float] = {}
            expected = [await baseline(r) for r in recordings]
            for round_index in range(args.rounds):
                order = list(modes.items())
                if round_index % 2:
                    order.reverse()
                wait_for_quiet(3.0)
                figures = {}
                for name, run in order:
                    for concurrency in CONCURRENCY:
                        if name == BASELINE and concurrency > 1:
                            continue  # in process, one thread: concurrency changes nothing
                        key = f"{name}@{concurrency}"
                        figures[key], got = await measure(run, recordings, concurrency, pids)
                        diff = max(
                            float(np.max(np.abs(g - e))) for g, e in zip(got, expected, strict=True)
                        )
                        accuracy[name] = max(accuracy.get(name, 0.0), diff)
                        log(f"round {round_index + 1} {key}: {_fmt(figures[key])}")
                base = figures[f"{BASELINE}@1"]
                for key, values in figures.items():
                    values["frames_per_s_vs_baseline"] = (
                        values["frames_per_s"] / base["frames_per_s"]
                    )
                    values["latency_vs_baseline"] = (
                        values["ms_per_audio_s"] / base["ms_per_audio_s"]
                    )
                    values["cpu_vs_baseline"] = (
                        values["cpu_s_per_1k_frames"] / base["cpu_s_per_1k_frames"]
                    )
                    rows.setdefault(key, []).append(values)
    audio_s = sum(len(r) for r in recordings) / 16000
    summary = {
        key: {metric: median_and_spread([r[metric] for r in runs]) for metric in runs[0]}
        for key, runs in rows.items()
    }
    return {
        "recordings": len(recordings),
        "audio_seconds": round(audio_s, 1),
        "rounds": args.rounds,
        "max_abs_diff_vs_baseline": accuracy,
        "results": summary,
    }


def _own_pid() -> int:
    import os

    return os.getpid()


def _fmt(values: dict[str, float]) -> str:
    return (
        f"{values['frames_per_s']:8.0f} frames/s, {values['ms_per_audio_s']:7.2f} ms per audio s, "
        f"{values['cpu_s_per_1k_frames']:6.3f} CPU s/1k frames, others {values['others_cores']:.2f}"
    )


def print_table(report: dict[str, Any]) -> None:
    print(
        f"Silero VAD: {report['recordings']} recordings, {report['audio_seconds']} s of audio, "
        f"median of {report['rounds']} rounds (spread of the ratio in brackets)"
    )
    print(
        f"{'mode@concurrency':18s} {'frames/s':>9s} {'x base':>12s} {'ms/audio s':>11s} "
        f"{'x base':>12s} {'CPU s/1k fr':>11s} {'x base':>12s} {'others':>6s} {'max diff':>9s}"
    )
    for key, r in report["results"].items():
        name = key.split("@")[0]
        speed, latency = r["frames_per_s_vs_baseline"], r["latency_vs_baseline"]
        cpu = r["cpu_vs_baseline"]
        print(
            f"{key:18s} {r['frames_per_s']['median']:9.0f} "
            f"{speed['median']:6.3f} ({speed['spread']:3.0%}) "
            f"{r['ms_per_audio_s']['median']:11.2f} "
            f"{latency['median']:6.2f} ({latency['spread']:3.0%}) "
            f"{r['cpu_s_per_1k_frames']['median']:11.3f} "
            f"{cpu['median']:6.2f} ({cpu['spread']:3.0%}) "
            f"{r['others_cores']['median']:6.2f} "
            f"{report['max_abs_diff_vs_baseline'][name]:9.2g}"
        )


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    add_data_dir_argument(parser)
    parser.add_argument("--model-repository", type=Path, default=MODEL_REPOSITORY)
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--recordings", type=int, default=8)
    parser.add_argument("--seconds", type=float, default=15.0, help="of each recording (at most)")
    parser.add_argument("--json", type=Path, help="write the full report here")
    args = parser.parse_args(argv)
    args.data_dir = require_data_dir(parser, args.data_dir)
    if not (args.model_repository / "silero_vad" / "1" / "model.onnx").is_file():
        parser.error("silero_vad not exported: voicegate export --target cpu --vad-only")
    started = time.perf_counter()
    report = asyncio.run(benchmark(args))
    report["seconds"] = round(time.perf_counter() - started, 1)
    print_table(report)
    if args.json:
        args.json.write_text(json.dumps(report, indent=2) + "\n")
    print(f"({report['seconds']} s; spread: (max - min) / median over rounds)", file=sys.stderr)
    return 0


if __name__ == "__main__":
    sys.exit(main())
