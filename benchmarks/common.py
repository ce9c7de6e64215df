"""Shared by the benchmarks: dev speech and clips, starting and driving the service, rounds of
measurements, statistics."""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import io
import os
import signal
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import AsyncIterator, Callable, Iterator, Sequence
from pathlib import Path
from typing import Any

from export.devdata import resolve_data_dir
from server.triton_process import free_ports

ROOT = Path(__file__).resolve().parents[1]
MODEL_REPOSITORY = ROOT / "model_repository"
GRPC_OPTIONS = [
    ("grpc.max_send_message_length", 64 * 1024 * 1024),
    ("grpc.max_receive_message_length", 64 * 1024 * 1024),
]
READY_LINE = "voicegate ready"
SAMPLE_RATE = 16_000


def default_data_dir() -> Path | None:
    """VOICEGATE_DATA_DIR, else ../shared/data/librispeech-train-clean-100 beside the project
    (export.devdata.resolve_data_dir), if that folder exists."""
    return resolve_data_dir(None)


def add_data_dir_argument(parser: argparse.ArgumentParser) -> None:
    parser.add_argument(
        "--data-dir",
        type=Path,
        default=default_data_dir(),
        help="dev speech, LibriSpeech FLAC files (env VOICEGATE_DATA_DIR)",
    )


def require_data_dir(parser: argparse.ArgumentParser, data_dir: Path | None) -> Path:
    if data_dir is None or not data_dir.is_dir():
        parser.error("no dev speech: pass --data-dir or set VOICEGATE_DATA_DIR")
    return data_dir


def free_port() -> int:
    return free_ports(1)[0]


def make_clips(
    data_dir: Path, count: int, start_s: float = 1.0, seconds: float = 4.0
) -> list[bytes]:
    """`count` WAV clips of `seconds` s at 16 kHz: one per file from `start_s`, then later cuts."""
    import soundfile

    files = sorted(data_dir.glob("*.flac")) + sorted(data_dir.glob("*.wav"))
    clips: list[bytes] = []
    offset = start_s
    while len(clips) < count:
        added = 0
        for path in files:
            wav, rate = soundfile.read(path, dtype="float32", always_2d=False)
            if rate != SAMPLE_RATE or wav.ndim != 1:
                continue
            begin, end = int(offset * rate), int((offset + seconds) * rate)
            if end > len(wav):
                continue
            buffer = io.BytesIO()
            soundfile.write(buffer, wav[begin:end], rate, format="WAV", subtype="PCM_16")
            clips.append(buffer.getvalue())
            added += 1
            if len(clips) == count:
                break
        if not added:
            raise SystemExit(f"{data_dir} has too little 16 kHz mono audio for {count} clips")
        offset += seconds + 1.0
    return clips


def log(message: str) -> None:
    print(f"[{time.strftime('%H:%M:%S')}] {message}", file=sys.stderr, flush=True)


# ---------------------------------------------------------------- the service


