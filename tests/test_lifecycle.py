"""An unreachable backend: UNAVAILABLE calls and NOT_SERVING health, alive all the same.

`voicegate serve` as a process (start-up, SIGTERM, no tritonserver left) is in test_shutdown.py.
"""

from __future__ import annotations

from pathlib import Path

import grpc
import pytest
from grpc_health.v1 import health_pb2, health_pb2_grpc

from server.api.voicegate.v1 import speaker_pb2, speaker_pb2_grpc
from server.config import Settings
from server.triton_process import free_ports
from tests import speech

pytestmark = pytest.mark.integration


async def test_unreachable_triton_gives_unavailable_and_not_serving(
    base_settings: Settings, speech_files: list[Path]
) -> None:
    from server.app import LIVENESS_SERVICE, VoicegateApp

    settings = base_settings.replace(triton_url=f"127.0.0.1:{free_ports(1)[0]}")
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
