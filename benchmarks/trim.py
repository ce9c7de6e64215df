"""Silence trimming, energy vs VAD: dev-set EER and Embed throughput of both, in one run.

Two `voicegate serve` processes are started side by side, identical but for
`VOICEGATE_TRIM` (`energy`: 40 dB below the recording's loudest 30 ms; `vad`: Silero VAD's
speech segments, through Triton). Both are measured on the same inputs, in the same run:

- EER: the dev recordings of `benchmarks.eer` (one per speaker, cut at a pause near the
  middle into A and B, B also degraded with the calibration's seeded degradations), embedded
  with Embed (`--model`, default the server's default encoder); EER of the Embed cosine over
  all pairs, B clean and B degraded, with a 95 % bootstrap interval over the recordings, and
  the paired difference vad - energy with its own bootstrap interval (the same resampled
  recordings for both trims, so the interval is of the difference itself).
- throughput: the 4 s WAV clips of `benchmarks.throughput` sent to Embed with `--levels`
  calls in flight, `--rounds` rounds, the two servers in alternating order each round after a
  wait for a lull; utt/s, p50, CPU per utterance of each server's processes (front server,
  tritonserver, its Python-backend stubs: the VAD runs there), and the same-round ratio
  vad / energy (median over rounds, spread = (max - min) / median).

    .venv/bin/python -m benchmarks.trim [--limit 250] [--rounds 3] [--clips 200] [--json F]
"""

from __future__ import annotations

import argparse
import asyncio
import json
import statistics
import sys
import time
from collections.abc import Sequence
from contextlib import ExitStack
from pathlib import Path
from typing import Any

import numpy as np

from benchmarks.common import (
    GRPC_OPTIONS,
    ServeProcess,
    accepted_clips,
    add_data_dir_argument,
    log,
    make_clips,
    median_and_spread,
    model_fingerprints,
    require_data_dir,
    rotating_rounds,
    wait_serving,
)
from benchmarks.eer import Recording, cosine_eer, embed_all, load_recordings
from benchmarks.throughput import e2e_step

TRIMS = ("energy", "vad")


async def embeddings_of(
    target: str, recordings: Sequence[Recording], model: str | None, concurrency: int
) -> tuple[str, dict[str, np.ndarray], dict[int, str]]:
    import grpc

    from server.api.voicegate.v1 import speaker_pb2_grpc

    await wait_serving(target, timeout_s=240)
    async with grpc.aio.insecure_channel(target, options=GRPC_OPTIONS) as channel:
        stub = speaker_pb2_grpc.SpeakerServiceStub(channel)
        if model is None:
            from benchmarks.eer import raw_audio
            from server.api.voicegate.v1 import speaker_pb2

            probe = speaker_pb2.EmbedRequest(audio=raw_audio(recordings[0].a))
            model = str((await stub.Embed(probe, timeout=120)).model)
        embeddings, refused = await embed_all(stub, recordings, model, concurrency)
    return model, embeddings, refused


def paired_difference(
    by_trim: dict[str, dict[str, np.ndarray]],
    side: str,
    bootstrap: int,
    seed: int,
    new: str = "vad",
    old: str = "energy",
) -> dict[str, Any]:
    """EER(new) - EER(old) on `side` (embeddings "a" and `side` per recording, in the same
    order for both), and its 95 % interval from resampling the recordings (the same rows for
    both in each draw)."""
    from server.calibration import equal_error_rate

    def eer(trim: str, rows: np.ndarray) -> float:
        e = by_trim[trim]
        scores = e["a"][rows] @ e[side][rows].T
        labels = rows[:, None] == rows[None, :]
        return float(equal_error_rate(scores.ravel(), labels.ravel())[0])

    n = len(by_trim[old]["a"])
    everything = np.arange(n)
    out: dict[str, Any] = {
        "delta_points": round(100 * (eer(new, everything) - eer(old, everything)), 2)
    }
    if bootstrap:
        rng = np.random.default_rng([seed, 3])
        draws = []
        for _ in range(bootstrap):
            rows = rng.integers(0, n, n)
            draws.append(eer(new, rows) - eer(old, rows))
        low, high = np.percentile(draws, [2.5, 97.5])
        out["ci95_points"] = [round(100 * float(low), 2), round(100 * float(high), 2)]
    return out


