"""What tracing costs: Embed throughput with tracing at 100 % sampling against tracing off.

Two `voicegate serve` processes (each with its embedded Triton, model ge2e_int8 only) run side
by side; the pair is replaced by fresh processes `--restarts` times over the rounds, because a
process's own speed moved whole runs of the same code by several per cent (+3.5 % to +8.1 %):

- `off`: `OTEL_SDK_DISABLED=true`: no spans, no trace context to Triton, Triton untraced.
- `on`:  `OTEL_TRACES_SAMPLER=always_on` and `OTEL_EXPORTER_OTLP_ENDPOINT` at an OTLP/HTTP
  receiver in this process: every request traced in the front server (protobuf export, by the
  default `span_export`, native) and in Triton (JSON export, started with the trace flags the
  server derives, rate=1).
- `sdk` (optional, `--configs off,on,sdk`): `on` with `VOICEGATE_SPAN_EXPORT=sdk`, the spans
  encoded and sent by the OpenTelemetry SDK's own Python exporter.
- `nosink` (optional, `--configs off,nosink,on`): the default without an endpoint, spans made
  (trace ids in the logs) but exported nowhere.

The receiver reads each export and answers 200 without parsing it (a collector's work is done
elsewhere in production); it counts requests and bytes per content type, protobuf from the front
server and JSON from Triton, so the run shows that both exported. `on` exports at least every
second (`OTEL_BSP_SCHEDULE_DELAY=1000`, passed on to Triton) and each measurement counts CPU for
`--settle-s` after its last call, so a run's export work is charged to that run.

Each round drives every config once with the same requests (`--clips` WAV clips of 4 s, as
`audio.content`, less those with too little speech for the server's trimming, which `off` refuses
once before the rounds; `--concurrency` calls in flight, after a short warm-up), in an order that
alternates every round, each measurement started in a lull of the machine's other load where
one comes (`wait_for_quiet`). Per round: utterances/s and the CPU time the server processes
(front server, tritonserver, Python-backend stub) used per utterance. The cost is taken within
each round (on vs off of the same round), then its median and range over rounds are reported:
other jobs share the two cores, so single figures move; the CPU per utterance moves less.

    .venv/bin/python -m benchmarks.tracing_cost [--rounds 16] [--restarts 4] [--clips 400]
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import statistics
import threading
import time
from collections.abc import Sequence
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

from benchmarks.common import (
    GRPC_OPTIONS,
    ServeProcess,
    accepted_clips,
    add_data_dir_argument,
    cpu_meter,
    embed_all,
    log,
    make_clips,
    require_data_dir,
    wait_for_quiet,
)

MODEL = "ge2e_int8"
CLIP_SECONDS = 4.0
BUDGET = 0.05  # the most throughput tracing may cost


class SinkReceiver:
    """OTLP/HTTP receiver that counts and drops: requests and bytes by content type."""

    def __init__(self) -> None:
        self.counts: dict[str, list[int]] = {}
        lock = threading.Lock()
        counts = self.counts

        class Handler(BaseHTTPRequestHandler):
            def do_POST(self) -> None:
                size = int(self.headers.get("Content-Length") or 0)
                self.rfile.read(size)
                kind = (self.headers.get("Content-Type") or "?").split(";")[0]
                with lock:
                    entry = counts.setdefault(kind, [0, 0])
                    entry[0] += 1
                    entry[1] += size
                reply = b"{}" if kind == "application/json" else b""
                self.send_response(200)
                self.send_header("Content-Type", kind)
                self.send_header("Content-Length", str(len(reply)))
                self.end_headers()
                self.wfile.write(reply)

            def log_message(self, *args: object) -> None:
                pass

        self._server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self._thread = threading.Thread(target=self._server.serve_forever, daemon=True)
        self._thread.start()
        self.url = f"http://127.0.0.1:{self._server.server_address[1]}"

    def snapshot(self) -> dict[str, tuple[int, int]]:
        return {kind: (entry[0], entry[1]) for kind, entry in self.counts.items()}

    def close(self) -> None:
        self._server.shutdown()
        self._server.server_close()


def config_env(name: str, receiver: SinkReceiver) -> dict[str, str]:
    """The environment of one config's server (empty values unset inherited OTEL_* ones)."""
    env = {
        "VOICEGATE_ENCODER_MODELS": MODEL,
        "VOICEGATE_ENCODER_MODEL": MODEL,
        "OTEL_SDK_DISABLED": "",
        "OTEL_EXPORTER_OTLP_ENDPOINT": "",
        "OTEL_EXPORTER_OTLP_TRACES_ENDPOINT": "",
        "OTEL_TRACES_SAMPLER": "",
        "OTEL_TRACES_EXPORTER": "",
        "VOICEGATE_SPAN_EXPORT": "native",
    }
    if name == "off":
        env["OTEL_SDK_DISABLED"] = "true"
    elif name in ("on", "sdk"):
        env["OTEL_EXPORTER_OTLP_ENDPOINT"] = receiver.url
        env["OTEL_TRACES_SAMPLER"] = "always_on"
        env["OTEL_SERVICE_NAME"] = "voicegate-bench"
        # Export at least every second (front server and Triton), so that a measurement's
        # export work falls inside its own CPU window rather than the next config's.
        env["OTEL_BSP_SCHEDULE_DELAY"] = "1000"
        if name == "sdk":
            env["VOICEGATE_SPAN_EXPORT"] = "sdk"
    elif name != "nosink":
        raise SystemExit(f"unknown config {name!r}: use off, nosink, on, sdk")
    return env


