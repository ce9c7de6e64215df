"""VoiceActivityService through the real front server and Triton, against silero-vad itself."""

from __future__ import annotations

import asyncio
import io
import time
from collections.abc import AsyncIterator, Callable, Iterable, Iterator
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

import grpc
import numpy as np
import pytest
import soundfile
from grpc_health.v1 import health_pb2, health_pb2_grpc

from server.api.voicegate.v1 import audio_pb2, vad_pb2, vad_pb2_grpc
from server.vad import FRAME_SAMPLES, SAMPLE_RATE
from tests import speech

pytestmark = pytest.mark.integration

FRAME_SECONDS = FRAME_SAMPLES / SAMPLE_RATE
START = vad_pb2.SPEECH_EVENT_TYPE_SPEECH_START
END = vad_pb2.SPEECH_EVENT_TYPE_SPEECH_END


@pytest.fixture(scope="session")
def vad_stub(channel: grpc.aio.Channel) -> vad_pb2_grpc.VoiceActivityServiceStub:
    return vad_pb2_grpc.VoiceActivityServiceStub(channel)


@pytest.fixture(scope="session")
def silero() -> Callable[..., list[tuple[float, float]]]:
    """silero-vad's own `get_speech_timestamps` with its per-chunk ONNX model, in seconds."""
    import torch
    from silero_vad import get_speech_timestamps, load_silero_vad

    torch.set_num_threads(1)
    model = load_silero_vad(onnx=True)

    def timestamps(samples: np.ndarray, **options: Any) -> list[tuple[float, float]]:
        found = get_speech_timestamps(torch.from_numpy(samples), model, **options)
        return [(d["start"] / SAMPLE_RATE, d["end"] / SAMPLE_RATE) for d in found]

    return timestamps


def from_pcm16(data: bytes) -> np.ndarray:
    """The float samples the server decodes from `speech.pcm16` bytes (scale 1/32768)."""
    return np.frombuffer(data, "<i2").astype(np.float32) / np.float32(2**15)


def segments_of(reply: Any) -> list[tuple[float, float]]:
    return [(s.start_seconds, s.end_seconds) for s in reply.segments]


def boundary_differences(
    got: list[tuple[float, float]], expected: list[tuple[float, float]]
) -> list[float]:
    assert len(got) == len(expected), (got, expected)
    return [
        abs(a - b)
        for (start, end), (start2, end2) in zip(got, expected, strict=True)
        for a, b in ((start, start2), (end, end2))
    ]


def config_message(
    rate: int = SAMPLE_RATE,
    fmt: int = audio_pb2.SAMPLE_FORMAT_LINEAR16,
    channels: int = 1,
    options: vad_pb2.VadOptions | None = None,
) -> vad_pb2.StreamingDetectSpeechRequest:
    return vad_pb2.StreamingDetectSpeechRequest(
        config=vad_pb2.StreamingDetectSpeechConfig(
            format=fmt, sample_rate_hz=rate, channels=channels, options=options
        )
    )


def chunked(data: bytes, size: int) -> Iterator[vad_pb2.StreamingDetectSpeechRequest]:
    for i in range(0, len(data), size):
        yield vad_pb2.StreamingDetectSpeechRequest(audio_chunk=data[i : i + size])


async def stream_call(
    stub: vad_pb2_grpc.VoiceActivityServiceStub,
    requests: Iterable[vad_pb2.StreamingDetectSpeechRequest],
    timeout_s: float = 120,
) -> tuple[list[vad_pb2.SpeechEvent], vad_pb2.SpeechActivitySummary]:
    async def source() -> AsyncIterator[vad_pb2.StreamingDetectSpeechRequest]:
        for request in requests:
            yield request

    events, summaries = [], []
    async for reply in stub.StreamingDetectSpeech(source(), timeout=timeout_s):
        if reply.WhichOneof("streaming_response") == "event":
            assert not summaries, "an event after the summary"
            events.append(reply.event)
        else:
            summaries.append(reply.summary)
    assert len(summaries) == 1
    return events, summaries[0]


def check_events(events: list[vad_pb2.SpeechEvent], segments: list[tuple[float, float]]) -> None:
    """Starts and ends alternate, in order, at exactly the summary's boundaries."""
    expected = []
    for i, (start, end) in enumerate(segments):
        expected += [(START, i, start), (END, i, end)]
    assert [(e.type, e.segment_index, e.time_seconds) for e in events] == expected
    for event in events:
        assert event.decided_at_seconds >= event.time_seconds


async def test_health_and_reflection_know_the_service(channel: grpc.aio.Channel) -> None:
    health = health_pb2_grpc.HealthStub(channel)
    reply = await health.Check(
        health_pb2.HealthCheckRequest(service="voicegate.v1.VoiceActivityService")
    )
    assert reply.status == health_pb2.HealthCheckResponse.SERVING


