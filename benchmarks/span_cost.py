"""What the front server's tracing work costs per call, in process, by `span_export`.

The spans of one traced `Embed` (trim `vad`), made through the same `Telemetry` calls the server
makes and with the attributes it sets: the SERVER span, decode, the VAD's Triton call, trim,
features and the encoder's Triton call. `embed_spans` is a copy of those calls (the SERVER
span's fixed attributes are `grpc_telemetry._MethodObserver`'s): keep it in step with them.
Each mode runs in a process of its own, sending to an OTLP/HTTP receiver in this process that
reads and drops (its CPU is not counted):

- `off`: tracing disabled (`OTEL_SDK_DISABLED`), the floor.
- `unexported`: spans made, no endpoint (what `nosink` is in `tracing_cost`).
- `native`: `span_export` native (fastotel's processor: encoded and sent by a native thread).
- `sdk`: `span_export` sdk (the SDK's `BatchSpanProcessor` with its Python exporter).

It reports the CPU time per call of the whole process (every thread, the exporter's too).
`--instructions` counts instructions instead, under valgrind (callgrind), which the machine's
noise does not move: each mode runs twice, with `--calls` and with 6x as many, and the
difference is divided by the extra calls, so start-up and import cost cancel out.

    .venv/bin/python -m benchmarks.span_cost [--calls 20000] [--instructions]
"""

from __future__ import annotations

import argparse
import os
import re
import subprocess
import sys
import time
from collections.abc import Sequence
from typing import TYPE_CHECKING

from benchmarks.common import ROOT, log
from benchmarks.tracing_cost import SinkReceiver

if TYPE_CHECKING:
    from opentelemetry.util.types import AttributeValue

    from server.telemetry import Telemetry

MODES = ("off", "unexported", "native", "sdk")
_SERVER_ATTRIBUTES: dict[str, AttributeValue] = {
    "rpc.system": "grpc",
    "rpc.service": "voicegate.v1.SpeakerService",
    "rpc.method": "Embed",
    "network.peer.address": "127.0.0.1",
    "network.peer.port": 45678,
}


def embed_spans(telemetry: Telemetry) -> None:
    """One traced Embed's spans, as the front server makes them."""
    from opentelemetry import context, trace
    from opentelemetry.trace import SpanKind

    tracing = telemetry.tracing
    span = None
    token = None
    if tracing.enabled:
        span = tracing.tracer.start_span(
            "voicegate.v1.SpeakerService/Embed", kind=SpanKind.SERVER, attributes=_SERVER_ATTRIBUTES
        )
        token = context.attach(trace.set_span_in_context(span))
    with telemetry.stage(
        "decode", {"voicegate.audio.source": "content", "voicegate.audio.bytes": 128044}
    ) as stage:
        stage.set_attribute("voicegate.audio.seconds", 4.0)
    with telemetry.triton_call("silero_vad", "127.0.0.1:8001", 1) as call:
        call.model_version = "1"
    with telemetry.stage("trim", {}) as stage:
        stage.set_attribute("voicegate.speech.seconds", 3.5)
    with telemetry.stage("features", {}) as stage:
        stage.set_attribute("voicegate.partial.count", 5)
    with telemetry.triton_call("ge2e_int8", "127.0.0.1:8001", 5) as call:
        call.model_version = "1"
    telemetry.annotate(
        {
            "voicegate.model": "ge2e_int8",
            "voicegate.speech.seconds": 3.5,
            "voicegate.partial.count": 5,
        }
    )
    if span is not None and token is not None:
        span.set_attribute("rpc.grpc.status_code", 0)
        span.end()
        context.detach(token)


def run_mode(mode: str, calls: int, endpoint: str) -> None:
    """In the child: `calls` Embeds' spans after a warm-up, then a flush; prints CPU seconds."""
    from server.telemetry import Telemetry, Tracing

    environ = {"OTEL_SERVICE_NAME": "voicegate-bench", "OTEL_TRACES_SAMPLER": "always_on"}
    if mode == "off":
        environ["OTEL_SDK_DISABLED"] = "true"
    elif mode != "unexported":
        environ["OTEL_EXPORTER_OTLP_ENDPOINT"] = endpoint
    # The queue holds a whole run: a span dropped for a full queue would be work not counted.
    environ["OTEL_BSP_MAX_QUEUE_SIZE"] = str(8 * (calls + 100))
    tracing = Tracing.from_environment(
        environ, span_export=mode if mode in ("native", "sdk") else "native"
    )
    telemetry = Telemetry(tracing)
    for _ in range(100):
        embed_spans(telemetry)
    if tracing.provider is not None:
        tracing.provider.force_flush()  # type: ignore[attr-defined]
    began = time.process_time()
    for _ in range(calls):
        embed_spans(telemetry)
    if tracing.provider is not None:
        tracing.provider.force_flush()  # type: ignore[attr-defined]
    print(f"cpu_s {time.process_time() - began:.6f}")
    tracing.shutdown()


def child(mode: str, calls: int, endpoint: str, valgrind: bool) -> float:
    """CPU seconds (or instructions, under valgrind) of one mode's child process."""
    command = [sys.executable, "-m", "benchmarks.span_cost", "--child", mode]
    command += ["--calls", str(calls), "--endpoint", endpoint]
    if valgrind:
        command = ["valgrind", "--tool=callgrind", "--callgrind-out-file=/dev/null", *command]
    env = {**os.environ, "PYTHONHASHSEED": "0"}
    done = subprocess.run(command, cwd=ROOT, env=env, capture_output=True, text=True, check=True)
    if valgrind:
        match = re.search(r"Collected : (\d+)", done.stderr)
        if match is None:
            raise SystemExit(f"no instruction count from valgrind:\n{done.stderr[-2000:]}")
        return float(match.group(1))
    return float(done.stdout.split("cpu_s")[-1])


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--calls", type=int, default=20000)
    parser.add_argument("--instructions", action="store_true", help="count under valgrind")
    parser.add_argument("--modes", default=",".join(MODES))
    parser.add_argument("--child", choices=MODES, help=argparse.SUPPRESS)
    parser.add_argument("--endpoint", help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.child:
        run_mode(args.child, args.calls, args.endpoint)
        return 0

    modes = [m.strip() for m in args.modes.split(",") if m.strip()]
    receiver = SinkReceiver()
    per_call: dict[str, float] = {}
    try:
        for mode in modes:
            log(f"{mode}: {args.calls} calls" + (" under valgrind" if args.instructions else ""))
            if args.instructions:
                small = child(mode, args.calls, receiver.url, True)
                large = child(mode, 6 * args.calls, receiver.url, True)
                per_call[mode] = (large - small) / (5 * args.calls)
            else:
                per_call[mode] = child(mode, args.calls, receiver.url, False) / args.calls
    finally:
        receiver.close()

    unit = "instructions" if args.instructions else "us CPU"
    scale = 1.0 if args.instructions else 1e6
    floor = per_call.get("off", 0.0)
    print(f"\nOne traced Embed's six spans, {unit} per call (every thread of the process):")
    for mode in modes:
        tracing = per_call[mode] - floor
        line = f"  {mode:11s} {scale * per_call[mode]:12,.0f}   tracing {scale * tracing:12,.0f}"
        if "sdk" in per_call and mode != "sdk" and per_call["sdk"] > floor:
            line += f"   ({tracing / (per_call['sdk'] - floor):.2f} of sdk's)"
        print(line)
    exports = receiver.snapshot()
    print(f"exports received (requests, bytes): {exports}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
