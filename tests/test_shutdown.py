"""SIGTERM under load, with `voicegate serve` as a real process and its embedded Triton.

Once it is ready, its tritonserver runs and SpeakerService's health is SERVING. Order checked:
health watchers get NOT_SERVING and their streams end; new calls are refused (UNAVAILABLE);
every call accepted before the signal gets its answer; the process exits 0 within the grace
period plus Triton's stop; no tritonserver is left behind.
"""

from __future__ import annotations

import asyncio
import signal
import time
import urllib.request
from pathlib import Path

import grpc
import pytest
from grpc_health.v1 import health_pb2, health_pb2_grpc

from server.api.voicegate.v1 import speaker_pb2, speaker_pb2_grpc
from server.triton_process import free_ports
from tests import serving, speech, tritonkit
from tests.conftest import ROOT, require_exported_models

pytestmark = pytest.mark.integration

CALLS = 12
GRACE_S = 30.0


def admitted(metrics_port: int) -> float:
    """`voicegate_admission_in_flight` from the server's /metrics."""
    url = f"http://127.0.0.1:{metrics_port}/metrics"
    with urllib.request.urlopen(url, timeout=5) as reply:
        for line in reply.read().decode().splitlines():
            if line.startswith("voicegate_admission_in_flight "):
                return float(line.split()[1])
    return -1.0


async def test_sigterm_drains_accepted_calls(
    tmp_path: Path, speech_files: list[Path], report: object
) -> None:
    require_exported_models()
    port, metrics_port = free_ports(2)
    env = {
        "VOICEGATE_STATE_DIR": str(tmp_path),
        "VOICEGATE_METRICS_PORT": str(metrics_port),
        "VOICEGATE_HEALTH_POLL_S": "0.2",
        # Room for every call: this is about the drain, not about admission.
        "VOICEGATE_MAX_INFLIGHT_REQUESTS": str(4 * CALLS),
    }
    args = ["--host", "127.0.0.1", "--port", str(port), "--grace-seconds", str(GRACE_S)]
    log_path = tmp_path / "serve.log"
    program = [str(ROOT / ".venv" / "bin" / "voicegate")]
    process = await asyncio.to_thread(serving.start_serve, log_path, env, args, program)
    try:
        # The embedded tritonserver runs, with its backends under the state dir.
        tritonservers = tritonkit.processes_mentioning(f"--backend-directory={tmp_path}")
        assert tritonservers, "the embedded tritonserver is not running"

        # Long utterances (~30 s each): the calls are still running when the signal comes.
        request = speaker_pb2.EmbedRequest(audio=speech.long_audio(speech_files, 30))
        async with grpc.aio.insecure_channel(f"127.0.0.1:{port}") as channel:
            stub = speaker_pb2_grpc.SpeakerServiceStub(channel)
            health = health_pb2_grpc.HealthStub(channel)
            service = health_pb2.HealthCheckRequest(service="voicegate.v1.SpeakerService")
            checked = await health.Check(service, timeout=10)
            assert checked.status == health_pb2.HealthCheckResponse.SERVING
            await stub.Embed(request, timeout=60)  # warm
            watch = health.Watch(health_pb2.HealthCheckRequest(), timeout=120)
            first = await watch.read()
            assert first.status == health_pb2.HealthCheckResponse.SERVING

            calls = [asyncio.ensure_future(stub.Embed(request, timeout=120)) for _ in range(CALLS)]
            began = time.monotonic()
            while await asyncio.to_thread(admitted, metrics_port) < CALLS:
                assert time.monotonic() - began < 30, "calls not admitted"
                assert not any(c.done() for c in calls), "a call ended before the signal"
                await asyncio.sleep(0.02)

            signalled = time.monotonic()
            process.send_signal(signal.SIGTERM)

            # Health watchers hear NOT_SERVING, then their stream ends (it holds no drain).
            statuses = []
            while (reply := await watch.read()) is not grpc.aio.EOF:
                statuses.append(reply.status)
            assert statuses[-1:] == [health_pb2.HealthCheckResponse.NOT_SERVING]
            assert await watch.code() == grpc.StatusCode.OK
            watch_ended = time.monotonic() - signalled

            # New calls are refused while the accepted ones still run.
            with pytest.raises(grpc.aio.AioRpcError) as caught:
                await stub.Embed(request, timeout=10)
            assert caught.value.code() == grpc.StatusCode.UNAVAILABLE
            assert not all(c.done() for c in calls), "drained before a new call was tried"

            results = await asyncio.gather(*calls, return_exceptions=True)
            failed = [r for r in results if isinstance(r, BaseException)]
            assert not failed, failed  # no accepted call is lost
            assert all(r.partial_count > 0 for r in results)  # type: ignore[union-attr]
            drained = time.monotonic() - signalled

        code = await asyncio.to_thread(process.wait, GRACE_S + 15)
        exited = time.monotonic() - signalled
        text = log_path.read_text()
        assert code == 0, text[-3000:]
        assert "draining" in text and "voicegate stopped" in text
        # No tritonserver (nor Python-backend stub) is left behind.
        assert await tritonkit.gone(str(tmp_path), pids=tritonservers)
    finally:
        if process.poll() is None:
            process.kill()
    report(  # type: ignore[operator]
        f"SIGTERM with {CALLS} Embeds in flight: health watch ended after {watch_ended:.2f} s, "
        f"all {CALLS} answered by {drained:.2f} s, process exited after {exited:.2f} s "
        f"(grace {GRACE_S:.0f} s)"
    )