async def test_segments_match_silero_on_real_speech(
    vad_stub: Any, speech_files: list[Path], silero: Callable[..., Any], report: Any
) -> None:
    differences: list[float] = []
    count = 0
    for path in speech_files[:6]:
        samples, rate = speech.read(path)
        assert rate == SAMPLE_RATE
        reply = await vad_stub.DetectSpeech(
            vad_pb2.DetectSpeechRequest(audio=audio_pb2.Audio(content=path.read_bytes())),
            timeout=60,
        )
        expected = silero(samples)
        got = segments_of(reply)
        assert got, f"no speech found in {path.name}"
        differences += boundary_differences(got, expected)
        count += len(got)
        assert reply.audio_seconds == pytest.approx(len(samples) / SAMPLE_RATE)
        assert reply.speech_seconds == pytest.approx(sum(e - s for s, e in got), abs=1e-9)
        for segment in reply.segments:
            assert 0.5 <= segment.mean_probability <= 1.0
    report(
        f"VAD vs silero get_speech_timestamps: {count} segments in 6 files, "
        f"max boundary difference {max(differences) * 1000:.3f} ms"
    )
    assert max(differences) <= FRAME_SECONDS


async def test_options_are_silero_options(
    vad_stub: Any, speech_files: list[Path], silero: Callable[..., Any]
) -> None:
    samples, _ = speech.read(speech_files[1])
    options = vad_pb2.VadOptions(
        threshold=0.6,
        min_speech_duration_ms=100,
        min_silence_duration_ms=50,
        speech_pad_ms=0,
        max_speech_duration_seconds=3.0,
    )
    reply = await vad_stub.DetectSpeech(
        vad_pb2.DetectSpeechRequest(audio=speech.raw_audio(speech.pcm16(samples)), options=options)
    )
    expected = silero(
        from_pcm16(speech.pcm16(samples)),
        threshold=0.6,
        min_speech_duration_ms=100,
        min_silence_duration_ms=50,
        speech_pad_ms=0,
        max_speech_duration_s=3.0,
    )
    assert max(boundary_differences(segments_of(reply), expected)) <= FRAME_SECONDS
    assert all(end - start <= 3.0 for start, end in segments_of(reply))


async def test_silence_has_no_speech(vad_stub: Any) -> None:
    reply = await vad_stub.DetectSpeech(
        vad_pb2.DetectSpeechRequest(audio=speech.raw_audio(bytes(2 * 3 * SAMPLE_RATE)))
    )
    assert list(reply.segments) == []
    assert reply.speech_seconds == 0
    assert reply.audio_seconds == pytest.approx(3.0)


async def test_white_noise_as_silero_says(vad_stub: Any, silero: Callable[..., Any]) -> None:
    noise = (0.1 * np.random.default_rng(5).standard_normal(4 * SAMPLE_RATE)).astype(np.float32)
    data = speech.pcm16(noise)
    reply = await vad_stub.DetectSpeech(vad_pb2.DetectSpeechRequest(audio=speech.raw_audio(data)))
    expected = silero(from_pcm16(data))
    assert len(expected) <= 1  # silero itself finds (almost) no speech in white noise
    got = segments_of(reply)
    if expected:
        assert max(boundary_differences(got, expected)) <= FRAME_SECONDS
    else:
        assert got == []


async def test_speech_after_silence(
    vad_stub: Any, speech_files: list[Path], silero: Callable[..., Any]
) -> None:
    samples, _ = speech.read(speech_files[2])
    lead = 1.5
    audio = np.concatenate([np.zeros(int(lead * SAMPLE_RATE), np.float32), samples[: 4 * 16000]])
    wav = speech.wav_bytes(audio, SAMPLE_RATE)  # 16-bit PCM
    reply = await vad_stub.DetectSpeech(
        vad_pb2.DetectSpeechRequest(audio=audio_pb2.Audio(content=wav))
    )
    got = segments_of(reply)
    assert got
    assert got[0][0] >= lead - 0.03 - FRAME_SECONDS  # nothing in the silence but the pad
    expected = silero(soundfile.read(io.BytesIO(wav), dtype="float32")[0])
    assert max(boundary_differences(got, expected)) <= FRAME_SECONDS