def measure_eer(
    args: argparse.Namespace, servers: dict[str, ServeProcess], recordings: list[Recording]
) -> dict[str, Any]:
    embedded: dict[str, dict[str, np.ndarray]] = {}
    refused: dict[str, dict[int, str]] = {}
    model = args.model
    timings = {}
    for trim in TRIMS:
        began = time.monotonic()
        model, embedded[trim], refused[trim] = asyncio.run(
            embeddings_of(servers[trim].target, recordings, model, args.concurrency)
        )
        timings[f"embed_{trim}_s"] = round(time.monotonic() - began, 1)
        log(f"EER embeddings, trim={trim}: {timings[f'embed_{trim}_s']} s")
    # Recordings either trim refused (too little speech) are left out of both.
    dropped = set(refused["energy"]) | set(refused["vad"])
    keep = np.asarray([i for i in range(len(recordings)) if i not in dropped])
    kept = {t: {side: v[keep] for side, v in e.items()} for t, e in embedded.items()}
    result: dict[str, Any] = {
        "model": model,
        "recordings": len(keep),
        "refused": {
            t: {recordings[i].name: why for i, why in r.items()} for t, r in refused.items()
        },
        "one_same_speaker_miss_points": round(100 / len(keep), 2),
        "timings": timings,
    }
    for side in ("b_clean", "b_degraded"):
        result[side] = {
            trim: cosine_eer(kept[trim]["a"], kept[trim][side], args.bootstrap, args.seed)
            for trim in TRIMS
        }
        result[side]["vad - energy"] = paired_difference(kept, side, args.bootstrap, args.seed)
    return result


def measure_throughput(
    args: argparse.Namespace, servers: dict[str, ServeProcess], all_clips: list[bytes]
) -> dict[str, Any]:
    # Only the clips both trims accept (the VAD finds too little speech in a few 4 s cuts).
    clips = all_clips
    for trim in TRIMS:
        clips = asyncio.run(accepted_clips(servers[trim].target, clips))
    log(f"throughput on the {len(clips)} of {len(all_clips)} clips both trims accept")
    # The two trims in alternating order each round.
    rounds = rotating_rounds(
        {trim: servers[trim] for trim in TRIMS},
        args.levels,
        args.rounds,
        lambda server, level: e2e_step(
            server.target, clips, level, server.pids(), server.triton_url()
        ),
        args.quiet_wait,
    )
    summary: dict[str, Any] = {}
    for level in args.levels:
        for trim in TRIMS:
            key = f"{trim} c={level}"
            rows = [r[key] for r in rounds]
            cpu_names = sorted({k for row in rows for k in row["cpu_ms_per_utt"]})
            summary[key] = {
                "utt_per_s": median_and_spread([row["utt_per_s"] for row in rows]),
                "p50_ms": statistics.median(row["p50_ms"] for row in rows),
                "p99_ms": statistics.median(row["p99_ms"] for row in rows),
                "others_cores": statistics.median(row["others_cores"] for row in rows),
                "cpu_ms_per_utt": {
                    k: statistics.median(row["cpu_ms_per_utt"].get(k, 0.0) for row in rows)
                    for k in cpu_names
                },
            }
        ratios = [
            r[f"vad c={level}"]["utt_per_s"] / r[f"energy c={level}"]["utt_per_s"] for r in rounds
        ]
        summary[f"vad / energy c={level}"] = median_and_spread(ratios)
    return {"summary": summary, "rounds": rounds, "clips_used": len(clips)}


