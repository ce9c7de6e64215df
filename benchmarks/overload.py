"""Overload: offered load far beyond what the service sustains, loopback only, bounded in time.

Against `voicegate serve` started as its own process (state in a temp dir, its default settings
unless `--limit` sets VOICEGATE_MAX_INFLIGHT_REQUESTS), Embed calls of `--clips` 4.0 s clips
(16-bit WAV, `audio.content`, `benchmarks.common.make_clips`: cut at 1.0 s from the first dev
files long enough) from a grpc.aio client here:

1. `sequential`: one call at a time for `--phase-s` / 3 s: the unloaded latency.
2. `closed`: `--concurrency` calls always in flight for `--phase-s`: the sustainable rate R.
3. `baseline`: open loop at 0.7 R (calls sent on a fixed schedule, whatever the answers) for
   `--phase-s`: the latency at a sustainable rate, the reference for the next phase.
4. `overload`: open loop at `--factor` x R for `--phase-s`: how many calls are served and
   refused (RESOURCE_EXHAUSTED; any other status is counted as an error), the latency of the
   served ones against the baseline's (same run), the refusal latency, the front server's RSS.
5. `recovery`: from the moment the overload's schedule ends, one call at a time for
   `--phase-s` / 3 s: the time to the first success (calls admitted during the overload
   drain first; new ones are refused meanwhile) and the median latency, against `sequential`.

RSS (VmRSS of the front server process, not Triton) is read before phase 1, every 0.25 s during
the overload (its maximum), and after phase 5. The client shares the machine's cores with the
server (2 on the dev machine): compare figures within one run only.

    .venv/bin/python -m benchmarks.overload [--limit 32] [--factor 4] [--phase-s 15] [--json F]
"""

from __future__ import annotations

import argparse
import asyncio
import json
import time
from collections import Counter
from collections.abc import Callable
from pathlib import Path
from typing import Any

from benchmarks.common import (
    GRPC_OPTIONS,
    ServeProcess,
    accepted_clips,
    add_data_dir_argument,
    log,
    make_clips,
    percentile,
    require_data_dir,
)
from server.config import Settings

CLIP_S = 4.0


def rss_mib(pid: int) -> float:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) / 1024
    return float("nan")


class Caller:
    """Embed calls over one channel; each call's outcome and latency."""

    def __init__(self, stub: Any, requests: list[Any]) -> None:
        self._stub = stub
        self._requests = requests
        self._next = 0

    async def call(self) -> tuple[str, float]:
        import grpc

        request = self._requests[self._next % len(self._requests)]
        self._next += 1
        began = time.perf_counter()
        try:
            await self._stub.Embed(request, timeout=60)
            code = "OK"
        except grpc.aio.AioRpcError as exc:
            code = exc.code().name
        return code, time.perf_counter() - began


def summary(results: list[tuple[str, float]], seconds: float) -> dict[str, Any]:
    codes = Counter(code for code, _ in results)
    ok = [t for code, t in results if code == "OK"]
    refused = [t for code, t in results if code == "RESOURCE_EXHAUSTED"]
    return {
        "offered": len(results),
        "served": len(ok),
        "refused": len(refused),
        "errors": {c: n for c, n in codes.items() if c not in ("OK", "RESOURCE_EXHAUSTED")},
        "served_per_s": len(ok) / seconds,
        "p50_ms": percentile(ok, 50) * 1000,
        "p99_ms": percentile(ok, 99) * 1000,
        "refusal_p50_ms": percentile(refused, 50) * 1000,
        "refusal_p99_ms": percentile(refused, 99) * 1000,
    }


async def closed_loop(caller: Caller, concurrency: int, seconds: float) -> list[tuple[str, float]]:
    results: list[tuple[str, float]] = []
    stop = time.perf_counter() + seconds

    async def worker() -> None:
        while time.perf_counter() < stop:
            results.append(await caller.call())

    await asyncio.gather(*(worker() for _ in range(concurrency)))
    return results


async def open_loop(
    caller: Caller,
    rate: float,
    seconds: float,
    on_tick: Callable[[], None] | None = None,
) -> list[asyncio.Task[tuple[str, float]]]:
    """Calls sent every 1/rate s for `seconds`; returns their tasks (not awaited)."""
    tasks = []
    began = time.perf_counter()
    count = int(rate * seconds)
    for i in range(count):
        delay = began + i / rate - time.perf_counter()
        if delay > 0:
            await asyncio.sleep(delay)
        tasks.append(asyncio.create_task(caller.call()))
        if on_tick is not None:
            on_tick()
    return tasks


