"""`voicegate.v1.VoiceActivityService`: parse the request, call the core, convert the result."""

from __future__ import annotations

from collections.abc import AsyncIterator

import grpc

from server.api.voicegate.v1 import vad_pb2, vad_pb2_grpc
from server.errors import InvalidArgument
from server.servicer import audio_from_proto, stream_spec_from_proto
from server.vad import EventKind, Segment, SpeechEvent, VadParams
from server.vad_core import VadResult, VoiceActivityCore

_EVENT_TYPES = {
    EventKind.SPEECH_START: vad_pb2.SPEECH_EVENT_TYPE_SPEECH_START,
    EventKind.SPEECH_END: vad_pb2.SPEECH_EVENT_TYPE_SPEECH_END,
}


def params_from_proto(options: vad_pb2.VadOptions, field: str) -> VadParams:
    """The detector's parameters; unset options take silero's defaults."""

    def get(name: str) -> float | None:
        return float(getattr(options, name)) if options.HasField(name) else None

    return VadParams.create(
        f"{field}.",
        threshold=get("threshold"),
        neg_threshold=get("neg_threshold"),
        min_speech_ms=get("min_speech_duration_ms"),
        min_silence_ms=get("min_silence_duration_ms"),
        speech_pad_ms=get("speech_pad_ms"),
        max_speech_s=get("max_speech_duration_seconds"),
    )


def segment_proto(segment: Segment) -> vad_pb2.SpeechSegment:
    return vad_pb2.SpeechSegment(
        start_seconds=segment.start_seconds,
        end_seconds=segment.end_seconds,
        mean_probability=segment.mean_probability,
    )


def event_response(event: SpeechEvent) -> vad_pb2.StreamingDetectSpeechResponse:
    return vad_pb2.StreamingDetectSpeechResponse(
        event=vad_pb2.SpeechEvent(
            type=_EVENT_TYPES[event.kind],
            time_seconds=event.seconds,
            segment_index=event.index,
            decided_at_seconds=event.decided_at_seconds,
        )
    )


class VoiceActivityServicer(vad_pb2_grpc.VoiceActivityServiceServicer):
    """`voicegate.v1.VoiceActivityService` over a `VoiceActivityCore`."""

    def __init__(self, core: VoiceActivityCore) -> None:
        self._core = core

    async def DetectSpeech(
        self, request: vad_pb2.DetectSpeechRequest, context: grpc.aio.ServicerContext
    ) -> vad_pb2.DetectSpeechResponse:
        audio = audio_from_proto(request.audio, "audio")
        params = params_from_proto(request.options, "options")
        result = await self._core.detect(audio, params, timeout_s=context.time_remaining())
        return vad_pb2.DetectSpeechResponse(
            segments=[segment_proto(s) for s in result.segments],
            speech_seconds=result.speech_seconds,
            audio_seconds=result.audio_seconds,
        )

    async def StreamingDetectSpeech(
        self,
        request_iterator: AsyncIterator[vad_pb2.StreamingDetectSpeechRequest],
        context: grpc.aio.ServicerContext,
    ) -> AsyncIterator[vad_pb2.StreamingDetectSpeechResponse]:
        requests = aiter(request_iterator)
        first = await anext(requests, None)
        if first is None or first.WhichOneof("streaming_request") != "config":
            raise InvalidArgument(
                "config is required in the first message of the stream, before any audio_chunk",
                field="config",
            )
        config = first.config
        spec = stream_spec_from_proto(config)
        params = params_from_proto(config.options, "config.options")
        async with self._core.open_stream(spec, params, context.time_remaining()) as stream:
            async for request in requests:
                kind = request.WhichOneof("streaming_request")
                if kind == "audio_chunk":
                    events = await stream.feed(request.audio_chunk)
                    for event in events:
                        yield event_response(event)
                elif kind == "config":
                    raise InvalidArgument(
                        "config may only be sent once, in the first message; later messages "
                        "carry audio_chunk",
                        field="config",
                    )
                else:
                    raise InvalidArgument(
                        "a message of the stream has neither config nor audio_chunk set",
                        field="audio_chunk",
                    )
            events, result = await stream.finish()
        for event in events:
            yield event_response(event)
        yield vad_pb2.StreamingDetectSpeechResponse(summary=summary_proto(result))


def summary_proto(result: VadResult) -> vad_pb2.SpeechActivitySummary:
    return vad_pb2.SpeechActivitySummary(
        segments=[segment_proto(s) for s in result.segments],
        speech_seconds=result.speech_seconds,
        audio_seconds=result.audio_seconds,
    )