async def test_streaming_matches_unary_with_odd_chunks(
    vad_stub: Any, speech_files: list[Path], report: Any
) -> None:
    samples, _ = speech.read(speech_files[3])
    data = speech.pcm16(samples)
    unary = await vad_stub.DetectSpeech(vad_pb2.DetectSpeechRequest(audio=speech.raw_audio(data)))
    started = time.perf_counter()
    events, summary = await stream_call(vad_stub, [config_message(), *chunked(data, 1000)])
    elapsed = time.perf_counter() - started
    assert segments_of(summary) == segments_of(unary)
    assert summary.audio_seconds == pytest.approx(unary.audio_seconds)
    check_events(events, segments_of(summary))
    latency = [e.decided_at_seconds - e.time_seconds for e in events[:-1]]
    report(
        f"StreamingDetectSpeech: {len(samples) / SAMPLE_RATE:.1f} s in 1000-byte chunks took "
        f"{elapsed:.2f} s; event latency (audio time after the boundary) "
        f"{min(latency) * 1000:.0f}..{max(latency) * 1000:.0f} ms"
    )


async def test_streaming_splits_samples_anywhere(vad_stub: Any, speech_files: list[Path]) -> None:
    samples, _ = speech.read(speech_files[4])
    data = speech.pcm16(samples[: 3 * SAMPLE_RATE])
    unary = await vad_stub.DetectSpeech(vad_pb2.DetectSpeechRequest(audio=speech.raw_audio(data)))
    events, summary = await stream_call(vad_stub, [config_message(), *chunked(data, 7)])
    assert segments_of(summary) == segments_of(unary)
    check_events(events, segments_of(summary))


async def test_streaming_resamples_and_downmixes(vad_stub: Any, speech_files: list[Path]) -> None:
    """8 kHz stereo FLOAT32, streamed: the same segments as DetectSpeech of the same bytes."""
    import soxr

    samples, _ = speech.read(speech_files[5])
    low = soxr.resample(samples[: 6 * SAMPLE_RATE], SAMPLE_RATE, 8000).astype(np.float32)
    data = np.stack([low, 0.5 * low], axis=1).astype("<f4").tobytes()
    audio = audio_pb2.Audio(
        raw=audio_pb2.RawAudio(
            samples=data, format=audio_pb2.SAMPLE_FORMAT_FLOAT32, sample_rate_hz=8000, channels=2
        )
    )
    unary = await vad_stub.DetectSpeech(vad_pb2.DetectSpeechRequest(audio=audio))
    config = config_message(rate=8000, fmt=audio_pb2.SAMPLE_FORMAT_FLOAT32, channels=2)
    events, summary = await stream_call(vad_stub, [config, *chunked(data, 3001)])
    assert segments_of(unary)
    assert segments_of(summary) == segments_of(unary)
    check_events(events, segments_of(summary))


async def test_streaming_silence_sends_only_the_summary(vad_stub: Any) -> None:
    events, summary = await stream_call(vad_stub, [config_message(), *chunked(bytes(64000), 4096)])
    assert events == []
    assert list(summary.segments) == []
    assert summary.audio_seconds == pytest.approx(2.0)


async def expect_invalid(call: Any, field: str) -> None:
    with pytest.raises(grpc.aio.AioRpcError) as caught:
        await call
    assert caught.value.code() == grpc.StatusCode.INVALID_ARGUMENT, caught.value.details()
    assert field in (caught.value.details() or "")


@pytest.mark.parametrize(
    ("requests", "field"),
    [
        ([], "config"),
        ([vad_pb2.StreamingDetectSpeechRequest(audio_chunk=b"\0\0")], "config"),
        ([config_message(), config_message()], "config"),
        ([config_message(), vad_pb2.StreamingDetectSpeechRequest()], "audio_chunk"),
        ([config_message(rate=4000)], "config.sample_rate_hz"),
        ([config_message(rate=200_000)], "config.sample_rate_hz"),
        ([config_message(fmt=audio_pb2.SAMPLE_FORMAT_UNSPECIFIED)], "config.format"),
        ([config_message(channels=9)], "config.channels"),
        ([config_message(options=vad_pb2.VadOptions(threshold=1.5))], "config.options.threshold"),
        ([config_message()], "audio_chunk"),  # no audio at all
        ([config_message(), *chunked(b"\0\0\0", 3)], "audio_chunk"),  # half a sample at the end
        (
            [
                config_message(fmt=audio_pb2.SAMPLE_FORMAT_FLOAT32),
                vad_pb2.StreamingDetectSpeechRequest(
                    audio_chunk=np.array([0.0, np.nan], "<f4").tobytes()
                ),
            ],
            "audio_chunk",
        ),
    ],
)
async def test_streaming_bad_input(vad_stub: Any, requests: list[Any], field: str) -> None:
    await expect_invalid(stream_call(vad_stub, requests), field)