async def run(args: argparse.Namespace, data_dir: Path) -> dict[str, Any]:
    import grpc

    from server.api.voicegate.v1 import audio_pb2, speaker_pb2, speaker_pb2_grpc

    env = {}
    # Always set: ServeProcess raises the limit for the throughput benchmarks otherwise.
    env["VOICEGATE_MAX_INFLIGHT_REQUESTS"] = str(args.limit or Settings.max_inflight_requests)
    clips = make_clips(data_dir, args.clips, 1.0, CLIP_S)
    with ServeProcess(env=env) as serve:
        assert serve.proc is not None
        pid = serve.proc.pid
        requests = [
            speaker_pb2.EmbedRequest(audio=audio_pb2.Audio(content=data))
            for data in await accepted_clips(serve.target, clips)
        ]
        async with grpc.aio.insecure_channel(serve.target, options=GRPC_OPTIONS) as channel:
            caller = Caller(speaker_pb2_grpc.SpeakerServiceStub(channel), requests)
            await closed_loop(caller, 4, 3.0)  # warm-up
            out: dict[str, Any] = {"limit": args.limit or "server default", "rss_mib": {}}
            out["rss_mib"]["before"] = rss_mib(pid)
            third = args.phase_s / 3

            log(f"sequential for {third:.0f} s")
            out["sequential"] = summary(await closed_loop(caller, 1, third), third)
            log(f"closed loop, concurrency {args.concurrency}, for {args.phase_s:.0f} s")
            closed = await closed_loop(caller, args.concurrency, args.phase_s)
            out["closed"] = summary(closed, args.phase_s)
            rate = out["closed"]["served_per_s"]

            async def open_phase(
                name: str, factor: float, on_tick: Callable[[], None] | None = None
            ) -> list[asyncio.Task[tuple[str, float]]]:
                log(f"{name}: open loop at {factor:g} x {rate:.1f}/s for {args.phase_s:.0f} s")
                return await open_loop(caller, factor * rate, args.phase_s, on_tick)

            baseline = await asyncio.gather(*await open_phase("baseline", 0.7))
            out["baseline"] = summary(baseline, args.phase_s)
            out["baseline"]["offered_per_s"] = 0.7 * rate

            rss: list[float] = []
            last_sample = [0.0]

            def sample() -> None:
                now = time.perf_counter()
                if now - last_sample[0] >= 0.25:
                    last_sample[0] = now
                    rss.append(rss_mib(pid))

            pending = await open_phase("overload", args.factor, sample)
            log(f"recovery: one call at a time for {third:.0f} s, from the end of the schedule")
            recovery = await closed_loop(caller, 1, third)
            overload = await asyncio.gather(*pending)
            out["overload"] = summary(overload, args.phase_s)
            out["overload"]["offered_per_s"] = args.factor * rate
            out["rss_mib"]["overload_max"] = max(rss)
            out["recovery"] = summary(recovery, third)
            # Calls follow one another at once: their latencies add up to the time to the first
            # success (the calls still in flight from the overload drain meanwhile).
            first_ok = next((i for i, (code, _) in enumerate(recovery) if code == "OK"), None)
            out["recovery"]["first_ok_ms"] = (
                sum(t for _, t in recovery[: first_ok + 1]) * 1000 if first_ok is not None else None
            )
            out["recovery"]["refused_before_first_ok"] = first_ok
            out["rss_mib"]["after"] = rss_mib(pid)
    return out


def report(out: dict[str, Any]) -> None:
    seq, closed, base = out["sequential"], out["closed"], out["baseline"]
    over, rec, rss = out["overload"], out["recovery"], out["rss_mib"]
    print(f"\nadmission limit: {out['limit']}")
    print("phase       offered/s  served/s  served  refused  errors  p50 ms  p99 ms")
    for name, part in (
        ("sequential", seq),
        ("closed", closed),
        ("baseline", base),
        ("overload", over),
        ("recovery", rec),
    ):
        offered = part.get("offered_per_s")
        print(
            f"{name:<11} {offered if offered else float('nan'):>9.1f} {part['served_per_s']:>9.1f}"
            f" {part['served']:>7} {part['refused']:>8} {sum(part['errors'].values()):>7}"
            f" {part['p50_ms']:>7.0f} {part['p99_ms']:>7.0f}"
        )
    served_ratio = over["served_per_s"] / closed["served_per_s"]
    print(
        f"\noverload vs baseline (same run): served {served_ratio:.2f} x the sustainable rate; "
        f"p50 {over['p50_ms'] / base['p50_ms']:.2f} x, p99 {over['p99_ms'] / base['p99_ms']:.2f} x;"
        f" refusals p50 {over['refusal_p50_ms']:.1f} ms, p99 {over['refusal_p99_ms']:.1f} ms;"
        f" other errors {over['errors'] or 'none'}"
    )
    print(
        f"recovery: first success {rec['first_ok_ms']:.0f} ms after the overload's schedule ended "
        f"({rec['refused_before_first_ok']} refused before it while the admitted calls drained), "
        f"then median {rec['p50_ms']:.0f} ms vs sequential {seq['p50_ms']:.0f} ms "
        f"({rec['p50_ms'] / seq['p50_ms']:.2f} x)"
    )
    print(
        f"front server RSS: before {rss['before']:.0f} MiB, overload max "
        f"{rss['overload_max']:.0f} MiB, after {rss['after']:.0f} MiB"
    )


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    add_data_dir_argument(parser)
    parser.add_argument("--clips", type=int, default=40)
    parser.add_argument("--limit", type=int, default=0, help="max_inflight_requests (0: default)")
    parser.add_argument("--concurrency", type=int, default=8, help="closed-loop calls in flight")
    parser.add_argument("--factor", type=float, default=4.0, help="overload: x sustainable rate")
    parser.add_argument("--phase-s", type=float, default=15.0)
    parser.add_argument("--json", type=Path, help="write the figures here")
    args = parser.parse_args()
    data_dir = require_data_dir(parser, args.data_dir)
    began = time.perf_counter()
    out = asyncio.run(run(args, data_dir))
    out["seconds"] = time.perf_counter() - began
    report(out)
    if args.json:
        args.json.write_text(json.dumps(out, indent=2))
    log(f"done in {out['seconds']:.0f} s")


if __name__ == "__main__":
    main()
