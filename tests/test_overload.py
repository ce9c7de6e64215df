"""Admission control, deadlines and cancellation, through the real server and Triton.

Each test runs a front server of its own (its own admission bounds) on the session's Triton.
"""

from __future__ import annotations

import asyncio
import contextlib
import statistics
import threading
import time
from collections.abc import AsyncIterator
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

import grpc
import numpy as np
import pytest

from server.admission import Admission
from server.api.voicegate.v1 import speaker_pb2, speaker_pb2_grpc
from server.config import Settings
from server.core import SpeakerCore
from server.errors import DeadlineExceeded
from server.fusion import Calibration
from server.grpc_errors import method_info
from tests import speech

pytestmark = pytest.mark.integration


class Server:
    """A VoicegateApp of the test's own on the session's Triton, with a channel and stub."""

    def __init__(self, app: Any, channel: grpc.aio.Channel) -> None:
        self.app = app
        self.channel = channel
        self.stub = speaker_pb2_grpc.SpeakerServiceStub(channel)

    def metric(self, name: str, labels: dict[str, str] | None = None) -> float:
        value = self.app.metrics.registry.get_sample_value(name, labels or {})
        return float(value or 0.0)

    async def wait_in_flight(self, count: int, within_s: float = 10.0) -> None:
        deadline = time.monotonic() + within_s
        while self.app.admission.in_flight != count:
            assert time.monotonic() < deadline, (
                f"{self.app.admission.in_flight} calls in flight, expected {count}"
            )
            await asyncio.sleep(0.01)
        assert self.metric("voicegate_admission_in_flight") == count


@contextlib.asynccontextmanager
async def start_server(settings: Settings) -> AsyncIterator[Server]:
    from server.app import VoicegateApp

    async with (
        VoicegateApp(settings) as app,
        grpc.aio.insecure_channel(f"127.0.0.1:{app.port}") as channel,
    ):
        yield Server(app, channel)


@pytest.fixture
async def small(base_settings: Settings, triton: Any, tmp_path: Path) -> AsyncIterator[Server]:
    settings = base_settings.replace(
        triton_url=triton.grpc_url, max_inflight_requests=4, state_dir=tmp_path
    )
    async with start_server(settings) as server:
        yield server


def test_work_methods() -> None:
    for method in ("Embed", "Verify", "Enroll", "Identify", "DetectSpeech", "StreamingEmbed"):
        assert method_info(f"/voicegate.v1.SpeakerService/{method}").is_work
    for light in ("GetSpeaker", "ListSpeakers", "DeleteSpeaker"):
        assert not method_info(f"/voicegate.v1.SpeakerService/{light}").is_work
    assert not method_info("/grpc.health.v1.Health/Check").is_work
    assert not method_info("/grpc.reflection.v1alpha.ServerReflection/ServerReflectionInfo").is_work


def test_admission_bounds() -> None:
    admission = Admission(max_requests=2, max_bytes=100)
    assert admission.try_acquire(500) is None  # alone: admitted whatever its size
    assert admission.try_acquire(1) == "bytes"
    admission.release(500)
    assert admission.try_acquire(60) is None
    assert admission.try_acquire(30) is None
    assert admission.try_acquire(0) == "requests"
    admission.release(60)
    admission.release(30)
    assert (admission.in_flight, admission.in_flight_bytes) == (0, 0)


async def test_overload_refuses_at_once_and_recovers(
    small: Server, speech_files: list[Path], report: Any
) -> None:
    request = speaker_pb2.EmbedRequest(audio=speech.clip(speech_files[0]))
    await small.stub.Embed(request, timeout=30)  # warm

    async def call() -> tuple[grpc.StatusCode, float]:
        began = time.perf_counter()
        try:
            await small.stub.Embed(request, timeout=60)
            code = grpc.StatusCode.OK
        except grpc.aio.AioRpcError as exc:
            code = exc.code()
            assert code != grpc.StatusCode.RESOURCE_EXHAUSTED or "overloaded" in exc.details()
        return code, time.perf_counter() - began

    results = await asyncio.gather(*(call() for _ in range(40)))
    codes = [code for code, _ in results]
    ok = [t for code, t in results if code == grpc.StatusCode.OK]
    refused = [t for code, t in results if code == grpc.StatusCode.RESOURCE_EXHAUSTED]
    assert len(ok) + len(refused) == 40, codes  # nothing but success or a clean refusal
    assert len(ok) >= 4 and refused
    report(
        f"overload (limit 4, 40 concurrent Embeds): {len(ok)} served (median "
        f"{statistics.median(ok) * 1000:.0f} ms), {len(refused)} refused RESOURCE_EXHAUSTED "
        f"(median {statistics.median(refused) * 1000:.1f} ms, max {max(refused) * 1000:.1f} ms)"
    )
    assert statistics.median(refused) < 0.25  # at once: never queued behind the work
    assert max(refused) < 2.0
    assert small.metric(
        "voicegate_admission_refused_total", {"grpc_method": "Embed", "reason": "requests"}
    ) == len(refused)
    labels = {"grpc_service": "voicegate.v1.SpeakerService", "grpc_method": "Embed"}
    assert small.metric(
        "voicegate_grpc_server_handled_total", {**labels, "grpc_code": "RESOURCE_EXHAUSTED"}
    ) == len(refused)
    await small.wait_in_flight(0, within_s=2)
    assert small.metric("voicegate_admission_in_flight_bytes") == 0

    began = time.perf_counter()
    await small.stub.Embed(request, timeout=30)  # load gone: served at once
    assert time.perf_counter() - began < 5