async def drive(
    target: str, clips: Sequence[bytes], args: argparse.Namespace, pids: Sequence[int]
) -> tuple[float, dict[str, float]]:
    """An untimed warm-up, then every clip with `--concurrency` calls in flight: the seconds
    that took and the CPU seconds each server process used meanwhile."""
    import grpc

    from server.api.voicegate.v1 import audio_pb2, speaker_pb2, speaker_pb2_grpc

    requests = [
        speaker_pb2.EmbedRequest(audio=audio_pb2.Audio(content=clip), model=MODEL) for clip in clips
    ]
    async with grpc.aio.insecure_channel(target, options=GRPC_OPTIONS) as channel:
        stub = speaker_pb2_grpc.SpeakerServiceStub(channel)
        await embed_all(stub, requests[: args.warm_up], args.concurrency)
        await asyncio.sleep(args.settle_s)
        wait_for_quiet(args.quiet_wait_s)
        me = os.getpid()
        with cpu_meter([me, *pids], {me: "client", pids[0]: "front server"}) as used:
            began = time.perf_counter()
            await embed_all(stub, requests, args.concurrency)
            elapsed = time.perf_counter() - began
            # Spans still queued are exported within the schedule delay: count that CPU too.
            await asyncio.sleep(args.settle_s)
    return elapsed, used


def measure(server: ServeProcess, clips: Sequence[bytes], args: argparse.Namespace) -> dict:
    elapsed, used = asyncio.run(drive(server.target, clips, args, server.pids()))
    server_cpu = sum(v for k, v in used.items() if k not in ("machine", "client"))
    ours = server_cpu + used.get("client", 0.0)
    return {
        "utt_per_s": len(clips) / elapsed,
        "server_cpu_ms_per_utt": 1000 * server_cpu / len(clips),
        "front_cpu_ms_per_utt": 1000 * used.get("front server", 0.0) / len(clips),
        "client_cpu_ms_per_utt": 1000 * used.get("client", 0.0) / len(clips),
        "cpu_ms_per_utt_by_process": {
            k: 1000 * v / len(clips) for k, v in used.items() if k not in ("machine", "client")
        },
        "others_cores": max(0.0, used["machine"] - ours) / (elapsed + args.settle_s),
    }


def run_round(
    servers: dict[str, ServeProcess],
    configs: Sequence[str],
    clips: Sequence[bytes],
    args: argparse.Namespace,
    index: int,
) -> dict[str, dict]:
    """Every config measured once, in an order that alternates with the round's index."""
    order = configs if index % 2 == 0 else list(reversed(configs))
    results = {name: measure(servers[name], clips, args) for name in order}
    line = "  ".join(
        f"{name} {r['utt_per_s']:6.2f} utt/s {r['server_cpu_ms_per_utt']:6.1f} cpu-ms/utt"
        f" (others {r['others_cores']:.2f} cores)"
        for name, r in results.items()
    )
    log(f"round {index + 1}/{args.rounds}: {line}")
    return results


def summary(values: Sequence[float]) -> str:
    return (
        f"median {statistics.median(values):+.1%} "
        f"(range {min(values):+.1%} .. {max(values):+.1%}, n={len(values)})"
    )