class ServeProcess:
    """`python -m server.cli serve` as a separate process, state and log in a temp dir."""

    def __init__(
        self,
        model_repository: Path | None = None,
        env: dict[str, str] | None = None,
        startup_timeout_s: float = 240.0,
    ) -> None:
        self._tmp = tempfile.TemporaryDirectory(prefix="voicegate-bench-")
        self.state_dir = Path(self._tmp.name)
        self.log_path = self.state_dir / "serve.log"
        self.port = free_port()
        self.target = f"127.0.0.1:{self.port}"
        self._model_repository = model_repository
        self._env = env or {}
        self._timeout = startup_timeout_s
        self.proc: subprocess.Popen[bytes] | None = None

    def start(self) -> None:
        env = dict(os.environ)
        env.update(self._env)
        env["VOICEGATE_STATE_DIR"] = str(self.state_dir)
        # Prometheus metrics stay on (as deployed) but on a port of their own, so that several
        # servers can run side by side (ignored by a server without the setting).
        env.setdefault("VOICEGATE_METRICS_PORT", str(free_port()))
        # Throughput benchmarks drive up to 32 calls at once and measure the engine, not the
        # admission bound (benchmarks/overload.py sets its own).
        env.setdefault("VOICEGATE_MAX_INFLIGHT_REQUESTS", "256")
        command = [
            sys.executable,
            "-m",
            "server.cli",
            "serve",
            "--host",
            "127.0.0.1",
            "--port",
            str(self.port),
            "--grace-seconds",
            "2",
        ]
        if self._model_repository is not None:
            command += ["--model-repository", str(self._model_repository)]
        with open(self.log_path, "wb") as log_file:
            self.proc = subprocess.Popen(
                command, cwd=ROOT, env=env, stdout=log_file, stderr=subprocess.STDOUT
            )
        deadline = time.monotonic() + self._timeout
        while True:
            text = self.log_path.read_text(errors="replace")
            if READY_LINE in text:
                return
            if self.proc.poll() is not None or time.monotonic() > deadline:
                tail = "\n".join(text.splitlines()[-30:])
                self.stop()
                raise RuntimeError(f"voicegate serve did not become ready:\n{tail}")
            time.sleep(0.2)

    def triton_url(self) -> str | None:
        """The embedded Triton's gRPC HOST:PORT, from the ready line of the log."""
        import re

        found = re.search(
            r"Triton at (\S+?),? \(embedded", self.log_path.read_text(errors="replace")
        )
        return found.group(1) if found else None

    def pids(self) -> list[int]:
        """The server and all its descendants (tritonserver, the Python backend stubs)."""
        if self.proc is None:
            return []
        return process_tree(self.proc.pid)

    def stop(self) -> None:
        if self.proc is not None and self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            try:
                self.proc.wait(timeout=30)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()
        self.proc = None
        self._report_errors()
        self._tmp.cleanup()

    def _report_errors(self) -> None:
        """Print the server's warnings and errors (with tracebacks) before its log goes."""
        if not self.log_path.exists():
            return
        lines = self.log_path.read_text(errors="replace").splitlines()
        first = next((i for i, line in enumerate(lines) if _is_problem_line(line)), None)
        if first is not None:
            shown = "\n".join(lines[first : first + 80])
            print(f"voicegate serve at {self.target} logged:\n{shown}", file=sys.stderr)

    def __enter__(self) -> ServeProcess:
        self.start()
        return self

    def __exit__(self, *exc_info: object) -> None:
        self.stop()


_PROBLEM_LEVELS = ("WARNING", "ERROR", "CRITICAL")


def _is_problem_line(line: str) -> bool:
    """A log line at one of `_PROBLEM_LEVELS`, in the text or the JSON log format."""
    return any(f" {level} " in line or f'"level": "{level}"' in line for level in _PROBLEM_LEVELS)


@contextlib.asynccontextmanager
async def in_process_service(
    model_repository: Path | None = None, state_dir: Path | None = None
) -> AsyncIterator[str]:
    """`server.app.VoicegateApp` on 127.0.0.1, port 0, embedded Triton; yields HOST:PORT."""
    from server.app import VoicegateApp
    from server.config import Settings

    with tempfile.TemporaryDirectory(prefix="voicegate-bench-") as tmp:
        overrides: dict[str, Any] = {
            "host": "127.0.0.1",
            "port": 0,
            "model_repository": model_repository or MODEL_REPOSITORY,
            "state_dir": state_dir or Path(tmp),
            "grace_seconds": 2.0,
            "metrics_port": free_port(),  # not the fixed default another may hold
        }
        settings = Settings.load(overrides)
        async with VoicegateApp(settings) as app:
            yield f"127.0.0.1:{app.port}"