def print_report(figures: dict[str, Any]) -> None:
    e = figures["eer"]
    print(
        f"\nEER, Embed cosine ({e['model']}), {e['recordings']} recordings (one per speaker); "
        f"one same-speaker miss = {e['one_same_speaker_miss_points']} points"
    )
    print(f"{'':12s} {'energy (95% CI)':>20s} {'vad (95% CI)':>20s} {'vad - energy (95% CI)':>26s}")
    for side in ("b_clean", "b_degraded"):
        row = e[side]
        cells = []
        for trim in TRIMS:
            fig = row[trim]
            ci = fig.get("ci95_percent")
            cells.append(
                f"{fig['eer_percent']:.2f}%" + (f" ({ci[0]:.1f}-{ci[1]:.1f})" if ci else "")
            )
        delta = row["vad - energy"]
        ci = delta.get("ci95_points")
        text = f"{delta['delta_points']:+.2f}" + (f" ({ci[0]:+.2f}..{ci[1]:+.2f})" if ci else "")
        print(f"{side:12s} {cells[0]:>20s} {cells[1]:>20s} {text:>26s}")
    t = figures["throughput"]["summary"]
    print(
        f"\nEmbed throughput, {figures['throughput']['clips_used']} clips of "
        f"{figures['clip_seconds']} s (of {figures['clips']}: those both trims accept), "
        f"{figures['rounds']} rounds (median; spread)"
    )
    for key, value in t.items():
        if key.startswith("vad / energy"):
            runs = " ".join(f"{v:.2f}" for v in value["runs"])
            print(f"  {key:22s} ratio {value['median']:.2f} ({runs}; {value['spread']:.0%})")
            continue
        cpu = ", ".join(f"{k} {v:.1f}" for k, v in value["cpu_ms_per_utt"].items())
        print(
            f"  {key:22s} {value['utt_per_s']['median']:6.1f} utt/s "
            f"({value['utt_per_s']['spread']:.0%})  p50 {value['p50_ms']:.0f} ms  "
            f"p99 {value['p99_ms']:.0f} ms  others {value['others_cores']:.2f} cores | "
            f"CPU ms/utt: {cpu}"
        )


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=(__doc__ or "").splitlines()[0])
    add_data_dir_argument(parser)
    parser.add_argument("--limit", type=int, help="first N speakers only for the EER")
    parser.add_argument("--model", help="encoder for the EER (default: the server's default)")
    parser.add_argument("--concurrency", type=int, default=8, help="for the EER embeddings")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--bootstrap", type=int, default=200)
    parser.add_argument("--clips", type=int, default=200)
    parser.add_argument("--clip-seconds", type=float, default=4.0)
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--levels", type=int, nargs="+", default=[8])
    parser.add_argument("--quiet-wait", type=float, default=5.0)
    parser.add_argument("--json", type=Path)
    args = parser.parse_args(argv)
    data_dir = require_data_dir(parser, args.data_dir)

    began = time.monotonic()
    log(f"splitting and degrading the dev recordings of {data_dir}")
    recordings = load_recordings(data_dir, args.seed, args.limit)
    clips = make_clips(data_dir, args.clips, 1.0, args.clip_seconds)
    figures: dict[str, Any] = {
        "data_dir": str(data_dir),
        "models_sha256": model_fingerprints(),
        "clips": len(clips),
        "clip_seconds": args.clip_seconds,
        "rounds": args.rounds,
    }
    with ExitStack() as stack:
        servers = {}
        for trim in TRIMS:
            log(f"starting voicegate serve with VOICEGATE_TRIM={trim}")
            servers[trim] = stack.enter_context(ServeProcess(env={"VOICEGATE_TRIM": trim}))
        figures["eer"] = measure_eer(args, servers, recordings)
        log("EER: " + json.dumps({k: v for k, v in figures["eer"].items() if k != "refused"}))
        figures["throughput"] = measure_throughput(args, servers, clips)
    figures["elapsed_s"] = round(time.monotonic() - began, 1)
    print_report(figures)
    print(f"\n{figures['elapsed_s']} s in all")
    if args.json:
        args.json.write_text(json.dumps(figures, indent=2, default=str) + "\n")
        log(f"wrote {args.json}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