def pooled_rate(rounds: Sequence[dict[str, dict]], name: str) -> float:
    """Utterances per second over every round of one config (harmonic: total / total time)."""
    return len(rounds) / sum(1 / r[name]["utt_per_s"] for r in rounds)


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    add_data_dir_argument(parser)
    parser.add_argument("--rounds", type=int, default=16)
    parser.add_argument(
        "--clips", type=int, default=400, help="Embed calls per measurement (about 3.5 s)"
    )
    parser.add_argument("--concurrency", type=int, default=8)
    parser.add_argument(
        "--restarts",
        type=int,
        default=4,
        help="start fresh server processes this many times over the rounds (instance effects)",
    )
    parser.add_argument("--warm-up", type=int, default=16)
    parser.add_argument("--configs", default="off,on", help="comma-separated: off, nosink, on, sdk")
    parser.add_argument("--quiet-wait-s", type=float, default=5.0)
    parser.add_argument(
        "--settle-s", type=float, default=1.5, help="idle time after each run, CPU still counted"
    )
    parser.add_argument("--json", type=Path, help="write every figure here")
    args = parser.parse_args(argv)
    data_dir = require_data_dir(parser, args.data_dir)
    configs = [c.strip() for c in args.configs.split(",") if c.strip()]
    if "off" not in configs:
        parser.error("--configs needs off, the reference")

    clips = make_clips(data_dir, args.clips, 1.0, CLIP_SECONDS)
    receiver = SinkReceiver()
    rounds: list[dict[str, dict]] = []
    groups = max(1, min(args.restarts, args.rounds))
    try:
        for group in range(groups):
            count = args.rounds // groups + (group < args.rounds % groups)
            # A fresh pair, started in alternating order: a process's own speed (its memory
            # layout, hash seed, where its threads land) moved whole runs by several per cent.
            starts = configs if group % 2 == 0 else list(reversed(configs))
            servers = {name: ServeProcess(env=config_env(name, receiver)) for name in starts}
            try:
                for name, server in servers.items():
                    log(f"starting {name} (servers {group + 1}/{groups})")
                    server.start()
                if group == 0:
                    clips = asyncio.run(accepted_clips(servers["off"].target, clips))
                for _ in range(count):
                    rounds.append(run_round(servers, configs, clips, args, len(rounds)))
            finally:
                for server in servers.values():
                    server.stop()
    finally:
        receiver.close()
    exports = receiver.snapshot()

    print(
        f"\nEmbed, {len(clips)} clips of {CLIP_SECONDS:.0f} s, {args.concurrency} in flight, "
        f"{args.rounds} rounds (config order alternating) on {groups} fresh server pairs, "
        f"model {MODEL}"
    )
    print(
        f"{'config':8s} {'utt/s median':>13s} {'range':>17s} {'server cpu-ms/utt':>18s} "
        f"{'of it front':>12s} {'others cores':>13s}"
    )
    for name in configs:
        rates = [r[name]["utt_per_s"] for r in rounds]
        cpus = [r[name]["server_cpu_ms_per_utt"] for r in rounds]
        front = [r[name]["front_cpu_ms_per_utt"] for r in rounds]
        others = [r[name]["others_cores"] for r in rounds]
        print(
            f"{name:8s} {statistics.median(rates):13.2f} "
            f"{min(rates):8.2f}..{max(rates):<8.2f} {statistics.median(cpus):18.1f} "
            f"{statistics.median(front):12.1f} {statistics.median(others):13.2f}"
        )
    print("server CPU ms per utterance by process (medians):")
    for name in configs:
        by_process = [r[name]["cpu_ms_per_utt_by_process"] for r in rounds]
        processes = sorted({p for figures in by_process for p in figures})
        parts = [
            f"{p} {statistics.median(f.get(p, 0.0) for f in by_process):.2f}" for p in processes
        ]
        print(f"  {name:8s} " + ", ".join(parts))
    verdicts = {}
    for name in configs:
        if name == "off":
            continue
        cost = [1 - r[name]["utt_per_s"] / r["off"]["utt_per_s"] for r in rounds]
        cpu = [
            r[name]["server_cpu_ms_per_utt"] / r["off"]["server_cpu_ms_per_utt"] - 1 for r in rounds
        ]
        ok = statistics.median(cost) <= BUDGET
        verdicts[name] = ok
        print(f"\n{name} vs off, within each round:")
        print(f"  throughput cost      {summary(cost)}  -> {'within' if ok else 'OVER'} 5 %")
        print(f"  server CPU per utt   {summary(cpu)}")
        front = [r[name]["front_cpu_ms_per_utt"] - r["off"]["front_cpu_ms_per_utt"] for r in rounds]
        print(
            f"  front-server CPU per utt {statistics.median(front):+.2f} ms "
            f"(range {min(front):+.2f} .. {max(front):+.2f})"
        )
        # Pooled over rounds (total calls / total time of each config): a second estimate that
        # weighs every measured second alike, so one disturbed round moves it less.
        pooled = 1 - pooled_rate(rounds, name) / pooled_rate(rounds, "off")
        print(f"  throughput cost, pooled over rounds {pooled:+.1%}")
    print(
        "\nexports received (requests, bytes): front server (protobuf) "
        f"{exports.get('application/x-protobuf', (0, 0))}, Triton (JSON) "
        f"{exports.get('application/json', (0, 0))}"
    )
    if args.json:
        settings = {k: str(v) if isinstance(v, Path) else v for k, v in vars(args).items()}
        report = {"args": settings, "rounds": rounds, "exports": exports}
        args.json.write_text(json.dumps(report, indent=1))
    return 0 if all(verdicts.values()) else 1


if __name__ == "__main__":
    raise SystemExit(main())