async def test_unary_bad_input(vad_stub: Any) -> None:
    await expect_invalid(vad_stub.DetectSpeech(vad_pb2.DetectSpeechRequest()), "audio")
    options = vad_pb2.VadOptions(threshold=0.5, neg_threshold=0.7)
    request = vad_pb2.DetectSpeechRequest(audio=speech.raw_audio(bytes(3200)), options=options)
    await expect_invalid(vad_stub.DetectSpeech(request), "options.neg_threshold")
    request = vad_pb2.DetectSpeechRequest(audio=audio_pb2.Audio(content=b"not audio"))
    await expect_invalid(vad_stub.DetectSpeech(request), "audio.content")


async def test_stream_over_the_duration_limit(app: Any) -> None:
    """A server with max_stream_seconds=2 fails the call once the limit is passed."""
    from server.grpc_errors import ErrorMappingInterceptor
    from server.vad_core import VoiceActivityCore
    from server.vad_servicer import VoiceActivityServicer

    settings = app.settings.replace(max_stream_seconds=2.0)
    with ThreadPoolExecutor(1) as executor:
        core = VoiceActivityCore(settings, app.vad.vad, executor)
        server = grpc.aio.server(interceptors=[ErrorMappingInterceptor()])
        vad_pb2_grpc.add_VoiceActivityServiceServicer_to_server(VoiceActivityServicer(core), server)
        port = server.add_insecure_port("127.0.0.1:0")
        await server.start()
        try:
            async with grpc.aio.insecure_channel(f"127.0.0.1:{port}") as channel:
                stub = vad_pb2_grpc.VoiceActivityServiceStub(channel)
                ok = [config_message(), *chunked(bytes(2 * 2 * SAMPLE_RATE), 8000)]
                _, summary = await stream_call(stub, ok)  # exactly 2 s: accepted
                assert summary.audio_seconds == pytest.approx(2.0)
                over = [config_message(), *chunked(bytes(2 * 2 * SAMPLE_RATE + 2), 8000)]
                await expect_invalid(stream_call(stub, over), "max_stream_seconds")
            assert core.active_streams == 0
        finally:
            await server.stop(0)


async def test_cancelled_stream_leaves_nothing_running(
    app: Any, vad_stub: Any, speech_files: list[Path]
) -> None:
    samples, _ = speech.read(speech_files[0])
    data = speech.pcm16(samples)
    sent = asyncio.Event()

    async def source() -> AsyncIterator[vad_pb2.StreamingDetectSpeechRequest]:
        yield config_message()
        for request in chunked(data[: len(data) // 2], 3200):
            yield request
        sent.set()
        await asyncio.sleep(3600)  # a live source that goes quiet

    call = vad_stub.StreamingDetectSpeech(source(), timeout=60)
    first = await call.read()  # the server is working on the stream
    assert first.WhichOneof("streaming_response") == "event"
    await asyncio.wait_for(sent.wait(), 30)
    assert app.vad.active_streams == 1
    assert app.metrics.registry.get_sample_value("voicegate_vad_streams") == 1
    call.cancel()
    for _ in range(200):  # the server sees the cancellation within milliseconds
        if not (app.vad.active_streams or app.admission.in_flight):
            break
        await asyncio.sleep(0.05)
    assert app.vad.active_streams == 0
    assert app.admission.in_flight == 0
    assert app.metrics.registry.get_sample_value("voicegate_vad_streams") == 0
    assert not [t for t in asyncio.all_tasks() if "StreamingDetectSpeech" in repr(t.get_coro())]


async def test_stream_deadline(vad_stub: Any) -> None:
    async def source() -> AsyncIterator[vad_pb2.StreamingDetectSpeechRequest]:
        yield config_message()
        await asyncio.sleep(3600)

    with pytest.raises(grpc.aio.AioRpcError) as caught:
        async for _ in vad_stub.StreamingDetectSpeech(source(), timeout=0.5):
            pass
    assert caught.value.code() == grpc.StatusCode.DEADLINE_EXCEEDED


async def test_stages_are_measured(app: Any, vad_stub: Any, speech_files: list[Path]) -> None:
    await vad_stub.DetectSpeech(
        vad_pb2.DetectSpeechRequest(audio=audio_pb2.Audio(content=speech_files[0].read_bytes()))
    )
    counts: dict[tuple[str, str], float] = {}
    for metric in app.metrics.registry.collect():
        for sample in metric.samples:
            if sample.name == "voicegate_stage_seconds_count":
                key = (sample.labels["grpc_method"], sample.labels["stage"])
                counts[key] = sample.value
    for method in ("DetectSpeech", "StreamingDetectSpeech"):
        for stage in ("decode", "vad"):
            assert any(m.endswith(method) and s == stage for m, s in counts), (method, stage)


def test_token_files_may_name_the_vad_methods() -> None:
    from server.security import API_METHODS

    assert {"DetectSpeech", "StreamingDetectSpeech"} <= API_METHODS