async def accepted_clips(target: str, clips: Sequence[bytes]) -> list[bytes]:
    """The clips the server at `target` embeds, once it is SERVING: with trim "vad" a few 4 s
    cuts hold too little speech (INVALID_ARGUMENT), and one failed call would end a measurement."""
    import grpc

    from server.api.voicegate.v1 import audio_pb2, speaker_pb2, speaker_pb2_grpc

    await wait_serving(target, timeout_s=240)
    kept = []
    async with grpc.aio.insecure_channel(target, options=GRPC_OPTIONS) as channel:
        stub = speaker_pb2_grpc.SpeakerServiceStub(channel)
        for clip in clips:
            request = speaker_pb2.EmbedRequest(audio=audio_pb2.Audio(content=clip))
            try:
                await stub.Embed(request, timeout=120)
            except grpc.aio.AioRpcError as exc:
                if exc.code() != grpc.StatusCode.INVALID_ARGUMENT:
                    raise
                continue
            kept.append(clip)
    if len(kept) < len(clips):
        log(f"{len(kept)} of {len(clips)} clips have enough speech for {target}; using those")
    return kept


async def embed_all(stub: Any, requests: Sequence[Any], concurrency: int) -> list[float]:
    """Every Embed request once, in order, `concurrency` calls in flight: their latencies."""
    latencies: list[float] = []
    next_index = 0

    async def worker() -> None:
        nonlocal next_index
        while next_index < len(requests):
            request = requests[next_index]
            next_index += 1
            start = time.perf_counter()
            response = await stub.Embed(request, timeout=120)
            latencies.append(time.perf_counter() - start)
            if len(response.embedding) != 256:
                raise RuntimeError(f"bad embedding of {len(response.embedding)} values")

    await asyncio.gather(*(worker() for _ in range(concurrency)))
    return latencies


def rotating_rounds(
    servers: dict[str, ServeProcess],
    levels: Sequence[int],
    rounds: int,
    measure: Callable[[ServeProcess, int], dict[str, Any]],
    quiet_wait_s: float = 0.0,
) -> list[dict[str, dict[str, Any]]]:
    """`rounds` rounds of `measure(server, level)` for every level and server, keyed
    "NAME c=LEVEL". Round n visits the servers rotated by n (two: alternating order), each
    measurement after a wait of up to `quiet_wait_s` for a lull (`wait_for_quiet`)."""
    names = list(servers)
    width = max(len(f"{name} c={level}") for name in names for level in levels)
    out: list[dict[str, dict[str, Any]]] = []
    for number in range(rounds):
        shift = number % len(names)
        order = names[shift:] + names[:shift]
        results: dict[str, dict[str, Any]] = {}
        for level in levels:
            for name in order:
                if quiet_wait_s > 0:
                    wait_for_quiet(quiet_wait_s)
                key = f"{name} c={level}"
                results[key] = measure(servers[name], level)
                log(f"round {number + 1}: {key:{width}s} {results[key]['utt_per_s']:6.1f} utt/s")
        out.append(results)
    return out


async def wait_serving(target: str, timeout_s: float = 60.0) -> None:
    """Wait until the server's health service says SERVING."""
    import grpc
    from grpc_health.v1 import health_pb2, health_pb2_grpc

    deadline = time.monotonic() + timeout_s
    async with grpc.aio.insecure_channel(target) as channel:
        stub = health_pb2_grpc.HealthStub(channel)
        while True:
            try:
                response = await stub.Check(health_pb2.HealthCheckRequest(service=""), timeout=2)
                if response.status == health_pb2.HealthCheckResponse.SERVING:
                    return
            except grpc.aio.AioRpcError:
                pass
            if time.monotonic() > deadline:
                raise RuntimeError(f"{target} is not SERVING after {timeout_s:.0f} s")
            await asyncio.sleep(0.2)


# ---------------------------------------------------------------- CPU accounting

_CLOCK_TICKS = os.sysconf("SC_CLK_TCK")