async def test_light_methods_are_not_refused(small: Server, speech_files: list[Path]) -> None:
    request = speaker_pb2.EmbedRequest(audio=speech.long_audio(speech_files, 30))
    calls = [small.stub.Embed(request, timeout=60) for _ in range(4)]
    try:
        await small.wait_in_flight(4)
        with pytest.raises(grpc.aio.AioRpcError) as caught:
            await small.stub.Embed(request, timeout=30)
        assert caught.value.code() == grpc.StatusCode.RESOURCE_EXHAUSTED
        # Speaker look-ups are cheap: never refused for load.
        await small.stub.ListSpeakers(speaker_pb2.ListSpeakersRequest(), timeout=10)
        with pytest.raises(grpc.aio.AioRpcError) as caught:
            await small.stub.GetSpeaker(speaker_pb2.GetSpeakerRequest(speaker_id="nobody"))
        assert caught.value.code() == grpc.StatusCode.NOT_FOUND
    finally:
        for pending in calls:
            pending.cancel()
    await small.wait_in_flight(0)


async def test_byte_bound(
    base_settings: Settings, triton: Any, tmp_path: Path, speech_files: list[Path]
) -> None:
    request = speaker_pb2.EmbedRequest(audio=speech.long_audio(speech_files, 20))
    size = request.ByteSize()
    settings = base_settings.replace(
        triton_url=triton.grpc_url, max_inflight_bytes=size + 1000, state_dir=tmp_path
    )
    async with start_server(settings) as server:
        first = server.stub.Embed(request, timeout=60)
        await server.wait_in_flight(1)
        with pytest.raises(grpc.aio.AioRpcError) as caught:
            await server.stub.Embed(request, timeout=30)
        assert caught.value.code() == grpc.StatusCode.RESOURCE_EXHAUSTED
        assert "request data" in caught.value.details()
        assert (await first).partial_count > 0
        assert server.metric("voicegate_admission_in_flight_bytes") == 0


async def test_deadline_frees_the_slot(small: Server, speech_files: list[Path]) -> None:
    request = speaker_pb2.EmbedRequest(audio=speech.long_audio(speech_files, 60))
    began = time.perf_counter()
    with pytest.raises(grpc.aio.AioRpcError) as caught:
        await small.stub.Embed(request, timeout=0.2)
    assert caught.value.code() == grpc.StatusCode.DEADLINE_EXCEEDED
    assert time.perf_counter() - began < 1.0
    await small.wait_in_flight(0, within_s=2)  # the handler was cancelled with the deadline
    labels = {"grpc_service": "voicegate.v1.SpeakerService", "grpc_method": "Embed"}
    assert small.metric("voicegate_grpc_server_in_flight", labels) == 0
    # Counted as DEADLINE_EXCEEDED when its handler had started; on a slow machine the deadline
    # may pass while the request is still in transit, and then no handler ever sees it.
    expired = small.metric(
        "voicegate_grpc_server_handled_total", {**labels, "grpc_code": "DEADLINE_EXCEEDED"}
    )
    assert expired in (0, 1)
    assert small.metric("voicegate_grpc_server_handled_total", {**labels, "grpc_code": "OK"}) == 0


async def test_cancel_frees_the_slot(small: Server, speech_files: list[Path]) -> None:
    # A server of its own: a call that expired in transit elsewhere could be the one in flight.
    request = speaker_pb2.EmbedRequest(audio=speech.long_audio(speech_files, 60))
    call = small.stub.Embed(request, timeout=60)
    await small.wait_in_flight(1)
    call.cancel()
    with pytest.raises(asyncio.CancelledError):
        await call
    await small.wait_in_flight(0, within_s=2)
    labels = {"grpc_service": "voicegate.v1.SpeakerService", "grpc_method": "Embed"}
    assert small.metric("voicegate_grpc_server_in_flight", labels) == 0
    cancelled = small.metric(
        "voicegate_grpc_server_handled_total", {**labels, "grpc_code": "CANCELLED"}
    )
    assert cancelled == 1


class _NeverCalled:
    async def embed_partials(self, *args: object, **kwargs: object) -> np.ndarray:
        raise AssertionError("no Triton call expected")


async def test_cancelled_preprocessing_never_starts(base_settings: Settings) -> None:
    """Work queued behind a busy pool is dropped when its call is cancelled or expires."""
    release = threading.Event()
    ran: list[str] = []
    with ThreadPoolExecutor(1) as pool:
        settings = base_settings.replace(trim="energy")  # no VAD: nothing but the pool runs
        core = SpeakerCore(settings, _NeverCalled(), Calibration.load(None), pool)
        busy = asyncio.get_running_loop().run_in_executor(pool, release.wait, 10)

        queued = asyncio.ensure_future(core._run(lambda: ran.append("cancelled"), None))
        await asyncio.sleep(0.05)
        queued.cancel()
        with pytest.raises(asyncio.CancelledError):
            await queued
        with pytest.raises(DeadlineExceeded):
            await core._run(lambda: ran.append("expired"), time.monotonic() + 0.05)

        release.set()
        await busy
        assert await core._run(lambda: "next", None) == "next"
    assert ran == []
