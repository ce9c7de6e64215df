"""The real front server over the real Triton, called through the generated stubs."""

from __future__ import annotations

import asyncio
from pathlib import Path

import grpc
import numpy as np
import pytest
from grpc_health.v1 import health_pb2, health_pb2_grpc
from grpc_reflection.v1alpha import reflection_pb2, reflection_pb2_grpc

from server.api.voicegate.v1 import audio_pb2, speaker_pb2
from tests import speech

pytestmark = pytest.mark.integration


def embedding(response: speaker_pb2.EmbedResponse) -> np.ndarray:
    return np.asarray(response.embedding, dtype=np.float32)


async def test_health_is_serving(channel: grpc.aio.Channel) -> None:
    stub = health_pb2_grpc.HealthStub(channel)
    for service in ("", "voicegate.v1.SpeakerService"):
        reply = await stub.Check(health_pb2.HealthCheckRequest(service=service))
        assert reply.status == health_pb2.HealthCheckResponse.SERVING


async def test_reflection_lists_and_describes_the_service(channel: grpc.aio.Channel) -> None:
    stub = reflection_pb2_grpc.ServerReflectionStub(channel)
    requests = [
        reflection_pb2.ServerReflectionRequest(list_services=""),
        reflection_pb2.ServerReflectionRequest(
            file_containing_symbol="voicegate.v1.SpeakerService"
        ),
    ]
    replies = [reply async for reply in stub.ServerReflectionInfo(iter(requests))]
    names = {s.name for s in replies[0].list_services_response.service}
    assert {"voicegate.v1.SpeakerService", "grpc.health.v1.Health"} <= names
    assert replies[1].file_descriptor_response.file_descriptor_proto


async def test_embed_real_speech(speaker_stub, speech_files: list[Path]) -> None:
    samples, rate = speech.read(speech_files[0])
    reply = await speaker_stub.Embed(
        speaker_pb2.EmbedRequest(audio=speech.content(samples, rate, "FLAC"))
    )
    vector = embedding(reply)
    assert vector.shape == (256,)
    assert np.linalg.norm(vector) == pytest.approx(1.0, abs=1e-4)
    assert reply.model == "ge2e_int8"
    assert reply.speech_seconds > 1.0
    assert reply.partial_count >= 1
    raw = await speaker_stub.Embed(speaker_pb2.EmbedRequest(audio=speech.raw16(samples, rate)))
    assert float(np.dot(vector, embedding(raw))) > 0.999


async def test_fp32_and_int8_encoders_agree(speaker_stub, speech_files: list[Path]) -> None:
    audio = speech.halves(speech_files[1])[0]
    int8, fp32 = await asyncio.gather(
        speaker_stub.Embed(speaker_pb2.EmbedRequest(audio=audio, model="ge2e_int8")),
        speaker_stub.Embed(speaker_pb2.EmbedRequest(audio=audio, model="ge2e_fp32")),
    )
    assert fp32.model == "ge2e_fp32"
    assert float(np.dot(embedding(int8), embedding(fp32))) > 0.998


async def test_verify_same_and_different_speakers(speaker_stub, speech_files: list[Path]) -> None:
    trials = []
    for index in range(4):
        first, second = speech.halves(speech_files[index])
        other = speech.halves(speech_files[index + 10])[1]
        trials.append((first, second, True))
        trials.append((first, other, False))
    replies = await asyncio.gather(
        *(
            speaker_stub.Verify(speaker_pb2.VerifyRequest(reference=a, probe=b))
            for a, b, _ in trials
        )
    )
    for (_, _, same), reply in zip(trials, replies, strict=True):
        assert reply.same_speaker is same, reply
        assert 0.0 <= reply.score <= 1.0
        assert {s.model for s in reply.scores} == {"ge2e", "mfcc"}
        assert (reply.score >= reply.threshold) is reply.same_speaker


@pytest.mark.parametrize(
    ("audio", "message"),
    [
        (audio_pb2.Audio(), "audio is required"),
        (audio_pb2.Audio(content=b""), "audio.content is empty"),
        (audio_pb2.Audio(content=b"\x00garbage" * 50), "not a decodable audio file"),
        (
            audio_pb2.Audio(raw=audio_pb2.RawAudio(samples=b"\x00" * 3, sample_rate_hz=16000)),
            "format is required",
        ),
        (
            audio_pb2.Audio(
                raw=audio_pb2.RawAudio(
                    samples=b"\x00" * 3,
                    format=audio_pb2.SAMPLE_FORMAT_LINEAR16,
                    sample_rate_hz=16000,
                )
            ),
            "not a multiple of 2",
        ),
        (speech.content(np.zeros(32000, np.float32), 16000), "of speech after silence"),
    ],
)
async def test_bad_input_is_invalid_argument(speaker_stub, audio, message: str) -> None:
    with pytest.raises(grpc.aio.AioRpcError) as caught:
        await speaker_stub.Embed(speaker_pb2.EmbedRequest(audio=audio))
    assert caught.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert message in caught.value.details()


async def test_verify_names_the_bad_side(speaker_stub, speech_files: list[Path]) -> None:
    good = speech.halves(speech_files[0])[0]
    with pytest.raises(grpc.aio.AioRpcError) as caught:
        await speaker_stub.Verify(speaker_pb2.VerifyRequest(reference=good))
    assert caught.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert "probe is required" in caught.value.details()


async def test_unknown_model_is_invalid_argument(speaker_stub, speech_files: list[Path]) -> None:
    audio = speech.halves(speech_files[0])[0]
    with pytest.raises(grpc.aio.AioRpcError) as caught:
        await speaker_stub.Embed(speaker_pb2.EmbedRequest(audio=audio, model="nope"))
    assert caught.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert "'nope' is not served" in caught.value.details()


async def test_cli_client_embeds_and_verifies(app, speech_files: list[Path], capsys) -> None:
    from server.cli import main

    target = f"127.0.0.1:{app.port}"
    assert await asyncio.to_thread(main, ["embed", str(speech_files[0]), "--server", target]) == 0
    assert "ge2e_int8" in capsys.readouterr().out
    args = ["verify", str(speech_files[0]), str(speech_files[1]), "--server", target]
    assert await asyncio.to_thread(main, args) == 0
    assert "different speakers" in capsys.readouterr().out
    assert await asyncio.to_thread(main, ["vad", str(speech_files[0]), "--server", target]) == 0
    lines = capsys.readouterr().out.splitlines()
    assert " s of speech in " in lines[0] and len(lines) >= 2
    start, end, _ = lines[1].split()
    assert 0.0 <= float(start) < float(end)
