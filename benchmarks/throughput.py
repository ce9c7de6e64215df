"""Embed throughput: the service end to end, against the in-process ceiling and resemblyzer.

What is measured, on the same N clips (4.0 s cut from the dev files at 1.0 s, as 16-bit WAV):

a. end to end: Embed calls (model ge2e_int8, WAV bytes as `audio.content`) from a grpc.aio
   client in this process to `voicegate serve` started as a separate process (state in a temp
   dir, ready when it logs "voicegate ready", SIGTERM at the end), or to `--server HOST:PORT`.
   For each client concurrency (1, 8, 32): an untimed warm-up, then every clip once with that
   many calls in flight; utterances/s, p50 and p99 latency (client side), the CPU time each
   process (front server, tritonserver, Python-backend stubs, this client) used per utterance,
   and Triton's own statistics (partials per batch, queue and compute time).
b. the in-process ceiling: the service's work without RPC or Triton:
   `server.audio.decode_content` of the same WAV bytes, `server.features.prepare_utterance`, and
   ONNX Runtime int8 (model_repository/ge2e_int8/1/model.onnx, each clip's partials as one batch,
   `server.calibration.OnnxEncoder`), averaged. Variants: `seq ort2` one clip at a time, ORT with
   2 intra-op threads (the brief's reference: both cores for ORT, none for overlap); `seq ort1`
   the same with 1 ORT thread; `2 threads ort1` two Python threads sharing a 1-thread session
   (the GIL in between); `2 procs ort1` two worker processes with a 1-thread session each, half
   the clips each: both cores busy, nothing shared, the most 2 cores give (the fair ceiling).
   Ratios are printed against `seq ort2` and against the best variant of the round.
c. resemblyzer (`preprocess_wav` + `VoiceEncoder.embed_utterance`, torch) in a subprocess, so torch
   never loads here; OPENBLAS_NUM_THREADS=1, torch with 1 and with 2 threads; the better counts.

The parts run interleaved, `--rounds` times (order reversed every other round), each after
waiting (at most `--quiet-wait` s) for a lull in the machine's load; every figure is the median
over rounds with its spread ((max - min) / median), and each ratio is taken within a round
before its median is taken. `others` is the cores other jobs used during a measurement; the
`quiet` figures keep only measurements where that stayed under 0.15 cores. With `--server`
the server's processes are not known here: their CPU counts under `others` (pass
`--triton-url` for Triton's batching statistics).

    .venv/bin/python -m benchmarks.throughput [--server HOST:PORT] [--clips 200] [--rounds 3]

Trying server settings: `--serve-env VOICEGATE_PREPROCESS_WORKERS=3`, `--model-repository DIR`
(or `benchmarks.sweep`, which compares several settings in one run).
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import os
import pickle
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable, Sequence
from concurrent.futures import ProcessPoolExecutor, ThreadPoolExecutor
from contextlib import AbstractContextManager, nullcontext
from functools import partial
from pathlib import Path
from typing import Any

import numpy as np

from benchmarks.common import (
    GRPC_OPTIONS,
    MODEL_REPOSITORY,
    ROOT,
    ServeProcess,
    accepted_clips,
    add_data_dir_argument,
    cpu_meter,
    embed_all,
    log,
    make_clips,
    median_and_spread,
    model_fingerprints,
    percentile,
    require_data_dir,
    wait_for_quiet,
)

LEVELS = (1, 8, 32)
CEILING_VARIANTS = ("seq ort2", "seq ort1", "2 threads ort1", "2 procs ort1")
RESEMBLYZER_THREADS = (1, 2)
MODEL = "ge2e_int8"
GOAL_CEILING = 0.6
GOAL_RESEMBLYZER = 1.5
# A measurement counts as quiet when other jobs used less than this many cores during it.
QUIET_CORES = 0.15


# ---------------------------------------------------------------- a. end to end


def summarize(latencies: Sequence[float], elapsed: float) -> dict[str, float]:
    return {
        "utt_per_s": len(latencies) / elapsed,
        "p50_ms": 1000 * percentile(latencies, 50),
        "p99_ms": 1000 * percentile(latencies, 99),
    }


def triton_statistics(triton_url: str | None) -> dict[str, float]:
    """Cumulative counters of the model in Triton (empty when Triton's address is unknown)."""
    if triton_url is None:
        return {}
    import tritonclient.grpc as grpcclient

    client = grpcclient.InferenceServerClient(triton_url)
    try:
        stats = client.get_inference_statistics(MODEL, as_json=True)["model_stats"][0]
    finally:
        client.close()
    inference = stats["inference_stats"]
    out = {
        "requests": float(inference["success"].get("count", 0)),
        "partials": float(stats.get("inference_count", 0)),
        "executions": float(stats.get("execution_count", 0)),
    }
    for key in ("queue", "compute_input", "compute_infer", "compute_output"):
        out[f"{key}_ns"] = float(inference[key].get("ns", 0))
    return out


def triton_delta(before: dict[str, float], after: dict[str, float]) -> dict[str, float]:
    """Average batch (partials per execution) and per-request / per-execution times in ms."""
    if not before or not after:
        return {}
    d = {k: after[k] - before[k] for k in after}
    requests, executions = max(d["requests"], 1.0), max(d["executions"], 1.0)
    return {
        "partials_per_request": d["partials"] / requests,
        "batch_partials": d["partials"] / executions,
        "requests_per_batch": d["requests"] / executions,
        "queue_ms_per_request": d["queue_ns"] / requests / 1e6,
        # Triton counts compute per request; every request of one batch gets the batch's time.
        "compute_ms_per_batch": (
            d["compute_input_ns"] + d["compute_infer_ns"] + d["compute_output_ns"]
        )
        / requests
        / 1e6,
    }


async def end_to_end(
    target: str,
    clips: Sequence[bytes],
    concurrency: int,
    server_pids: Sequence[int],
    triton_url: str | None = None,
) -> dict[str, Any]:
    """Every clip once with `concurrency` calls in flight, after an untimed warm-up."""
    import grpc

    from server.api.voicegate.v1 import audio_pb2, speaker_pb2, speaker_pb2_grpc

    requests = [
        speaker_pb2.EmbedRequest(audio=audio_pb2.Audio(content=clip), model=MODEL) for clip in clips
    ]
    async with grpc.aio.insecure_channel(target, options=GRPC_OPTIONS) as channel:
        stub = speaker_pb2_grpc.SpeakerServiceStub(channel)
        await embed_all(stub, requests[: max(16, 2 * concurrency)], concurrency)
        triton_before = triton_statistics(triton_url)
        me = os.getpid()
        with cpu_meter([me, *server_pids], {me: "client"}) as used:
            began = time.perf_counter()
            latencies = await embed_all(stub, requests, concurrency)
            elapsed = time.perf_counter() - began
        triton = triton_delta(triton_before, triton_statistics(triton_url))
    return {
        **summarize(latencies, elapsed),
        **_cpu_figures(used, elapsed, len(clips)),
        "triton": triton,
    }


def e2e_step(
    target: str,
    clips: Sequence[bytes],
    concurrency: int,
    server_pids: Sequence[int],
    triton_url: str | None,
) -> dict[str, Any]:
    return asyncio.run(end_to_end(target, clips, concurrency, server_pids, triton_url))


def _cpu_figures(used: dict[str, float], elapsed: float, count: int) -> dict[str, Any]:
    """CPU ms per utterance of each measured process, the cores they kept busy on average, and
    the cores other jobs on the machine took meanwhile (the noise)."""
    ours = sum(v for k, v in used.items() if k != "machine")
    return {
        "cpu_ms_per_utt": {k: 1000 * v / count for k, v in used.items() if k != "machine"},
        "cores_busy": ours / elapsed,
        "others_cores": max(0.0, used.get("machine", ours) - ours) / elapsed,
    }


# ---------------------------------------------------------------- b. the in-process ceiling


def embed_clip(encoder: Any, clip: bytes) -> np.ndarray:
    """The service's work for one clip, in process: decode, prepare, ORT, average."""
    from server.audio import AudioLimits, decode_content
    from server.features import prepare_utterance

    result: np.ndarray = encoder.embed(
        prepare_utterance(decode_content(clip, AudioLimits(max_seconds=600.0)), 0.5)
    )
    return result


_worker_encoder: Any = None


def _worker_init(model_path: Path, warmup: Sequence[bytes]) -> None:
    """A ceiling worker process: its own 1-thread ORT session, warmed up."""
    global _worker_encoder
    from server.calibration import OnnxEncoder

    _worker_encoder = OnnxEncoder(model_path, threads=1)
    for clip in warmup:
        embed_clip(_worker_encoder, clip)


def _worker_run(clips: Sequence[bytes]) -> tuple[list[float], float]:
    """Latencies of the clips, one after another, and the CPU seconds this worker used."""
    cpu = time.process_time()
    latencies = []
    for clip in clips:
        start = time.perf_counter()
        embed_clip(_worker_encoder, clip)
        latencies.append(time.perf_counter() - start)
    return latencies, time.process_time() - cpu


class Ceiling:
    """decode_content + prepare_utterance + ORT int8 without RPC (sessions built once).

    `seq ort2` / `seq ort1`: one clip at a time in this process, ORT with 2 / 1 intra-op threads.
    `2 threads ort1`: two Python threads of this process, one 1-thread session (the GIL limits it).
    `2 procs ort1`: two worker processes, each its own 1-thread session, half the clips each:
    both cores busy with no GIL between them, the most the pipeline gets out of 2 cores.
    """

    def __init__(self, model_path: Path, clips: Sequence[bytes]) -> None:
        import multiprocessing

        from server.calibration import OnnxEncoder

        self.encoders = {threads: OnnxEncoder(model_path, threads=threads) for threads in (1, 2)}
        self.threads = ThreadPoolExecutor(2, thread_name_prefix="ceiling")
        self.processes = ProcessPoolExecutor(
            2,
            mp_context=multiprocessing.get_context("spawn"),
            initializer=_worker_init,
            initargs=(model_path, list(clips[:5])),
        )
        # Start both workers now (their import and warm-up stay out of the timing).
        list(self.processes.map(_worker_run, [[], []]))

    def close(self) -> None:
        self.threads.shutdown()
        self.processes.shutdown()

    def timed(self, clip: bytes, threads: int) -> float:
        start = time.perf_counter()
        embed_clip(self.encoders[threads], clip)
        return time.perf_counter() - start

    def run(self, variant: str, clips: Sequence[bytes]) -> dict[str, Any]:
        if variant == "2 procs ort1":
            return self._run_processes(clips)
        run_one: Callable[[Sequence[bytes]], list[float]]
        if variant == "seq ort2":
            run_one = lambda cs: [self.timed(c, 2) for c in cs]  # noqa: E731
        elif variant == "seq ort1":
            run_one = lambda cs: [self.timed(c, 1) for c in cs]  # noqa: E731
        elif variant == "2 threads ort1":
            run_one = lambda cs: list(self.threads.map(lambda c: self.timed(c, 1), cs))  # noqa: E731
        else:
            raise ValueError(variant)
        run_one(clips[:5])
        me = os.getpid()
        with cpu_meter([me], {me: "this process"}) as used:
            began = time.perf_counter()
            latencies = run_one(clips)
            elapsed = time.perf_counter() - began
        return {**summarize(latencies, elapsed), **_cpu_figures(used, elapsed, len(clips))}

    def _run_processes(self, clips: Sequence[bytes]) -> dict[str, Any]:
        halves = [list(clips[0::2]), list(clips[1::2])]
        with cpu_meter([]) as used:
            began = time.perf_counter()
            results = list(self.processes.map(_worker_run, halves))
            elapsed = time.perf_counter() - began
        used["2 worker processes"] = sum(cpu for _, cpu in results)
        latencies = [latency for worker, _ in results for latency in worker]
        return {**summarize(latencies, elapsed), **_cpu_figures(used, elapsed, len(clips))}


# ---------------------------------------------------------------- c. resemblyzer


class Resemblyzer:
    """The persistent `benchmarks.resemblyzer_worker` subprocess (torch loads there, once)."""

    def __init__(self, clips: Sequence[bytes]) -> None:
        self._tmp = tempfile.TemporaryDirectory(prefix="voicegate-bench-")
        clips_file = Path(self._tmp.name) / "clips.pkl"
        clips_file.write_bytes(pickle.dumps(list(clips)))
        command = [sys.executable, "-m", "benchmarks.resemblyzer_worker", str(clips_file)]
        env = dict(os.environ, OPENBLAS_NUM_THREADS="1")
        self._proc = subprocess.Popen(
            command, cwd=ROOT, env=env, stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True
        )
        self._read()  # {"ready": true} once torch and the encoder are loaded

    def _read(self) -> dict[str, Any]:
        assert self._proc.stdout is not None
        line = self._proc.stdout.readline()
        if not line:
            raise RuntimeError(f"resemblyzer worker exited with code {self._proc.wait()}")
        result: dict[str, Any] = json.loads(line)
        return result

    def run(self, torch_threads: int) -> dict[str, Any]:
        assert self._proc.stdin is not None
        self._proc.stdin.write(f"{torch_threads}\n")
        self._proc.stdin.flush()
        result = self._read()
        used = {"resemblyzer process": result["cpu_s"], "machine": result["machine_busy_s"]}
        return {
            **summarize(result["latencies_s"], result["elapsed_s"]),
            **_cpu_figures(used, result["elapsed_s"], result["utterances"]),
            "torch_threads": result["torch_threads"],
        }

    def close(self) -> None:
        if self._proc.stdin is not None:
            self._proc.stdin.close()
        try:
            self._proc.wait(timeout=30)
        except subprocess.TimeoutExpired:
            self._proc.kill()
            self._proc.wait()
        self._tmp.cleanup()


# ---------------------------------------------------------------- the run


def measure(args: argparse.Namespace, clips: list[bytes]) -> dict[str, Any]:
    parts = set(args.parts)
    server: AbstractContextManager[Any]
    if "e2e" not in parts:
        server = nullcontext(None)
    elif args.server:
        server = nullcontext(args.server)
    else:
        env = dict(item.split("=", 1) for item in args.serve_env)
        server = ServeProcess(args.model_repository, env=env)
        log(f"starting voicegate serve (env {env or 'unchanged'})")
    rounds: list[dict[str, dict[str, Any]]] = []
    with contextlib.ExitStack() as stack:
        running = stack.enter_context(server)
        target = running if isinstance(running, str) or running is None else running.target
        server_pids: list[int] = running.pids() if isinstance(running, ServeProcess) else []
        triton_url = running.triton_url() if isinstance(running, ServeProcess) else args.triton_url
        if target is not None:
            clips = asyncio.run(accepted_clips(target, clips))  # every part gets the same clips
        ceiling = None
        if "ceiling" in parts:
            ceiling = Ceiling(args.ceiling_model, clips)
            stack.callback(ceiling.close)
        resemblyzer = None
        if "resemblyzer" in parts:
            resemblyzer = Resemblyzer(clips)
            stack.callback(resemblyzer.close)
        steps: list[tuple[str, Callable[[], dict[str, Any]]]] = []
        if target is not None:
            for level in args.levels:
                run_e2e = partial(e2e_step, target, clips, level, server_pids, triton_url)
                steps.append((f"e2e c={level}", run_e2e))
        if ceiling is not None:
            for variant in CEILING_VARIANTS:
                steps.append((f"ceiling {variant}", partial(ceiling.run, variant, clips)))
        if resemblyzer is not None:
            for threads in RESEMBLYZER_THREADS:
                steps.append((f"resemblyzer torch{threads}", partial(resemblyzer.run, threads)))
        for number in range(args.rounds):
            results: dict[str, dict[str, Any]] = {}
            for name, step in steps if number % 2 == 0 else steps[::-1]:
                before = wait_for_quiet(args.quiet_wait) if args.quiet_wait > 0 else float("nan")
                results[name] = step()
                results[name]["machine_cores_before"] = before
                log(
                    f"round {number + 1}: {name:26s} {results[name]['utt_per_s']:7.1f} utt/s  "
                    f"p50 {results[name]['p50_ms']:6.1f} ms  p99 {results[name]['p99_ms']:6.1f} ms"
                )
            rounds.append(results)
    return {"rounds": rounds}


def ratios(rounds: list[dict[str, dict[str, Any]]]) -> dict[str, dict[str, Any]]:
    """Same-round ratios of e2e@8 to the ceilings and to resemblyzer (median, spread), and the
    same ratios of the medians of the quiet measurements only (`... quiet`, when there are)."""
    wanted: dict[str, list[float]] = {}
    for r in rounds:
        rate = {name: fig["utt_per_s"] for name, fig in r.items()}
        for key, value in _ratios(rate).items():
            wanted.setdefault(key, []).append(value)
    out = {key: median_and_spread(values) for key, values in wanted.items()}
    quiet: dict[str, float] = {}
    for name in rounds[0]:
        rates = [r[name]["utt_per_s"] for r in rounds if r[name]["others_cores"] < QUIET_CORES]
        if rates:
            quiet[name] = statistics.median(rates)
    for key, value in _ratios(quiet).items():
        out[f"{key}, quiet"] = {"median": value, "spread": float("nan"), "runs": [value]}
    return out


def _ratios(rate: dict[str, float]) -> dict[str, float]:
    """The ratios of e2e@8 to whichever references `rate` holds (the best of each kind)."""
    out: dict[str, float] = {}
    e2e = rate.get("e2e c=8")
    if e2e is None:
        return out
    ceilings = {v: rate[f"ceiling {v}"] for v in CEILING_VARIANTS if f"ceiling {v}" in rate}
    if "seq ort2" in ceilings:
        out["e2e@8 / ceiling (seq ort2)"] = e2e / ceilings["seq ort2"]
    if ceilings:
        best = max(ceilings, key=lambda v: ceilings[v])
        name = "best ceiling variant" if len(ceilings) == len(CEILING_VARIANTS) else best
        out[f"e2e@8 / {name}"] = e2e / ceilings[best]
    resemblyzer = [
        rate[f"resemblyzer torch{t}"]
        for t in RESEMBLYZER_THREADS
        if f"resemblyzer torch{t}" in rate
    ]
    if resemblyzer:
        out["e2e@8 / resemblyzer (best threads)"] = e2e / max(resemblyzer)
    return out


def report(figures: dict[str, Any]) -> None:
    """Print the tables; adds `summary` (medians over rounds) to `figures`."""
    rounds = figures["rounds"]
    names = list(rounds[0])
    print(
        f"\nEmbed throughput: {figures['clips']} clips of {figures['clip_seconds']} s, "
        f"{len(rounds)} rounds; models {figures['models_sha256']}.\nMedians over rounds; "
        "spread = (max - min) / median; others = cores other jobs on the machine used meanwhile; "
        f"quiet = median utt/s / count of the measurements with others < {QUIET_CORES}"
    )
    print(
        f"{'':24s} {'utt/s':>6s} {'spread':>6s} {'p50 ms':>7s} {'p99 ms':>7s} {'cores':>5s} "
        f"{'others':>6s} {'quiet':>8s}  utt/s per round | CPU ms per utterance"
    )
    summary: dict[str, Any] = {}
    for name in names:
        rows = [r[name] for r in rounds]
        rates = [row["utt_per_s"] for row in rows]
        cpu_names = sorted({k for row in rows for k in row["cpu_ms_per_utt"]})
        entry = {
            **median_and_spread(rates),
            **{
                key: statistics.median(row[key] for row in rows)
                for key in ("p50_ms", "p99_ms", "cores_busy", "others_cores")
            },
            "cpu_ms_per_utt": {
                k: statistics.median(row["cpu_ms_per_utt"].get(k, 0.0) for row in rows)
                for k in cpu_names
            },
        }
        if rows[0].get("triton"):
            entry["triton"] = {
                k: statistics.median(row["triton"][k] for row in rows) for k in rows[0]["triton"]
            }
        summary[name] = entry
        per_round = " ".join(f"{v:.0f}" for v in rates)
        quiet = [row["utt_per_s"] for row in rows if row["others_cores"] < QUIET_CORES]
        entry["quiet_utt_per_s"] = statistics.median(quiet) if quiet else None
        entry["quiet_measurements"] = len(quiet)
        quiet_text = f"{statistics.median(quiet):5.1f}/{len(quiet)}" if quiet else "-"
        cpu_text = ", ".join(f"{k} {v:.1f}" for k, v in entry["cpu_ms_per_utt"].items())
        print(
            f"{name:24s} {entry['median']:6.1f} {entry['spread']:6.0%} {entry['p50_ms']:7.1f} "
            f"{entry['p99_ms']:7.1f} {entry['cores_busy']:5.2f} {entry['others_cores']:6.2f} "
            f"{quiet_text:>8s}  "
            f"{per_round} | {cpu_text}"
        )
    figures["summary"] = summary
    triton_rows = [name for name in names if "triton" in summary[name]]
    if triton_rows:
        print(
            f"\n{'Triton ' + MODEL:24s} {'partials/request':>16s} {'partials/batch':>14s} "
            f"{'requests/batch':>14s} {'queue ms':>8s} {'batch compute ms':>16s}"
        )
    for name in triton_rows:
        t = summary[name]["triton"]
        print(
            f"{name:24s} {t['partials_per_request']:16.2f} {t['batch_partials']:14.1f} "
            f"{t['requests_per_batch']:14.2f} {t['queue_ms_per_request']:8.1f} "
            f"{t['compute_ms_per_batch']:16.1f}"
        )
    goals = {
        "e2e@8 / ceiling (seq ort2)": GOAL_CEILING,
        "e2e@8 / resemblyzer (best threads)": GOAL_RESEMBLYZER,
    }
    if figures["ratios"]:
        print("\nratios, each within one round (median; per round; spread)")
    for key, stats in figures["ratios"].items():
        goal = goals.get(key)
        verdict = ""
        if goal is not None:
            verdict = f"  goal >= {goal}: {'met' if stats['median'] >= goal else 'NOT met'}"
            if min(stats["runs"]) < goal <= stats["median"]:
                verdict += " (not in every round)"
        if key.endswith(", quiet"):
            print(f"  {key:43s} {stats['median']:5.2f}  (medians of quiet measurements)")
            continue
        runs = " ".join(f"{v:.2f}" for v in stats["runs"])
        print(f"  {key:43s} {stats['median']:5.2f}  ({runs}; {stats['spread']:.0%}){verdict}")


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=(__doc__ or "").splitlines()[0])
    parser.add_argument("--server", help="HOST:PORT of a running voicegate (default: start one)")
    add_data_dir_argument(parser)
    parser.add_argument("--clips", type=int, default=200)
    parser.add_argument("--clip-seconds", type=float, default=4.0)
    parser.add_argument("--clip-start", type=float, default=1.0)
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--levels", type=int, nargs="+", default=list(LEVELS))
    parser.add_argument(
        "--parts",
        nargs="+",
        choices=("e2e", "ceiling", "resemblyzer"),
        default=["e2e", "ceiling", "resemblyzer"],
    )
    parser.add_argument(
        "--model-repository", type=Path, help="for the started server (default: its own)"
    )
    parser.add_argument(
        "--ceiling-model",
        type=Path,
        default=MODEL_REPOSITORY / MODEL / "1" / "model.onnx",
        help="ONNX file for the in-process ceiling",
    )
    parser.add_argument(
        "--serve-env",
        action="append",
        default=[],
        metavar="NAME=VALUE",
        help="environment for the started server (repeatable)",
    )
    parser.add_argument(
        "--triton-url", help="with --server: its Triton's gRPC HOST:PORT, for batching statistics"
    )
    parser.add_argument(
        "--quiet-wait",
        type=float,
        default=5.0,
        help="before each part wait up to this many seconds for a lull in the machine's load",
    )
    parser.add_argument("--json", type=Path, help="write every figure here")
    args = parser.parse_args(argv)
    args.data_dir = require_data_dir(parser, args.data_dir)
    if any("=" not in item for item in args.serve_env):
        parser.error("--serve-env takes NAME=VALUE")

    began = time.monotonic()
    clips = make_clips(args.data_dir, args.clips, args.clip_start, args.clip_seconds)
    log(f"{len(clips)} clips of {args.clip_seconds} s from {args.data_dir}")
    figures: dict[str, Any] = {
        "clips": len(clips),
        "clip_seconds": args.clip_seconds,
        "server": args.server or "voicegate serve subprocess",
        "serve_env": args.serve_env,
        "model_repository": str(args.model_repository or "default"),
        "models_sha256": model_fingerprints(args.model_repository),
        "threads_env": {k: os.environ.get(k) for k in ("OPENBLAS_NUM_THREADS", "OMP_NUM_THREADS")},
        "cpu_count": os.cpu_count(),
        "load_average_before": os.getloadavg(),
    }
    figures.update(measure(args, clips))
    figures["load_average_after"] = os.getloadavg()
    figures["ratios"] = ratios(figures["rounds"])
    figures["elapsed_s"] = round(time.monotonic() - began, 1)
    report(figures)
    print(
        f"\nload average before {figures['load_average_before'][0]:.2f}, "
        f"after {figures['load_average_after'][0]:.2f}; {figures['elapsed_s']} s in all"
    )
    if args.json:
        args.json.write_text(json.dumps(figures, indent=2) + "\n")
        log(f"wrote {args.json}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
