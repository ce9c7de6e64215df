"""The speaker-directory RPCs of `SpeakerService` (Enroll, Identify, GetSpeaker,
ListSpeakers, DeleteSpeaker): parse the request, call `SpeakerDirectory`, build the reply.

`SpeakerServicer` (server/servicer.py) mixes these in; Verify's `speaker_id` reference comes
here too through `verify_enrolled`.
"""

from __future__ import annotations

import grpc
from google.protobuf.timestamp_pb2 import Timestamp

from server.api.voicegate.v1 import speaker_pb2
from server.core import AudioInput, VerifyResult
from server.errors import InvalidArgument
from server.speakers import OperatingPoint, SpeakerDirectory
from server.store import EnrollMode, SpeakerRecord

_ENROLL_MODES = {
    speaker_pb2.ENROLL_MODE_UNSPECIFIED: EnrollMode.CREATE_OR_APPEND,
    speaker_pb2.ENROLL_MODE_CREATE: EnrollMode.CREATE,
    speaker_pb2.ENROLL_MODE_APPEND: EnrollMode.APPEND,
    speaker_pb2.ENROLL_MODE_REPLACE: EnrollMode.REPLACE,
}


def operating_point_proto(point: OperatingPoint) -> speaker_pb2.OperatingPoint:
    return speaker_pb2.OperatingPoint(
        threshold=point.threshold,
        target_far=point.target_far,
        rule=point.rule,
        calibrated_far=point.calibrated_far,
        calibrated_frr=point.calibrated_frr,
    )


def speaker_proto(record: SpeakerRecord) -> speaker_pb2.Speaker:
    created, updated = Timestamp(), Timestamp()
    created.FromNanoseconds(int(record.create_time * 1e9))
    updated.FromNanoseconds(int(record.update_time * 1e9))
    return speaker_pb2.Speaker(
        speaker_id=record.speaker_id,
        enrollment_count=record.enrollment_count,
        speech_seconds=record.speech_seconds,
        model=record.model,
        model_version=record.model_version,
        create_time=created,
        update_time=updated,
        revision=record.revision,
    )


def model_scores(scores: dict[str, float]) -> list[speaker_pb2.ModelScore]:
    return [speaker_pb2.ModelScore(model=name, score=value) for name, value in scores.items()]


class SpeakerDirectoryRpcs:
    """The directory RPCs; the servicer sets `_directory` and `_operating_point` (the
    calibration's, as Verify and Identify answer it)."""

    _directory: SpeakerDirectory
    _operating_point: speaker_pb2.OperatingPoint

    async def verify_enrolled(
        self, speaker_id: str, probe: AudioInput, timeout_s: float | None
    ) -> VerifyResult:
        return await self._directory.verify(speaker_id, probe, timeout_s=timeout_s)

    async def Enroll(
        self, request: speaker_pb2.EnrollRequest, context: grpc.aio.ServicerContext
    ) -> speaker_pb2.EnrollResponse:
        from server.servicer import audio_from_proto

        mode = _ENROLL_MODES.get(request.mode)
        if mode is None:
            raise InvalidArgument(f"mode {request.mode} is not a known EnrollMode", field="mode")
        audio = [audio_from_proto(item, f"audio[{i}]") for i, item in enumerate(request.audio)]
        record = await self._directory.enroll(
            request.speaker_id, audio, mode, timeout_s=context.time_remaining()
        )
        return speaker_pb2.EnrollResponse(speaker=speaker_proto(record))

    async def Identify(
        self, request: speaker_pb2.IdentifyRequest, context: grpc.aio.ServicerContext
    ) -> speaker_pb2.IdentifyResponse:
        from server.servicer import audio_from_proto

        audio = audio_from_proto(request.audio, "audio")
        result = await self._directory.identify(
            audio, request.top_k, timeout_s=context.time_remaining()
        )
        return speaker_pb2.IdentifyResponse(
            matches=[
                speaker_pb2.SpeakerMatch(
                    speaker_id=match.speaker_id,
                    score=match.score,
                    same_speaker=match.same_speaker,
                    scores=model_scores(match.scores),
                )
                for match in result.matches
            ],
            operating_point=self._operating_point,
            compared_speaker_count=result.compared,
            stale_speaker_count=result.stale,
            speech_seconds=result.speech_seconds,
        )

    async def GetSpeaker(
        self, request: speaker_pb2.GetSpeakerRequest, context: grpc.aio.ServicerContext
    ) -> speaker_pb2.GetSpeakerResponse:
        record = await self._directory.get(request.speaker_id)
        return speaker_pb2.GetSpeakerResponse(speaker=speaker_proto(record))

    async def ListSpeakers(
        self, request: speaker_pb2.ListSpeakersRequest, context: grpc.aio.ServicerContext
    ) -> speaker_pb2.ListSpeakersResponse:
        records, token = await self._directory.list(request.page_size, request.page_token)
        return speaker_pb2.ListSpeakersResponse(
            speakers=[speaker_proto(r) for r in records], next_page_token=token
        )

    async def DeleteSpeaker(
        self, request: speaker_pb2.DeleteSpeakerRequest, context: grpc.aio.ServicerContext
    ) -> speaker_pb2.DeleteSpeakerResponse:
        await self._directory.delete(request.speaker_id)
        return speaker_pb2.DeleteSpeakerResponse()
