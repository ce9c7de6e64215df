"""Start-up, shutdown and an unreachable backend, with real processes."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import grpc
import pytest
from grpc_health.v1 import health_pb2, health_pb2_grpc

from server.api.voicegate.v1 import speaker_pb2, speaker_pb2_grpc
from server.config import Settings
from server.triton_process import free_ports
from tests import speech
from tests.conftest import ROOT, require_exported_models

pytestmark = pytest.mark.integration


def free_port() -> int:
    return free_ports(1)[0]


def tritonservers_under(state_dir: Path) -> list[int]:
    """Pids of tritonserver processes started with backends from `state_dir`."""
    pids = []
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit():
            continue
        try:
            cmdline = (entry / "cmdline").read_bytes().decode(errors="replace")
        except OSError:
            continue
        if "tritonserver" in cmdline and str(state_dir) in cmdline:
            pids.append(int(entry.name))
    return pids


async def test_unreachable_triton_gives_unavailable_and_not_serving(
    base_settings: Settings, speech_files: list[Path]
) -> None:
    from server.app import LIVENESS_SERVICE, VoicegateApp

    settings = base_settings.replace(triton_url=f"127.0.0.1:{free_port()}")
    async with (
        VoicegateApp(settings) as app,
        grpc.aio.insecure_channel(f"127.0.0.1:{app.port}") as channel,
    ):
        health = health_pb2_grpc.HealthStub(channel)
        reply = await health.Check(health_pb2.HealthCheckRequest(service=""))
        assert reply.status == health_pb2.HealthCheckResponse.NOT_SERVING
        alive = await health.Check(health_pb2.HealthCheckRequest(service=LIVENESS_SERVICE))
        assert alive.status == health_pb2.HealthCheckResponse.SERVING
        stub = speaker_pb2_grpc.SpeakerServiceStub(channel)
        request = speaker_pb2.EmbedRequest(audio=speech.halves(speech_files[0])[0])
        with pytest.raises(grpc.aio.AioRpcError) as caught:
            await stub.Embed(request, timeout=20)
        assert caught.value.code() == grpc.StatusCode.UNAVAILABLE
        assert "Traceback" not in caught.value.details()


def test_serve_starts_embedded_triton_and_stops_cleanly_on_sigterm(tmp_path: Path) -> None:
    require_exported_models()
    port = free_port()
    env = dict(os.environ, VOICEGATE_STATE_DIR=str(tmp_path), VOICEGATE_PORT=str(port))
    env["VOICEGATE_HOST"] = "127.0.0.1"
    log_path = tmp_path / "serve.log"
    with log_path.open("w") as log:
        process = subprocess.Popen(
            [sys.executable, "-m", "server.cli", "serve"],
            cwd=ROOT,
            env=env,
            stdout=log,
            stderr=subprocess.STDOUT,
        )
    try:
        deadline = time.monotonic() + 240
        while "voicegate ready" not in log_path.read_text():
            assert process.poll() is None, log_path.read_text()[-3000:]
            assert time.monotonic() < deadline, "no ready line within 240 s"
            time.sleep(0.5)
        assert tritonservers_under(tmp_path), "the embedded tritonserver is not running"
        with grpc.insecure_channel(f"127.0.0.1:{port}") as channel:
            reply = health_pb2_grpc.HealthStub(channel).Check(
                health_pb2.HealthCheckRequest(service="voicegate.v1.SpeakerService"), timeout=10
            )
            assert reply.status == health_pb2.HealthCheckResponse.SERVING
        process.send_signal(signal.SIGTERM)
        assert process.wait(timeout=60) == 0, log_path.read_text()[-3000:]
        assert "voicegate stopped" in log_path.read_text()
        time.sleep(0.5)
        assert tritonservers_under(tmp_path) == []
    finally:
        if process.poll() is None:
            process.kill()
