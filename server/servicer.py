"""Thin gRPC servicers: parse the request, call the core, convert the result."""

from __future__ import annotations

from collections.abc import AsyncIterator
from typing import Protocol

import grpc

from server.api.voicegate.v1 import audio_pb2, speaker_pb2, speaker_pb2_grpc
from server.audio import AudioInput, RawAudioSpec, SampleFormat
from server.core import SpeakerCore
from server.errors import InvalidArgument
from server.speaker_rpcs import SpeakerDirectoryRpcs, model_scores, operating_point_proto
from server.speakers import OperatingPoint, SpeakerDirectory
from server.vad_core import StreamSpec

# SAMPLE_FORMAT_UNSPECIFIED (and unknown values) map to None: the core refuses it by name.
SAMPLE_FORMATS = {
    audio_pb2.SAMPLE_FORMAT_LINEAR16: SampleFormat.LINEAR16,
    audio_pb2.SAMPLE_FORMAT_FLOAT32: SampleFormat.FLOAT32,
}


class StreamConfig(Protocol):
    """What a stream's first message says of its raw audio (StreamingEmbedConfig,
    StreamingDetectSpeechConfig)."""

    @property
    def format(self) -> audio_pb2.SampleFormat: ...

    @property
    def sample_rate_hz(self) -> int: ...

    @property
    def channels(self) -> int: ...


def audio_from_proto(audio: audio_pb2.Audio, field: str) -> AudioInput:
    """The core's view of an `Audio` message; INVALID_ARGUMENT when no source is set."""
    source = audio.WhichOneof("source")
    if source == "content":
        return audio.content
    if source == "raw":
        raw = audio.raw
        return RawAudioSpec(
            samples=raw.samples,
            format=SAMPLE_FORMATS.get(raw.format),
            sample_rate_hz=raw.sample_rate_hz,
            channels=raw.channels,
        )
    raise InvalidArgument(f"{field} is required: set {field}.content or {field}.raw", field=field)


def stream_spec_from_proto(config: StreamConfig) -> StreamSpec:
    """The core's view of a stream's config (checked when the stream opens)."""
    return StreamSpec(
        format=SAMPLE_FORMATS.get(config.format),
        sample_rate_hz=config.sample_rate_hz,
        channels=config.channels,
    )


class SpeakerServicer(SpeakerDirectoryRpcs, speaker_pb2_grpc.SpeakerServiceServicer):
    """`voicegate.v1.SpeakerService` over a `SpeakerCore` (and a `SpeakerDirectory` for the
    enrolled-speaker RPCs, server/speaker_rpcs.py)."""

    def __init__(self, core: SpeakerCore, directory: SpeakerDirectory) -> None:
        self._core = core
        self._directory = directory
        self._operating_point = operating_point_proto(
            OperatingPoint.from_calibration(core.calibration)
        )

    async def Embed(
        self, request: speaker_pb2.EmbedRequest, context: grpc.aio.ServicerContext
    ) -> speaker_pb2.EmbedResponse:
        audio = audio_from_proto(request.audio, "audio")
        result = await self._core.embed(
            audio, model=request.model or None, timeout_s=context.time_remaining()
        )
        return speaker_pb2.EmbedResponse(
            embedding=result.embedding.tolist(),
            model=result.model,
            speech_seconds=result.speech_seconds,
            partial_count=result.partial_count,
        )

    async def StreamingEmbed(
        self,
        request_iterator: AsyncIterator[speaker_pb2.StreamingEmbedRequest],
        context: grpc.aio.ServicerContext,
    ) -> speaker_pb2.StreamingEmbedResponse:
        requests = aiter(request_iterator)
        first = await anext(requests, None)
        if first is None or first.WhichOneof("streaming_request") != "config":
            raise InvalidArgument(
                "config is required: the first StreamingEmbedRequest must carry it", field="config"
            )
        config = first.config
        spec = stream_spec_from_proto(config)

        async def chunks() -> AsyncIterator[bytes]:
            async for request in requests:
                kind = request.WhichOneof("streaming_request")
                if kind == "audio_chunk":
                    yield request.audio_chunk
                elif kind == "config":
                    raise InvalidArgument(
                        "config may only be sent in the first message", field="config"
                    )
                else:
                    raise InvalidArgument(
                        "a StreamingEmbedRequest must carry config or audio_chunk",
                        field="audio_chunk",
                    )

        result = await self._core.embed_stream(
            spec, chunks(), model=config.model or None, timeout_s=context.time_remaining()
        )
        return speaker_pb2.StreamingEmbedResponse(
            embedding=result.embedding.tolist(),
            model=result.model,
            speech_seconds=result.speech_seconds,
            partial_count=result.partial_count,
        )

    async def Verify(
        self, request: speaker_pb2.VerifyRequest, context: grpc.aio.ServicerContext
    ) -> speaker_pb2.VerifyResponse:
        if request.WhichOneof("reference_source") == "speaker_id":
            probe = audio_from_proto(request.probe, "probe")
            result = await self.verify_enrolled(
                request.speaker_id, probe, timeout_s=context.time_remaining()
            )
        else:
            reference = audio_from_proto(request.reference, "reference")
            probe = audio_from_proto(request.probe, "probe")
            result = await self._core.verify(reference, probe, timeout_s=context.time_remaining())
        return speaker_pb2.VerifyResponse(
            score=result.score,
            same_speaker=result.same_speaker,
            threshold=result.threshold,
            scores=model_scores(result.scores),
            operating_point=self._operating_point,
        )