def process_tree(root: int) -> list[int]:
    """`root` and its descendants, from /proc (Linux)."""
    children: dict[int, list[int]] = {}
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit():
            continue
        try:
            fields = (entry / "stat").read_text().rsplit(")", 1)[1].split()
        except OSError:
            continue
        children.setdefault(int(fields[1]), []).append(int(entry.name))
    tree, stack = [], [root]
    while stack:
        pid = stack.pop()
        tree.append(pid)
        stack.extend(children.get(pid, []))
    return tree


def cpu_seconds(pids: Sequence[int]) -> dict[int, float]:
    """User + system CPU seconds used so far by each process (its own threads)."""
    out = {}
    for pid in pids:
        try:
            fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
        except OSError:
            continue
        out[pid] = (int(fields[11]) + int(fields[12])) / _CLOCK_TICKS
    return out


def process_name(pid: int) -> str:
    try:
        return Path(f"/proc/{pid}/comm").read_text().strip()
    except OSError:
        return "?"


def machine_busy_seconds() -> float:
    """CPU seconds all processes on the machine have used (all cores), from /proc/stat."""
    fields = [int(v) for v in Path("/proc/stat").read_text().splitlines()[0].split()[1:]]
    idle = fields[3] + (fields[4] if len(fields) > 4 else 0)
    return (sum(fields[:8]) - idle) / _CLOCK_TICKS


@contextlib.contextmanager
def cpu_meter(
    pids: Sequence[int], labels: dict[int, str] | None = None
) -> Iterator[dict[str, float]]:
    """CPU seconds each process name used inside the block (filled in on exit), and under
    `machine` what every process on the machine used (the difference is other jobs' load)."""
    before = cpu_seconds(pids)
    machine = machine_busy_seconds()
    used: dict[str, float] = {}
    yield used
    after = cpu_seconds(pids)
    for pid, seconds in after.items():
        name = (labels or {}).get(pid) or process_name(pid)
        used[name] = used.get(name, 0.0) + seconds - before.get(pid, 0.0)
    used["machine"] = machine_busy_seconds() - machine


# ---------------------------------------------------------------- statistics


def percentile(values: Sequence[float], q: float) -> float:
    """Linear-interpolated percentile, q in 0..100."""
    ordered = sorted(values)
    if not ordered:
        return float("nan")
    position = (len(ordered) - 1) * q / 100.0
    low = int(position)
    high = min(low + 1, len(ordered) - 1)
    return ordered[low] + (ordered[high] - ordered[low]) * (position - low)


def spread(values: Sequence[float]) -> float:
    """(max - min) / median: how far repeated measurements of one figure fell apart."""
    if len(values) < 2:
        return 0.0
    middle = statistics.median(values)
    return (max(values) - min(values)) / middle if middle else float("nan")


def median_and_spread(values: Sequence[float]) -> dict[str, Any]:
    return {
        "median": statistics.median(values) if values else float("nan"),
        "spread": spread(values),
        "runs": list(values),
    }


def wait_for_quiet(max_wait_s: float, threshold: float = 0.25, window_s: float = 1.0) -> float:
    """Wait (up to `max_wait_s`) for a `window_s` in which the machine used less than
    `threshold` cores; returns the cores used in the last window. Other jobs share the cores:
    starting each measurement in a lull lowers, but does not remove, their effect."""
    deadline = time.monotonic() + max_wait_s
    while True:
        before = machine_busy_seconds()
        time.sleep(window_s)
        busy = (machine_busy_seconds() - before) / window_s
        if busy < threshold or time.monotonic() >= deadline:
            return busy


def model_fingerprints(repository: Path | None = None) -> dict[str, str]:
    """First 12 hex digits of each model.onnx's SHA-256 in a (local) model repository."""
    import hashlib

    root = repository or MODEL_REPOSITORY
    return {
        path.parent.parent.name: hashlib.sha256(path.read_bytes()).hexdigest()[:12]
        for path in sorted(root.glob("*/1/model.onnx"))
    }
